"""Atomic file writes: readers (and a process killed mid-write) see the old file or the new one, never a torn one.

Every file `tnt` writes goes through `atomic_write`: results tables, plots, run records, checkpoints."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False,
                 before_replace: Callable[[], None] | None = None) -> Path:
    """Call `write(f)` on a temp file beside `path`, fsync, then rename it over `path`.

    `before_replace` runs once the new content is safely on disk, just before the rename (e.g. to keep the
    current file as a previous copy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)                       # mkstemp's 0600 would hide results from group members
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes,
                       before_replace: Callable[[], None] | None = None) -> Path:
    return atomic_write(path, lambda f: f.write(data), binary=True, before_replace=before_replace)
