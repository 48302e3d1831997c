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
