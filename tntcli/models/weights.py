"""Model weights in every supported format: read a file, detect its layout, convert to ours, resize position
embeddings, load into a model, save ours.

Supported, detected from the keys: our own files, the official TNT release (plain or wrapped in
`model`/`state_dict`/`state_dict_ema`), timm `tnt_*_patch16_224` (current and legacy layouts) and timm
`deit_*_patch16_224`. The converters themselves live beside the models (tnt.py, deit.py).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tntcli.errors import TntError
from tntcli.fsio import atomic_write
from tntcli.models import deit, tnt
from tntcli.models.registry import (MODELS, build_model, config_from_dict, config_to_dict, model_config,
                                    validate_config)

OURS = "tntcli"          # the `format` tag in files we write
_WRAPPERS_EMA = ("state_dict_ema", "model_ema", "ema")
_WRAPPERS = ("model", "state_dict", "module")


# ------------------------------------------------------------------------------------------------ reading
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file (torch pickle or safetensors) as a dict, with a one-line error if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise TntError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # official releases pickle an argparse Namespace beside the weights
            if "weights_only" not in str(err) and "Unsupported global" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except TntError:
        raise
    except Exception as err:
        raise TntError(f"cannot read checkpoint {path}: {(str(err).splitlines() or [type(err).__name__])[0]}") from None
    if not isinstance(obj, dict):
        raise TntError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def unwrap_state_dict(obj: dict[str, Any], ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint dict: EMA weights when `ema`, without DDP/compile prefixes."""
    if obj.get("format") == OURS:
        if ema and obj.get("ema") is None:
            raise TntError("--ema asked for, but the checkpoint holds no EMA weights")
        sd = obj["ema"] if ema else obj["model"]
    else:
        wrappers = _WRAPPERS_EMA + _WRAPPERS if ema else _WRAPPERS + _WRAPPERS_EMA
        sd = next((obj[k] for k in wrappers if isinstance(obj.get(k), dict)), obj)
        if ema and not any(isinstance(obj.get(k), dict) for k in _WRAPPERS_EMA):
            raise TntError("--ema asked for, but the checkpoint holds no EMA weights")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    if not out:
        raise TntError("checkpoint holds no tensors")
    return out


# ----------------------------------------------------------------------------------------------- formats
def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """One of: ours-tnt, ours-deit, official-tnt, timm-tnt, timm-tnt-legacy, timm-deit."""
    if "word_embed.proj.weight" in sd:
        return "ours-tnt"
    if "outer_pos" in sd or "inner_pos" in sd or "blocks.0.inner_attn.qk.weight" in sd:
        return "official-tnt"
    if "pixel_embed.proj.weight" in sd:
        norm = sd.get("blocks.0.norm1_proj.weight")
        word_dim = sd["pixel_embed.proj.weight"].shape[0]
        return "timm-tnt-legacy" if norm is not None and norm.shape[0] == word_dim else "timm-tnt"
    if "patch_embed.proj.weight" in sd and "pos_embed" in sd:
        return "deit"   # our DeiT and timm's share names
    raise TntError("unrecognised checkpoint layout (expected ours, official TNT, timm TNT or timm DeiT); "
                   f"first keys: {', '.join(list(sd)[:4])}")


def to_ours(sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """(format, state dict in our layout)."""
    fmt = detect_format(sd)
    convert = {"ours-tnt": dict, "deit": deit.convert_timm, "official-tnt": tnt.convert_official,
               "timm-tnt": tnt.convert_timm, "timm-tnt-legacy": tnt.convert_timm}[fmt]
    try:
        return fmt, convert(sd)
    except KeyError as err:
        raise TntError(f"{fmt} checkpoint has an unexpected key {err}") from None


def infer_arch(sd: dict[str, torch.Tensor]) -> str:
    """Describe the architecture our-layout weights belong to, for error messages."""
    if "word_embed.proj.weight" in sd:
        return f"TNT with dim {sd['sentence_embed.proj.weight'].shape[0]}, word dim {sd['word_embed.proj.weight'].shape[0]}"
    return f"DeiT with dim {sd['patch_embed.proj.weight'].shape[0]}"


def guess_model_name(sd: dict[str, torch.Tensor]) -> str | None:
    """The registered model whose shapes match our-layout weights, if any (ignoring head and pos-embed size)."""
    for name in MODELS:
        with torch.device("meta"):                        # shapes only: no memory, no init cost
            ref = build_model(model_config(name)).state_dict()
        if set(ref) == set(sd) and all(ref[k].shape == sd[k].shape for k in ref if not _resizable(k)):
            return name
    return None


def _resizable(key: str) -> bool:
    return key.startswith("head.") or key in ("sentence_pos", "pos_embed")


# ----------------------------------------------------------------------------------------- pos-embed resize
def resize_pos_embed(pos: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubic resize of a (1, 1 + g*g, d) position embedding to (1, 1 + new_grid^2, d); the cls entry is kept."""
    cls, grid = pos[:, :1], pos[:, 1:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise TntError(f"position embedding of {grid.shape[1]} patches is not a square grid")
    if old == new_grid:
        return pos
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos.dtype)
    return torch.cat([cls, grid], dim=1)


# ------------------------------------------------------------------------------------------------ loading
def load_weights(model: nn.Module, sd: dict[str, torch.Tensor], *, name: str = "model",
                 reset_head: bool = False, source: str = "checkpoint") -> dict[str, Any]:
    """Load our-layout weights into `model`: resize the sentence position embedding to the model's grid,
    replace the head when `reset_head` (new number of classes), and say clearly when shapes do not fit."""
    sd = dict(sd)
    ref = model.state_dict()
    pos_key = model.pos_key
    if pos_key in sd and pos_key in ref and sd[pos_key].shape != ref[pos_key].shape:
        sd[pos_key] = resize_pos_embed(sd[pos_key], model.cfg.grid)
    if reset_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    missing = sorted(set(ref) - set(sd) - ({"head.weight", "head.bias"} if reset_head else set()))
    unexpected = sorted(set(sd) - set(ref))
    wrong = [k for k in ref if k in sd and sd[k].shape != ref[k].shape]
    if missing or unexpected or wrong:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                else f"shape of {wrong[0]} is {tuple(sd[wrong[0]].shape)}, expected {tuple(ref[wrong[0]].shape)}")
        guess = guess_model_name(sd)
        hint = f" (it looks like {guess})" if guess and guess != name else ""
        if wrong == ["head.weight", "head.bias"] and not missing and not unexpected:
            hint = f" (its head has {sd['head.weight'].shape[0]} classes; fine-tune with `tnt transfer`)"
        raise TntError(f"{source} does not fit {name}: {what}; it holds {infer_arch(sd)}{hint}")
    model.load_state_dict(sd, strict=not reset_head)
    return {"missing": missing, "unexpected": unexpected}


def load_pretrained(model: nn.Module, path: str | os.PathLike, *, name: str = "model", ema: bool = False,
                    reset_head: bool = False) -> str:
    """Load any supported checkpoint file into `model`; returns the detected format."""
    fmt, sd = to_ours(unwrap_state_dict(read_checkpoint(path), ema=ema))
    load_weights(model, sd, name=name, reset_head=reset_head, source=f"checkpoint {path} ({fmt})")
    return fmt


def load_checkpoint(path: str | os.PathLike, name: str | None = None, *, ema: bool = False,
                    **overrides: Any) -> tuple[nn.Module, str]:
    """Build a model and load a checkpoint of any supported format into it; returns (model, model name).

    `name` may be omitted for our own files (they record their config) or when the shapes identify one
    registered model. `overrides` (img_size, num_classes...) change the built config; a changed img_size
    resizes the position embedding, a changed num_classes starts a fresh head.
    """
    obj = read_checkpoint(path)
    if obj.get("format") == OURS and name is None:
        name = obj["model_name"]
        saved = config_from_dict(obj["family"], obj["config"])
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(saved)})
        if unknown:
            raise TntError(f"{name} has no option {', '.join(unknown)}")
        cfg = dataclasses.replace(saved, **overrides)
        validate_config(name, cfg)
    else:
        if name is None:
            name = guess_model_name(to_ours(unwrap_state_dict(obj, ema=ema))[1])
            if name is None:
                raise TntError(f"cannot tell which model {path} is for; pass --model")
        cfg = model_config(name, **overrides)
    model = build_model(cfg)
    fmt, sd = to_ours(unwrap_state_dict(obj, ema=ema))
    reset_head = "num_classes" in overrides and sd.get("head.weight") is not None \
        and sd["head.weight"].shape[0] != cfg.num_classes
    load_weights(model, sd, name=name, reset_head=reset_head, source=f"checkpoint {path} ({fmt})")
    return model, name


# ------------------------------------------------------------------------------------------------ writing
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def model_record(model: nn.Module, name: str, ema: nn.Module | None = None) -> dict[str, Any]:
    """Our checkpoint dict: weights plus what is needed to rebuild the model without flags."""
    family = "tnt" if isinstance(model, tnt.TNT) else "deit"
    return {"format": OURS, "model_name": name, "family": family, "config": config_to_dict(model.cfg),
            "model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None}


def save_model(model: nn.Module, name: str, path: str | os.PathLike) -> Path:
    return atomic_torch_save(model_record(model, name), path)


def export_timm(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights in timm's layout (TNT or DeiT), e.g. for `timm.create_model(...).load_state_dict`."""
    module = tnt if isinstance(model, tnt.TNT) else deit
    return module.export_timm(model.state_dict())
