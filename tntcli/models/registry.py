"""Model names -> configs. One place knows every architecture the CLI can build."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from tntcli.errors import TntError
from tntcli.models.deit import DeiT, DeiTConfig
from tntcli.models.tnt import TNT, TNTConfig

TNT_MEAN = TNT_STD = (0.5, 0.5, 0.5)                      # the TNT releases normalise to [-1, 1]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """A named architecture: its family, constructor arguments and the eval convention of its checkpoints."""
    family: str                                           # "tnt" or "deit"
    arch: dict[str, Any]
    baseline: str | None = None                           # same-size DeiT for comparison tables
    mean: tuple[float, float, float] = TNT_MEAN
    std: tuple[float, float, float] = TNT_STD
    crop_pct: float = 0.9
    interpolation: str = "bicubic"


_DEIT = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875)
MODELS: dict[str, ModelSpec] = {
    "tnt-ti": ModelSpec("tnt", dict(dim=192, word_dim=12, heads=3, inner_heads=2), baseline="deit-ti"),
    "tnt-s": ModelSpec("tnt", dict(dim=384, word_dim=24, heads=6, inner_heads=4), baseline="deit-s"),
    "tnt-b": ModelSpec("tnt", dict(dim=640, word_dim=40, heads=10, inner_heads=4), baseline="deit-b"),
    "tnt-s-se": ModelSpec("tnt", dict(dim=384, word_dim=24, heads=6, inner_heads=4, se=True), baseline="deit-s"),
    "tnt-s-legacy": ModelSpec("tnt", dict(dim=384, word_dim=24, heads=6, inner_heads=4, legacy=True),
                              baseline="deit-s"),
    "deit-ti": ModelSpec("deit", dict(dim=192, heads=3), **_DEIT),
    "deit-s": ModelSpec("deit", dict(dim=384, heads=6), **_DEIT),
    "deit-b": ModelSpec("deit", dict(dim=768, heads=12), **_DEIT),
}
FAMILIES = {"tnt": (TNT, TNTConfig), "deit": (DeiT, DeiTConfig)}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise TntError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}")
    return MODELS[name]


def model_config(name: str, **overrides: Any) -> TNTConfig | DeiTConfig:
    """The config of a named model with `overrides` applied (unknown or bad keys raise TntError)."""
    spec = get_spec(name)
    config_cls = FAMILIES[spec.family][1]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TntError(f"{name} has no option {', '.join(unknown)}; options: {', '.join(sorted(fields))}")
    cfg = config_cls(**{**spec.arch, **overrides})
    validate_config(name, cfg)
    return cfg


def validate_config(name: str, cfg: TNTConfig | DeiTConfig) -> None:
    if cfg.img_size <= 0 or cfg.img_size % cfg.patch_size:
        raise TntError(f"img_size {cfg.img_size} must be a positive multiple of the patch size {cfg.patch_size}")
    if cfg.dim % cfg.heads:
        raise TntError(f"{name}: dim {cfg.dim} is not divisible by {cfg.heads} heads")
    if isinstance(cfg, TNTConfig):
        if cfg.word_dim % cfg.inner_heads:
            raise TntError(f"{name}: word dim {cfg.word_dim} is not divisible by {cfg.inner_heads} inner heads")
        if cfg.patch_size % cfg.inner_stride:
            raise TntError(f"{name}: inner stride {cfg.inner_stride} does not divide the patch size {cfg.patch_size}")
        bad = [b for b in cfg.inner_blocks or () if not 0 <= b < cfg.depth]
        if bad:
            raise TntError(f"{name}: inner blocks {bad} out of range for depth {cfg.depth}")


def build_model(cfg: TNTConfig | DeiTConfig) -> nn.Module:
    return (TNT if isinstance(cfg, TNTConfig) else DeiT)(cfg)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a named model, e.g. `create_model("tnt-s", num_classes=10, img_size=384)`."""
    return build_model(model_config(name, **overrides))


def config_to_dict(cfg: TNTConfig | DeiTConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    if d.get("inner_blocks") is not None:
        d["inner_blocks"] = list(d["inner_blocks"])
    return d


def config_from_dict(family: str, d: dict[str, Any]) -> TNTConfig | DeiTConfig:
    d = dict(d)
    if d.get("inner_blocks") is not None:
        d["inner_blocks"] = tuple(d["inner_blocks"])
    return FAMILIES[family][1](**d)
