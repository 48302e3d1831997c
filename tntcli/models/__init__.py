"""The model core: TNT and DeiT on shared layers. Knows nothing of data or training."""
from tntcli.models.weights import load_checkpoint, load_pretrained, save_model
from tntcli.models.deit import DeiT, DeiTConfig
from tntcli.models.registry import MODELS, create_model, get_spec, model_config
from tntcli.models.tnt import TNT, TNTConfig

__all__ = ["MODELS", "TNT", "TNTConfig", "DeiT", "DeiTConfig", "create_model", "get_spec", "model_config",
           "load_checkpoint", "load_pretrained", "save_model"]
