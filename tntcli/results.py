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
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())   # labelled minor ticks overlap on a short log axis
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(5))     # small GMAC values would crowd the default ticks
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def data_label(data: str | None) -> str:
    """A portable name for a run's data: `cifar10`/`digits` as named, else the folder or .beton stem (never a
    machine's absolute path): /data/cifar10-5k -> cifar10-5k, out/imnet.beton -> imnet."""
    from tntcli.data.sources import NAMED_DATASETS

    data = data or "data"
    if data.lower() in (*NAMED_DATASETS, "digits"):
        return data.lower()
    return Path(data.rstrip("/")).name.removesuffix(".beton") or "data"


def relative_to_root(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """`path` relative to `root` (a run folder in tables: relative to the --runs folder); its name otherwise."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return path.name


def folder_label(path: str | os.PathLike) -> str:
    """How a folder given on the command line is named in committed text: as given when relative, relative to
    the working directory when under it, else only its name."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return f".../{path.name}"


def arch_text(arch: dict) -> str:
    """Architecture overrides as one short string; '' is the named architecture as it is."""
    import json

    return " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(arch.items()))


# ----------------------------------------------------------------------------------------------- comparison
COMPARISON_COLUMNS = ["data", "img_size", "model", "arch", "baseline", "params_m", "gmacs", "img_per_s", "top1",
                      "top1_mean", "top1_std", "n_seeds", "delta_top1_vs_baseline", "delta_ci95_low",
                      "delta_ci95_high", "verdict", "paper_params_m", "paper_gmacs", "paper_top1",
                      "paper_delta_top1_vs_baseline", "paper_note", "epochs", "seeds", "device", "run_dir"]
NO_RUN = "(no run)"


def collect_runs(runs_root: str | os.PathLike) -> list[dict]:
    """Completed training runs under `runs_root`, at any depth. Fine-tuning runs (`model.pretrained` set: `tnt
    transfer`) belong to the transfer table, and of the runs `tnt ablate` made only its baselines and same-size DeiTs
    (--vs-deit) count: the variants are compared in their own ablation tables."""
    from tntcli.runs import find_runs

    records = []
    for rec in find_runs(runs_root):
        if rec.get("status") != "completed" or rec.get("best_top1") is None or rec.get("pretrained"):
            continue
        if rec["ablation"] is not None and not {"baseline", "deit"} & set(rec["ablation"].get("variants", [])):
            continue
        rec["mtime"] = (Path(rec["run_dir"]) / "summary.json").stat().st_mtime
        records.append(rec)
    return records


def _latest_per_seed(records: list[dict]) -> dict[int, dict]:
    """seed -> the most recently finished run with that seed (a rerun replaces, no run is picked by its score)."""
    out: dict[int, dict] = {}
    for rec in sorted(records, key=lambda r: r["mtime"]):
        out[int(rec.get("seed") or 0)] = rec
    return dict(sorted(out.items()))


def comparison_table(records: list[dict], runs_root: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per (data, image size, epochs, model, architecture): top-1 mean and std over its seeds, each TNT row
    followed by its same-size DeiT baseline with the seed-paired delta, then the paper's models nobody ran (paper
    figures only). Paper figures stand beside ours only for runs in the paper's setting."""
    from tntcli import stats
    from tntcli.paper import paper_figures, setting_gap

    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        key = (data_label(rec.get("data")), int(rec["img_size"]), int(rec.get("epochs_done") or 0), rec["model"],
               arch_text(rec["arch"]))
        groups.setdefault(key, []).append(rec)
    paper = paper_figures()["models"]
    rows = {}
    for key, recs in groups.items():
        by_seed = _latest_per_seed(recs)
        spread = stats.spread([r["best_top1"] for r in by_seed.values()])
        first = next(iter(by_seed.values()))
        speeds = pd.Series([r.get("img_per_s") for r in by_seed.values()], dtype=float).dropna()
        gap = setting_gap(key[3], first["arch"], key[1], key[0], first.get("num_classes"))
        figures = paper.get(key[3], {}) if gap is None else {}
        rows[key] = {"data": key[0], "img_size": key[1], "model": key[3], "arch": key[4], "_arch": first["arch"],
                     "_by_seed": by_seed, "params_m": first.get("params_m"), "gmacs": first.get("gmacs"),
                     "img_per_s": round(float(speeds.median()), 1) if len(speeds) else None,
                     "top1": round(spread.mean, 2), "top1_mean": round(spread.mean, 2),
                     "top1_std": None if spread.n < 2 else round(spread.std, 2), "n_seeds": spread.n,
                     "paper_params_m": figures.get("params_m"), "paper_gmacs": figures.get("gmacs"),
                     "paper_top1": figures.get("top1"), "paper_note": gap or "",
                     "epochs": key[2], "seeds": " ".join(map(str, by_seed)),
                     "device": ", ".join(sorted({str(r.get("device")) for r in by_seed.values()})),
                     "run_dir": ";".join(relative_to_root(r["run_dir"], runs_root) if runs_root else r["run_dir"]
                                         for r in by_seed.values())}
    trained = {key[3] for key in groups if key[4] == "" and rows[key]["paper_note"] == ""}
    for name, figures in paper.items():
        if name not in trained:
            rows[(NO_RUN, 224, 0, name, "")] = {
                "data": NO_RUN, "img_size": 224, "model": name, "arch": "", "_arch": {},
                "paper_params_m": figures.get("params_m"), "paper_gmacs": figures.get("gmacs"),
                "paper_top1": figures.get("top1"), "paper_note": f"the paper's figure only ({figures.get('table')})"}
    df = pd.DataFrame(_pair_with_baselines(rows), columns=COMPARISON_COLUMNS)
    return df.astype({"img_size": "Int64", "epochs": "Int64", "n_seeds": "Int64"})


def _pair_with_baselines(rows: dict[tuple, dict]) -> list[dict]:
    """Rows grouped by (data, img_size, epochs); in each, TNT models by size, each followed by its DeiT baseline
    (the spec's baseline with the same overrides where DeiT has them), then whatever is left."""
    import dataclasses

    from tntcli import stats
    from tntcli.models.registry import FAMILIES, MODELS
    from tntcli.seeds import paired_correct

    deit_keys = {f.name for f in dataclasses.fields(FAMILIES["deit"][1])}
    ordered: list[dict] = []
    for group in sorted({key[:3] for key in rows}, key=lambda g: (g[0] == NO_RUN, g)):
        keys = sorted((k for k in rows if k[:3] == group), key=lambda k: (_size(rows[k]), k[3], k[4]))
        used: set[tuple] = set()
        for key in keys:
            spec = MODELS.get(key[3])
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
            if "_by_seed" in row and "_by_seed" in base:
                ours, theirs = row["_by_seed"], base["_by_seed"]
                shared = sorted(set(ours) & set(theirs))
                correct = paired_correct(ours[shared[0]]["run_dir"], theirs[shared[0]]["run_dir"]) \
                    if len(shared) == 1 else None
                delta = stats.paired_delta({s: r["best_top1"] for s, r in ours.items()},
                                           {s: r["best_top1"] for s, r in theirs.items()}, correct)
                row.update(delta_top1_vs_baseline=_round(delta.delta), delta_ci95_low=_round(delta.low),
                           delta_ci95_high=_round(delta.high), verdict=delta.verdict)
            if row.get("paper_top1") is not None and base.get("paper_top1") is not None:
                row["paper_delta_top1_vs_baseline"] = round(row["paper_top1"] - base["paper_top1"], 2)
            if base_key not in used:          # a baseline shared by two TNT models follows the first
                ordered.append(base)
                used.add(base_key)
        ordered.extend(rows[k] for k in keys if k not in used)
    return ordered


def _round(value: float) -> float | None:
    return None if value != value else round(value, 2)       # NaN -> empty cell


def _size(row: dict) -> float:
    return row.get("params_m") or row.get("paper_params_m") or 0


def plot_comparison(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """top-1 vs GMACs: one panel per data set, image size and schedule of ours (mean ± std over seeds), and the
    paper's ImageNet figures on a panel of their own: never two settings on one axis."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    ours = df[df.top1.notna()]
    groups = list(ours.groupby(["data", "img_size", "epochs"], sort=False))
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(5.2 * (len(groups) + 1), 4.2), squeeze=False)
    for ax, ((data, size, epochs), group) in zip(axes[0], groups):
        for r in group.itertuples():
            label = r.model + ("*" if r.arch else "")
            ax.errorbar([r.gmacs], [r.top1], yerr=[0 if pd.isna(r.top1_std) else r.top1_std], fmt="o", capsize=4,
                        label=f"{label} (n={r.n_seeds})")
        ax.set_title(f"ours: {data}, {size}px, {epochs} epochs\n(mean ± std over seeds; * = modified arch)",
                     fontsize=9)
        ax.set(xlabel="GMACs per image", ylabel="val top-1 (%)")
        ax.xaxis.set_major_locator(MaxNLocator(4))       # tiny GMAC values would crowd the default ticks
        ax.margins(x=0.25)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    paper = df[df.paper_top1.notna()].drop_duplicates("model")
    draw_top1_vs_gmacs(ax, {"paper": [(r.model, r.paper_gmacs, r.paper_top1) for r in paper.itertuples()]})
    ax.set_title("the paper: ImageNet-1k, 224px, 300 epochs\n(printed figures, one run each)", fontsize=9)
    fig.tight_layout()
    try:
        return save_figure(fig, stem)
    finally:
        plt.close(fig)


def write_comparison(runs_root: str | os.PathLike, out: str | os.PathLike) -> list[Path]:
    """comparison.md/.csv, its top-1 vs GMACs plot and the training curves of the compared runs, rebuilt from
    the run folders under `runs_root` (these files are never edited by hand)."""
    from tntcli.errors import TntError

    records = collect_runs(runs_root)
    if not records:
        raise TntError(f"no completed training runs under {runs_root} (a run folder holds summary.json); train "
                       "one with `tnt train` or point --runs elsewhere")
    df = comparison_table(records, runs_root)
    footnotes = [
        f"Ours: completed training runs under `{folder_label(runs_root)}`, one row per data set, image size, "
        "epochs, model and architecture (fine-tuning runs: `tnt transfer --table`; ablation variants: their "
        "ablation tables). Per seed the most recently finished run counts.",
        "top1 = top1_mean = mean over seeds of best_top1 (summary.json; model or EMA weights); top1_std = sample "
        "std over seeds (empty for one seed).",
        "delta_top1_vs_baseline = mean over seeds of (TNT - DeiT) with the same seed; delta_ci95_low/high: its "
        "95% interval (Student t over seeds; with one seed a paired bootstrap over validation images from "
        "val_predictions.csv); verdict: better / worse when the interval excludes 0, else within noise.",
        "img_per_s = measured training throughput: median over seeds of the median over epochs of metrics.csv "
        "img_per_s (data loading included), on the device shown; a shared machine makes it noisy.",
        "arch: overrides of the named architecture (model.arch); empty = the architecture as named. Each TNT row "
        "is followed by its same-size DeiT baseline (same data, size, epochs and overrides) where one was run.",
        "paper_* = the paper's printed ImageNet-1k figures at 224px (Table 4), not ours: beside a run only when "
        "that run is in the paper's setting (unmodified model, 224px, ImageNet-1k), else paper_note says why "
        f"not. Rows with data '{NO_RUN}' list the paper's figures only.",
        "run_dir: run folders relative to the --runs folder, `;`-separated by seed. Rebuilt by `tnt results`.",
    ]
    out = Path(out)
    written = write_table(df, out, "comparison", "TNT vs DeiT: our runs over seeds, the paper's where comparable",
                          footnotes)
    written += plot_comparison(df, out / "comparison")
    shown = {r["run_dir"] for rec_row in df.run_dir.dropna() for r in records
             if relative_to_root(r["run_dir"], runs_root) in str(rec_row).split(";")}
    written += plot_training_curves({f"{rec['model']} seed {rec.get('seed')} [{data_label(rec.get('data'))}]":
                                     rec["history"] for rec in records if rec["run_dir"] in shown},
                                    out / "comparison-curves")
    return written
