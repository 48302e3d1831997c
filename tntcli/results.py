"""Writing tables and plots under results/: atomic replaces and a lock, so concurrent runs never tear a file."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

import pandas as pd

from tntcli.fsio import atomic_write, atomic_write_text  # noqa: F401  (the results writers' one way to write)


@contextlib.contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on a results folder for read-modify-write of its tables."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_table(df: pd.DataFrame, folder: str | os.PathLike, stem: str, title: str,
                footnotes: list[str] = ()) -> list[Path]:
    """`stem.csv` (the machine-readable contract) and `stem.md` (for people), both written atomically."""
    folder = Path(folder)
    shown = df.astype(object).where(df.notna(), "–")
    md = [f"# {title}", "", shown.to_markdown(index=False), "", *footnotes]
    with locked(folder):
        return [atomic_write_text(folder / f"{stem}.csv", df.to_csv(index=False)),
                atomic_write_text(folder / f"{stem}.md", "\n".join(md).rstrip() + "\n")]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")                      # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem: str | os.PathLike) -> list[Path]:
    """`stem.png` and `stem.svg`, each written atomically."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("png", "svg"):
        final = stem.with_name(f"{stem.name}.{ext}")
        written.append(atomic_write(final, lambda f: fig.savefig(f, format=ext, dpi=120, bbox_inches="tight"),
                                    binary=True))
    return written


def plot_training_curves(histories: dict[str, list[dict]], stem: str | os.PathLike) -> list[Path]:
    """Train loss and val top-1 per epoch for one or more runs (label -> metrics rows)."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, rows in histories.items():
        df = pd.DataFrame(rows)
        if df.empty:
            continue
        ax_loss.plot(df.epoch, df.train_loss, marker="o", ms=3, label=label)
        val = df.dropna(subset=["val_top1"]) if "val_top1" in df else df.iloc[0:0]
        ax_acc.plot(val.epoch, val.val_top1, marker="o", ms=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation top-1")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs are whole numbers: no 1.5 ticks
    try:
        return save_figure(fig, stem)
    finally:
        plt.close(fig)


def draw_top1_vs_gmacs(ax, series: dict[str, list[tuple[str, float, float]]], log_x: bool = True) -> None:
    """Scatter (label, GMACs, top-1) points on `ax`, one marker per series (e.g. "paper ..." and "ours ...")."""
    markers = "xosD^v<>"
    for i, (name, points) in enumerate(series.items()):
        points = [(label, x, y) for label, x, y in points if pd.notna(x) and pd.notna(y)]
        if not points:
            continue
        ax.scatter([p[1] for p in points], [p[2] for p in points], marker=markers[i % len(markers)], label=name)
        for label, x, y in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set(xlabel="GMACs per image" + (" (log scale)" if log_x else ""), ylabel="top-1 (%)")
    if log_x:
        ax.set_xscale("log")
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(5))     # small GMAC values would crowd the default ticks
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_top1_vs_gmacs(series: dict[str, list[tuple[str, float, float]]], stem: str | os.PathLike,
                       title: str) -> list[Path]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    draw_top1_vs_gmacs(ax, series)
    ax.set_title(title, fontsize=10)
    try:
        return save_figure(fig, stem)
    finally:
        plt.close(fig)


def arch_text(arch: dict) -> str:
    """Architecture overrides as one short string; '' is the named architecture as it is."""
    import json

    return " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(arch.items()))


# ----------------------------------------------------------------------------------------------- comparison
COMPARISON_COLUMNS = ["data", "img_size", "model", "arch", "baseline", "params_m", "gmacs", "img_per_s", "top1",
                      "delta_top1_vs_baseline", "paper_params_m", "paper_gmacs", "paper_top1",
                      "paper_delta_top1_vs_baseline", "epochs", "device", "run_dir"]
NO_RUN = "(no run)"


def collect_runs(runs_root: str | os.PathLike) -> list[dict]:
    """Completed runs under `runs_root`, at any depth. Of the runs `tnt ablate` made only its baselines count:
    the variants are compared in their own ablation tables."""
    from tntcli.runs import find_runs

    records = []
    for rec in find_runs(runs_root):
        if rec.get("status") != "completed" or rec.get("best_top1") is None:
            continue
        if rec["ablation"] is not None and "baseline" not in rec["ablation"].get("variants", []):
            continue
        records.append(rec)
    return records


def comparison_table(records: list[dict]) -> pd.DataFrame:
    """The best run per (data, image size, model, architecture), each TNT row followed by its same-size DeiT
    baseline, then the paper's models nobody ran (paper figures only)."""
    from tntcli.paper import paper_figures

    best: dict[tuple, dict] = {}
    for rec in records:
        key = (str(rec.get("data")), int(rec["img_size"]), rec["model"], arch_text(rec["arch"]))
        if key not in best or rec["best_top1"] > best[key]["best_top1"]:
            best[key] = rec
    paper = paper_figures()["models"]
    rows = {key: {"data": key[0], "img_size": key[1], "model": key[2], "arch": key[3], "_arch": rec["arch"],
                  "params_m": rec.get("params_m"), "gmacs": rec.get("gmacs"),
                  "img_per_s": None if rec["img_per_s"] is None else round(rec["img_per_s"], 1),
                  "top1": rec["best_top1"], "epochs": rec.get("epochs_done"), "device": rec.get("device"),
                  "run_dir": rec["run_dir"]} for key, rec in best.items()}
    trained = {key[2] for key in best if key[3] == ""}
    for name in paper:
        if name not in trained:
            rows[(NO_RUN, 224, name, "")] = {"data": NO_RUN, "img_size": 224, "model": name, "arch": "", "_arch": {}}
    for row in rows.values():
        figures = paper.get(row["model"], {}) if row["arch"] == "" else {}
        row.update(paper_params_m=figures.get("params_m"), paper_gmacs=figures.get("gmacs"),
                   paper_top1=figures.get("top1"))
    df = pd.DataFrame(_pair_with_baselines(rows), columns=COMPARISON_COLUMNS)
    return df.astype({"img_size": "Int64", "epochs": "Int64"})


def _pair_with_baselines(rows: dict[tuple, dict]) -> list[dict]:
    """Rows grouped by (data, img_size); in each, TNT models by size, each followed by its DeiT baseline (the
    spec's baseline with the same overrides where DeiT has them), then whatever is left."""
    import dataclasses

    from tntcli.models.registry import FAMILIES, MODELS

    deit_keys = {f.name for f in dataclasses.fields(FAMILIES["deit"][1])}
    ordered: list[dict] = []
    for group in sorted({key[:2] for key in rows}, key=lambda g: (g[0] == NO_RUN, g)):
        keys = sorted((k for k in rows if k[:2] == group), key=lambda k: (_size(rows[k]), k[2], k[3]))
        used: set[tuple] = set()
        for key in keys:
            spec = MODELS.get(key[2])
            if spec is None or spec.family != "tnt" or spec.baseline is None:
                continue
            row = rows[key]
            row["baseline"] = spec.baseline
            base_key = (*group, spec.baseline, arch_text({k: v for k, v in row["_arch"].items() if k in deit_keys}))
            ordered.append(row)
            used.add(key)
            base = rows.get(base_key)
            if base is None:
                continue
            for ours, delta in (("top1", "delta_top1_vs_baseline"), ("paper_top1", "paper_delta_top1_vs_baseline")):
                if row.get(ours) is not None and base.get(ours) is not None:
                    row[delta] = round(row[ours] - base[ours], 2)
            if base_key not in used:          # a baseline shared by two TNT models follows the first
                ordered.append(base)
                used.add(base_key)
        ordered.extend(rows[k] for k in keys if k not in used)
    return ordered


def _size(row: dict) -> float:
    return row.get("params_m") or row.get("paper_params_m") or 0


def write_comparison(runs_root: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """comparison.md/.csv, its top-1 vs GMACs plot and the training curves of the compared runs, rebuilt from
    the run folders under `runs_root` (these files are never edited by hand)."""
    from tntcli.errors import TntError
    from tntcli.paper import paper_figures

    records = collect_runs(runs_root)
    if not records:
        raise TntError(f"no completed runs under {runs_root} (a run folder holds summary.json); train one with "
                       "`tnt train` or point --runs elsewhere")
    df = comparison_table(records)
    footnotes = [
        f"Ours: the best completed run per data set, image size, model and architecture under `{runs_root}` "
        "(ablation variants excluded). top1 = best_top1 of summary.json (model or EMA weights).",
        "img_per_s = measured training throughput: median over epochs of metrics.csv img_per_s (data loading "
        "included), on the device shown; machines shared with other jobs give noisy figures.",
        "arch: overrides of the named architecture (model.arch); empty = the architecture as named. "
        "Each TNT row is followed by its same-size DeiT baseline (same data, size and overrides) where one was run.",
        "paper_* = the paper's printed ImageNet figures at 224px (Sec. 3.2, TNT on ImageNet), not ours; shown only "
        f"for unmodified architectures. Rows with data '{NO_RUN}' have paper figures only.",
    ]
    out = Path(out)
    written = write_table(df, out, "comparison", "TNT vs DeiT: our runs beside the paper", footnotes)
    ours = df[df.top1.notna()]
    series = {"paper (ImageNet 224px)": [(name, f.get("gmacs"), f.get("top1"))
                                         for name, f in paper_figures()["models"].items()]}
    for (data, size), group in ours.groupby(["data", "img_size"], sort=False):
        series[f"ours ({Path(data).name}, {size}px)"] = [
            (r.model + ("*" if r.arch else ""), r.gmacs, r.top1) for r in group.itertuples()]
    written += plot_top1_vs_gmacs(series, out / "comparison",
                                  "top-1 vs GMACs (* = modified architecture; ours and the paper's are on "
                                  "different data)")
    shown = set(ours.run_dir)
    written += plot_training_curves({f"{rec['model']} [{Path(rec['run_dir']).name}]": rec["history"]
                                     for rec in records if rec["run_dir"] in shown}, out / "comparison-curves")
    return written
