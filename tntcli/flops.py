"""Parameter and MAC counts with fvcore, set beside the paper's figures.

fvcore counts one multiply-accumulate as one "flop", the unit papers print as FLOPs. It has no handle for
`aten::scaled_dot_product_attention` and would count attention as zero (undercounting DeiT by 8-15%), so we
register one: QK^T and AV are each B*H*N*S*E MACs.
"""
from __future__ import annotations

import re
import warnings
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from tntcli.errors import TntError
from tntcli.models.registry import MODELS, create_model, get_spec
from tntcli.paper import model_figures
from tntcli.results import write_table

PAPER_MODELS = ["tnt-ti", "tnt-s", "tnt-b", "tnt-s-se", "deit-ti", "deit-s", "deit-b"]
PAPER_IMG_SIZE = 224
FOOTNOTES = [
    "Params are trainable parameters. GMACs: fvcore multiply-accumulates at the given resolution, attention included.",
    "Paper columns are the paper's printed figures (224px), not ours.",
    "tnt-b: the paper's 65.6M counts the unused 196x640 `outer_tokens` parameter of the official code.",
    "deit-b: the paper prints 86.4M; the architecture has 86.57M trainable parameters.",
]


def _sdpa_macs(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def count_macs(model: nn.Module, img_size: int):
    """An fvcore FlopCountAnalysis of one 224px (or `img_size`) image through `model`, attention counted."""
    warnings.filterwarnings("ignore", message=".*torch.jit.*", category=FutureWarning)  # fvcore traces with jit
    from fvcore.nn import FlopCountAnalysis

    x = torch.zeros(1, 3, img_size, img_size)
    analysis = FlopCountAnalysis(model.eval(), x).set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.total()        # fvcore traces on the first query; the plain model: the architecture's nominal cost
    return analysis


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def resolve_names(names: list[str], all_models: bool) -> list[str]:
    if all_models:
        return PAPER_MODELS
    if not names:
        raise TntError("name a model with --model (e.g. --model tnt-s) or use --all")
    for name in names:
        get_spec(name)
    return list(dict.fromkeys(names))


def measure(name: str, img_size: int = PAPER_IMG_SIZE) -> dict[str, float]:
    """Trainable params (M) and GMACs of a named model."""
    with torch.no_grad():
        model = create_model(name, img_size=img_size)
        return {"params_m": trainable_params(model) / 1e6, "gmacs": count_macs(model, img_size).total() / 1e9}


def flops_table(names: list[str], img_size: int = PAPER_IMG_SIZE) -> pd.DataFrame:
    """One row per model: ours, the paper's (224px only), their relative difference and the DeiT baseline."""
    cache: dict[str, dict[str, float]] = {}

    def get(name: str) -> dict[str, float]:
        if name not in cache:
            cache[name] = measure(name, img_size)
        return cache[name]

    rows = []
    for name in names:
        ours, paper = get(name), model_figures(name) if img_size == PAPER_IMG_SIZE else {}
        baseline = MODELS[name].baseline
        row = {"model": name, "img_size": img_size, "params_m": round(ours["params_m"], 3),
               "gmacs": round(ours["gmacs"], 3), "paper_params_m": paper.get("params_m"),
               "paper_gmacs": paper.get("gmacs")}
        row["params_rel_diff"] = _rel(ours["params_m"], paper.get("params_m"))
        row["gmacs_rel_diff"] = _rel(ours["gmacs"], paper.get("gmacs"))
        row["baseline"] = baseline
        row["baseline_gmacs"] = round(get(baseline)["gmacs"], 3) if baseline else None
        row["gmacs_vs_baseline"] = round(ours["gmacs"] / get(baseline)["gmacs"], 3) if baseline else None
        rows.append(row)
    return pd.DataFrame(rows)


def _rel(ours: float, paper: float | None) -> float | None:
    return None if paper is None else round((ours - paper) / paper, 4)


def _fmt(value, spec: str = "") -> str:
    return "–" if value is None or pd.isna(value) else format(value, spec)


def print_table(df: pd.DataFrame, console: Console) -> None:
    table = Table(title=f"Params and GMACs at {int(df.img_size.iloc[0])}px (paper figures are the paper's, 224px)")
    for col in ("model", "params M", "GMACs", "paper M", "paper G", "Δ M", "Δ G", "baseline", "G/base"):
        table.add_column(col, justify="left" if col in ("model", "baseline") else "right")
    for r in df.itertuples():
        table.add_row(r.model, f"{r.params_m:.2f}", f"{r.gmacs:.3f}", _fmt(r.paper_params_m), _fmt(r.paper_gmacs),
                      _fmt(r.params_rel_diff, "+.1%"), _fmt(r.gmacs_rel_diff, "+.1%"), _fmt(r.baseline),
                      _fmt(r.gmacs_vs_baseline, ".2f"))
    console.print(table)


def write_flops(df: pd.DataFrame, out: str | Path) -> list[Path]:
    size = int(df.img_size.iloc[0])
    stem = "flops" if size == PAPER_IMG_SIZE else f"flops-{size}"
    return write_table(df, out, stem, f"Params and GMACs at {size}px", FOOTNOTES)


def by_module(name: str, img_size: int = PAPER_IMG_SIZE) -> dict[str, float]:
    """GMACs per top-level part, with the per-block parts summed over blocks (blocks.*.inner, ...)."""
    with torch.no_grad():
        counts = count_macs(create_model(name, img_size=img_size), img_size).by_module()
    parts: dict[str, float] = defaultdict(float)
    for module, macs in counts.items():
        if module and module != "blocks" and module.count(".") == (2 if module.startswith("blocks.") else 0):
            parts[re.sub(r"^blocks\.\d+", "blocks.*", module)] += macs / 1e9
    return dict(parts)


def print_by_module(name: str, img_size: int, console: Console) -> None:
    parts = by_module(name, img_size)
    total = sum(parts.values())
    table = Table(title=f"{name}: GMACs by module ({img_size}px)")
    table.add_column("module")
    table.add_column("GMACs", justify="right")
    table.add_column("share", justify="right")
    for module, macs in sorted(parts.items(), key=lambda kv: -kv[1]):
        table.add_row(module, f"{macs:.3f}", f"{macs / total:.1%}")
    console.print(table)
