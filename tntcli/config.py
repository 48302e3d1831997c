"""Run configuration: one dataclass per recipe section, loaded from YAML recipes and overridden by flags.

Each recipe key is declared once, below: its type, default and help, and the command-line spellings that
`tnt train`, `tnt transfer` and `tnt ablate` build their common flags from (`cli.with_run_flags`). Defaults are
the paper's ImageNet recipe (it follows DeiT). Every key a recipe may hold is a field here, so an unknown or
mistyped key is an error that names it, never a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from tntcli.errors import TntError

RECIPES = importlib.resources.files("tntcli") / "recipes"   # shipped in the package: found from any folder
AMP_SETTINGS = ("auto", "bf16", "fp16", "off")


@dataclass(frozen=True)
class Flag:
    """A command-line spelling of a recipe key, e.g. `--batch-size/-b`.

    `switch=(on, off)` makes it a bare on/off flag (`--amp/--no-amp`) that sets the key to `on` or `off`; when a
    key has both a switch and a value flag and both are given, the value flag wins.
    """
    names: tuple[str, ...]
    min: float | None = None
    switch: tuple[Any, Any] | None = None
    help: str | None = None             # this spelling's own help (default: the key's)


def flag(*names: str, min: float | None = None, switch: tuple[Any, Any] | None = None, help: str | None = None) -> Flag:
    return Flag(names, min=min, switch=switch, help=help)


def setting(default: Any = dataclasses.MISSING, help: str = "", *flags: Flag, factory=None) -> Any:
    """A recipe key: default (or `factory` for mutable defaults), help, and its command-line flags."""
    metadata = {"help": help, "flags": flags}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ------------------------------------------------------------------------------------------ the recipe
@dataclass
class ModelSection:
    name: str = setting("tnt-s", "Model name, e.g. tnt-s, deit-s (transfer: default the checkpoint's).",
                        flag("--model", "-m"))
    img_size: int | None = setting(None, "Input resolution; the model's own (224) when unset. Transfer: the "
                                   "position embedding is resized.", flag("--img-size", min=16))
    drop_path: float = setting(0.1, "Stochastic depth rate of the last block (linear from 0 over the blocks).",
                               flag("--drop-path"))
    arch: dict[str, Any] = setting(help="Architecture overrides, e.g. {depth: 4, dim: 96}.", factory=dict)
    pretrained: str | None = setting(None, "Checkpoint to start from (any supported format).")
    freeze_backbone: bool = setting(False, "Linear probe: only the classification head trains.",
                                    flag("--freeze-backbone"))


@dataclass
class DataSection:
    data: str | None = setting(None, "Dataset: .beton, ImageFolder root, cifar10/cifar100/flowers102/pets, digits.",
                               flag("--data"))
    data_root: str | None = setting(None, "Folder where named datasets live / are downloaded.", flag("--data-root"))
    batch_size: int = setting(128, "Batch size per process.", flag("--batch-size", "-b", min=1))
    workers: int = setting(2, "Data loading worker processes per process.", flag("--workers", "-j", min=0))
    mean: list[float] | None = setting(None, "Normalisation mean; the model's convention (TNT 0.5, DeiT "
                                       "ImageNet's) when unset.")
    std: list[float] | None = setting(None, "Normalisation std; the model's convention when unset.")
    crop_pct: float | None = setting(None, "Centre-crop fraction at evaluation; the model's when unset.")
    max_train_images: int | None = setting(None, "Subsample the train set (quick experiments).")
    augment: bool = setting(True, "false: no augmentation at all (debugging, exactness checks).")
    strict: bool = setting(False, "An unreadable image stops the run instead of being skipped.",
                           flag("--strict", help="Unreadable images are an error, not a skip."))


@dataclass
class OptimSection:
    lr: float = setting(1e-3, "Peak learning rate at a global batch of optim.lr_ref_batch (1024), scaled "
                        "linearly with the global batch (per-process batch x processes).", flag("--lr"))
    lr_ref_batch: int = setting(1024, "The global batch that optim.lr is given for.")
    weight_decay: float = setting(0.05, "AdamW weight decay; none on norms, biases, position embeddings and the "
                                  "cls token.", flag("--weight-decay"))
    betas: list[float] = setting(help="AdamW betas.", factory=lambda: [0.9, 0.999])
    eps: float = setting(1e-8, "AdamW epsilon.")
    warmup_epochs: int = setting(5, "Epochs of linear warmup from optim.warmup_lr.", flag("--warmup-epochs", min=0))
    warmup_lr: float = setting(1e-6, "Learning rate at the start of the warmup.", flag("--warmup-lr"))
    min_lr: float = setting(1e-5, "Learning rate at the end of the cosine and during the cooldown.",
                            flag("--min-lr"))
    cooldown_epochs: int = setting(10, "Last epochs held at optim.min_lr (counted inside train.epochs: the cosine "
                                   "runs over train.epochs - cooldown_epochs, as timm's over --epochs).")
    sched_on_updates: bool = setting(False, "False: the lr is set once per epoch (timm's default, the official "
                                     "run); True: at every optimiser step (engine/schedule.py has the formula).")
    clip_grad: float | None = setting(None, "Clip the gradient norm to this value.", flag("--clip-grad"))
    layer_decay: float | None = setting(None, "Layer-wise lr decay, e.g. 0.75: block i gets lr*decay^(depth-i), "
                                        "the embeddings decay^(depth+1).", flag("--layer-decay"))
    backbone_lr_scale: float = setting(1.0, "lr multiplier for everything but the head (fine-tuning).",
                                       flag("--backbone-lr-scale"))


@dataclass
class AugmentSettings:
    """Train-time augmentation. `aug=None` in `build_loaders` means none of it (plain resize + center crop)."""

    scale: tuple[float, float] = setting((0.08, 1.0), "Random-resized-crop area range.")
    hflip: float = setting(0.5, "Horizontal flip probability.")
    rand_augment: str | None = setting("rand-m9-mstd0.5-inc1", "timm-style RandAugment string; '' (or null in a recipe) = off.",
                                       flag("--aa"))
    random_erasing: float = setting(0.25, "Random erasing probability (timm's pixel mode).", flag("--reprob"))
    mixup: float = setting(0.8, "MixUp alpha; 0 = off.", flag("--mixup"))
    cutmix: float = setting(1.0, "CutMix alpha; 0 = off.", flag("--cutmix"))
    mixup_switch_prob: float = setting(0.5, "Probability of CutMix when both MixUp and CutMix are on.")
    label_smoothing: float = setting(0.1, "Label smoothing (applied by the engine's loss).", flag("--smoothing"))
    interpolation: str = setting("random", "Interpolation of the random-resized crop (torchvision path) and of "
                                 "RandAugment's geometric ops: random (bilinear or bicubic per call, timm's "
                                 "--train-interpolation default), bilinear, bicubic or nearest.",
                                 flag("--train-interpolation"))


@dataclass
class TrainSection:
    epochs: int = setting(310, "Epochs to train, cooldown included (the paper's run: 300 under the cosine + 10).",
                          flag("--epochs", min=1))
    seed: int = setting(0, "Random seed (data order, augmentation, initialisation).", flag("--seed"))
    ema_decay: float | None = setting(
        0.99996, "EMA of the weights with this decay; null or 0: no EMA model.",
        flag("--model-ema-decay", help="EMA decay of the weights (0: no EMA)."),
        flag("--model-ema/--no-model-ema", switch=(0.99996, 0.0),
             help="EMA of the weights at the paper's decay 0.99996 (another: --model-ema-decay) / no EMA."))
    amp: str = setting(
        "auto", "Autocast precision: auto (bf16 on GPU, off on CPU), bf16, fp16 or off.",
        flag("--precision", help="Autocast precision: auto (bf16 on GPU, off on CPU), bf16, fp16 or off."),
        flag("--amp/--no-amp", switch=("bf16", "off"),
             help="bf16 autocast on any device (timm's --amp) / fp32; --precision picks auto or fp16."))
    compile: bool = setting(False, "torch.compile the model.", flag("--compile/--no-compile"))
    backend: str = setting("auto", "Speed paths applied to the model (tntcli/backends): auto | reference | cpu-fast | cpu-eager | cuda.",
                           flag("--backend"))
    repeated_aug: int = setting(3, "DeiT's repeated augmentation (repeats per image), used when distributed.")
    repeated_aug_single_process: bool = setting(False, "Use train.repeated_aug in a one-process run too (DeiT, "
                                                "and by default tnt, turn it off there).")
    max_steps: int | None = setting(None, "Cap on train steps per epoch (smoke tests, quick looks).",
                                    flag("--max-steps", min=1))
    eval_every: int = setting(1, "Evaluate every this many epochs (and after the last).")
    log_every: int = setting(50, "Read the loss back from the device, log it and act on a non-finite loss every "
                             "this many steps (and at the epoch end); steps in between never wait for the host.",
                             flag("--log-every", min=1))
    nan_policy: str = setting(
        "stop", "What a non-finite loss does: stop (at the next log step, naming the step; the checkpoint on disk "
        "predates it) | skip (the step changes no weight, optimiser state or EMA; the lr schedule still advances; "
        "costs a copy of the weights and optimiser state per step).")
    checkpoint_every_steps: int | None = setting(None, "Also save mid-epoch every this many steps (resume is "
                                                 "exact either way).")


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    aug: AugmentSettings = field(default_factory=AugmentSettings)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


@dataclass(frozen=True)
class RecipeKey:
    """One declared recipe key, as the command line sees it."""
    key: str                            # dotted: "optim.lr"
    type: Any                           # the field's resolved type hint
    help: str
    flags: tuple[Flag, ...]


def recipe_keys() -> Iterator[RecipeKey]:
    """Every recipe key in declaration order (sections as in RunConfig)."""
    for section in dataclasses.fields(RunConfig):
        cls = section.default_factory
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield RecipeKey(f"{section.name}.{f.name}", hints[f.name], f.metadata.get("help", ""),
                            f.metadata.get("flags", ()))


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
    from tntcli.backends import BACKENDS  # here, not at the top: the CLI imports this module, and backends imports torch

    checks = [
        (cfg.data.data is not None, "no dataset: pass --data (an ImageFolder root, a .beton, cifar10, digits...)"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.workers >= 0, "data.workers must be >= 0"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (0 <= cfg.model.drop_path < 1, "model.drop_path must be in [0, 1)"),
        (cfg.optim.warmup_epochs >= 0 and cfg.optim.cooldown_epochs >= 0, "warmup/cooldown epochs must be >= 0"),
        (cfg.train.amp in AMP_SETTINGS, "train.amp must be auto, bf16, fp16 or off"),
        (cfg.train.backend in BACKENDS, f"train.backend must be one of {', '.join(BACKENDS)}, got '{cfg.train.backend}'"),
        (cfg.train.nan_policy in ("stop", "skip"), "train.nan_policy must be stop or skip"),
        (cfg.train.ema_decay is None or 0 <= cfg.train.ema_decay < 1, "train.ema_decay must be in [0, 1)"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps must be >= 1"),
        (cfg.train.log_every >= 1, "train.log_every must be >= 1"),
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
