"""Run configuration: one dataclass per recipe section, loaded from YAML recipes and overridden by flags.

Defaults are the paper's ImageNet recipe (it follows DeiT). Every key a recipe may hold is a field here, so an
unknown or mistyped key is an error that names it, never a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tntcli.data import AugmentSettings
from tntcli.errors import TntError

RECIPES = importlib.resources.files("tntcli") / "recipes"   # shipped in the package: found from any folder


@dataclass
class ModelSection:
    name: str = "tnt-s"
    img_size: int | None = None          # None: the model's own (224)
    drop_path: float = 0.1               # stochastic depth rate of the last block
    arch: dict[str, Any] = field(default_factory=dict)   # architecture overrides, e.g. {depth: 4, dim: 96}
    pretrained: str | None = None        # checkpoint to start from (any supported format)
    freeze_backbone: bool = False        # linear probe: only the classification head trains


@dataclass
class DataSection:
    data: str | None = None              # .beton, ImageFolder root, cifar10/cifar100/flowers102/pets, digits
    data_root: str | None = None         # where named datasets live / are downloaded
    batch_size: int = 128                # per process
    workers: int = 2
    mean: list[float] | None = None      # None: the model's convention (TNT 0.5/0.5, DeiT ImageNet)
    std: list[float] | None = None
    crop_pct: float | None = None
    max_train_images: int | None = None  # subsample the train set (quick experiments)
    augment: bool = True                 # false: no augmentation at all (debugging, exactness checks)
    strict: bool = False                 # an unreadable image stops the run instead of being skipped


@dataclass
class OptimSection:
    lr: float = 1e-3                     # at the reference batch below; scaled linearly with the global batch
    lr_ref_batch: int = 1024
    weight_decay: float = 0.05           # none on norms, biases, position embeddings and the cls token
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 10            # last epochs held at min_lr (counted inside `train.epochs`)
    sched_on_updates: bool = False       # False: lr set once per epoch (timm's default, the official run); True:
                                         # every optimiser step (engine/schedule.py has the formula)
    clip_grad: float | None = None
    layer_decay: float | None = None     # e.g. 0.75: block i gets lr*decay^(depth-i), embeddings decay^(depth+1)
    backbone_lr_scale: float = 1.0       # lr multiplier for everything but the head (fine-tuning)


@dataclass
class TrainSection:
    epochs: int = 310                    # every epoch run: 300 under the cosine + optim.cooldown_epochs, as timm
    seed: int = 0
    ema_decay: float | None = 0.99996    # None or 0: no EMA model
    amp: str = "auto"                    # auto (bf16 on GPU, off on CPU), bf16, fp16, off
    compile: bool = False
    repeated_aug: int = 3                # DeiT's repeated augmentation, used when distributed
    max_steps: int | None = None         # cap on train steps per epoch (smoke tests, quick looks)
    eval_every: int = 1
    nan_policy: str = "stop"             # stop | skip: what a non-finite loss does
    checkpoint_every_steps: int | None = None   # also save mid-epoch (resume is exact either way)


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    aug: AugmentSettings = field(default_factory=AugmentSettings)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ loading
def find_recipe(recipe: str):
    """A recipe file: a path, else a name shipped with tnt (`quickstart`, `tnt-s-imagenet`, `transfer/cifar10`).

    A name that is neither is an error listing the shipped names, never a fall-back to the defaults.
    """
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    for name in (recipe, f"{recipe}.yaml"):
        shipped = RECIPES.joinpath(*name.split("/"))
        if shipped.is_file():
            return shipped
    raise TntError(f"recipe '{recipe}' not found; give a YAML path or one of: {', '.join(recipe_names())}")


def recipe_names(folder=RECIPES, prefix: str = "") -> list[str]:
    """Names of the shipped recipes, e.g. ['deit-b-imagenet', ..., 'transfer/cifar10', ...]."""
    names = []
    for entry in folder.iterdir():
        if entry.is_dir():
            names += recipe_names(entry, f"{prefix}{entry.name}/")
        elif entry.name.endswith(".yaml"):
            names.append(prefix + entry.name.removesuffix(".yaml"))
    return sorted(names)


def load_recipe(recipe: str | None) -> dict[str, Any]:
    if recipe is None:
        return {}
    path = find_recipe(recipe)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise TntError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise TntError(f"recipe {path} must be a mapping of sections")
    return loaded


def parse_assignment(text: str) -> tuple[str, Any]:
    """`optim.lr=5e-4` -> ("optim.lr", 0.0005): the value is read as YAML (numbers, lists, null, booleans)."""
    if "=" not in text:
        raise TntError(f"--set expects section.key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        return key.strip(), raw


def build_config(recipe: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- recipe sections <- dotted overrides (flags). Unknown keys and bad types raise TntError."""
    merged: dict[str, dict[str, Any]] = {}
    for section, values in (recipe or {}).items():
        if not isinstance(values, dict):
            raise TntError(f"recipe section '{section}' must be a mapping")
        merged.setdefault(section, {}).update(values)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise TntError(f"override '{dotted}' must name section.key (e.g. optim.lr)")
        merged.setdefault(section, {})[key] = value
    sections = {}
    for f in dataclasses.fields(RunConfig):
        sections[f.name] = _make_section(f.name, f.default_factory, merged.pop(f.name, {}))
    if merged:
        raise TntError(f"unknown recipe section(s) {', '.join(sorted(merged))}; "
                       f"sections: {', '.join(f.name for f in dataclasses.fields(RunConfig))}")
    cfg = RunConfig(**sections)
    validate(cfg)
    return cfg


def _make_section(name: str, factory, values: dict[str, Any]):
    section = factory()
    hints = typing.get_type_hints(type(section))
    known = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in known:
            raise TntError(f"unknown recipe key '{name}.{key}'; {name} keys: {', '.join(sorted(known))}")
        setattr(section, key, _coerce(f"{name}.{key}", value, hints[key]))
    return section


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type hint; ints become floats where floats are expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except TntError as err:
                errors.append(err)
        raise errors[0]
    if hint is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TntError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value] if args and args[0] is not Ellipsis else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise TntError(f"{key} must be a mapping, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise TntError(f"{key} must be true or false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool) and hint is not bool):
        raise TntError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def validate(cfg: RunConfig) -> None:
    checks = [
        (cfg.data.data is not None, "no dataset: pass --data (an ImageFolder root, a .beton, cifar10, digits...)"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.workers >= 0, "data.workers must be >= 0"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= cfg.model.drop_path < 1, "model.drop_path must be in [0, 1)"),
        (cfg.optim.warmup_epochs >= 0 and cfg.optim.cooldown_epochs >= 0, "warmup/cooldown epochs must be >= 0"),
        (cfg.train.amp in ("auto", "bf16", "fp16", "off"), "train.amp must be auto, bf16, fp16 or off"),
        (cfg.train.nan_policy in ("stop", "skip"), "train.nan_policy must be stop or skip"),
        (cfg.train.ema_decay is None or 0 <= cfg.train.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps must be >= 1"),
        (cfg.optim.layer_decay is None or 0 < cfg.optim.layer_decay <= 1, "optim.layer_decay must be in (0, 1]"),
        (cfg.optim.backbone_lr_scale > 0, "optim.backbone_lr_scale must be > 0 (model.freeze_backbone freezes it)"),
        (cfg.model.img_size is None or cfg.model.img_size > 0, "model.img_size must be > 0"),
        (0 <= cfg.aug.random_erasing <= 1, "aug.random_erasing must be in [0, 1]"),
        (cfg.aug.mixup >= 0 and cfg.aug.cutmix >= 0, "aug.mixup and aug.cutmix must be >= 0"),
        (0 <= cfg.aug.label_smoothing < 1, "aug.label_smoothing must be in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise TntError(message)


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from a saved `config.yaml` / checkpoint record."""
    return build_config(d)


def run_model_config(cfg: RunConfig, num_classes: int = 1000):
    """The model config a run builds: the named model with `model.arch` overrides; `model.img_size` wins over an
    `arch` img_size, 224 when neither is set. The engine, `tnt ablate` and `tnt transfer` all build through this."""
    from tntcli.models.registry import model_config

    arch = dict(cfg.model.arch)
    arch_img_size = arch.pop("img_size", None)
    return model_config(cfg.model.name, img_size=cfg.model.img_size or arch_img_size or 224,
                        num_classes=num_classes, drop_path_rate=cfg.model.drop_path, **arch)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
