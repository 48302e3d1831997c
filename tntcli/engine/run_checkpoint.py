"""Training checkpoints that survive kills: atomic writes, a checksum beside each file, one previous copy kept.

Saving `last.pt`: serialise, write a temp file (fsynced, `fsio.atomic_write`), move the current pair to
`last.prev.pt(.sha256)`, then rename the new file into place and write its checksum (also atomically). A kill at
any moment leaves either a complete new file, or the previous one (tested by failing each file operation of a
save in turn). Loading verifies the checksum and falls back to the previous file when the newest is unreadable or
does not match.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from tntcli.errors import TntError
from tntcli.fsio import atomic_write_bytes, atomic_write_text


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _prev_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_verified(record: dict[str, Any], path: str | os.PathLike, keep_previous: bool = True) -> Path:
    path = Path(path)
    blob = _serialise(record)

    def keep_current_as_previous() -> None:           # runs once the new file is on disk, before it replaces
        # Order matters: after every single step a checkpoint file sits beside its own checksum or beside none
        # (then it is read unverified: it was written complete and fsynced), never beside another file's.
        digest, prev = _digest_path(path), _prev_path(path)
        if keep_previous and path.exists():
            _digest_path(prev).unlink(missing_ok=True)
            os.replace(path, prev)
            if digest.exists():
                os.replace(digest, _digest_path(prev))
        digest.unlink(missing_ok=True)                 # the old checksum must not judge the new file

    atomic_write_bytes(path, blob, before_replace=keep_current_as_previous)
    atomic_write_text(_digest_path(path), hashlib.sha256(blob).hexdigest() + "\n")
    return path


def _serialise(record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(record, buffer)
    return buffer.getvalue()


def _read_verified(path: Path) -> dict[str, Any]:
    blob = path.read_bytes()
    digest_file = _digest_path(path)
    if digest_file.exists() and digest_file.read_text().strip() != hashlib.sha256(blob).hexdigest():
        raise ValueError("checksum mismatch")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)


def load_verified(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The newest readable checkpoint among `path` and its previous copy: (record, file it came from)."""
    path = Path(path)
    problems = []
    for candidate in (path, _prev_path(path)):
        if not candidate.exists():
            continue
        try:
            record = _read_verified(candidate)
        except Exception as err:  # torn, truncated or bit-flipped file: try the previous copy
            problems.append(f"{candidate.name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            continue
        if problems:
            warnings.warn(f"{problems[0]}; resumed from {candidate.name} instead")
        return record, candidate
    if problems:
        raise TntError(f"no readable checkpoint in {path.parent} ({'; '.join(problems)})")
    raise TntError(f"no checkpoint to resume from: {path} does not exist")
