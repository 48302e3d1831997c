"""Writing tables and plots under results/: atomic replaces and a lock, so concurrent runs never tear a file."""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator

import pandas as pd


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temp file beside `path`, fsync, rename: a reader sees the old or the new file, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)                       # mkstemp's 0600 would hide results from group members
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def _pyplot():
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
        tmp = final.with_name(f".{final.name}.tmp")
        fig.savefig(tmp, format=ext, dpi=120, bbox_inches="tight")
        os.replace(tmp, final)
        written.append(final)
    return written


def plot_training_curves(histories: dict[str, list[dict]], stem: str | os.PathLike) -> list[Path]:
    """Train loss and val top-1 per epoch for one or more runs (label -> metrics rows)."""
    plt = _pyplot()
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
    try:
        return save_figure(fig, stem)
    finally:
        plt.close(fig)
