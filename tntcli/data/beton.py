"""`.beton` file conventions and the `ffcv` availability check, shared by `sources` (reading `--data`) and
`ffcv` (writing and loading) so neither imports the other's module at import time."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tntcli.errors import TntError

INSTALL_HINT = ("the ffcv extra is not installed: run `make ffcv` (apt-get install pkg-config libturbojpeg0-dev "
                "libopencv-dev, then pip install ffcv)")


def ffcv_available() -> bool:
    try:
        import ffcv  # noqa: F401
        from ffcv.loader import Loader  # noqa: F401  (imports numba + the compiled extension)
    except Exception:  # ImportError, or a broken native build
        return False
    return True


def require_ffcv() -> None:
    if not ffcv_available():
        raise TntError(INSTALL_HINT)


def beton_pair(path: str | os.PathLike) -> tuple[Path, Path]:
    """`X.beton` -> (`X-train.beton`, `X-val.beton`)."""
    p = Path(path)
    stem = p.name[: -len(".beton")]
    return p.with_name(f"{stem}-train.beton"), p.with_name(f"{stem}-val.beton")


def sidecar_path(beton: Path) -> Path:
    """The `<file>.json` beside a .beton: class names and sample count."""
    return beton.with_name(beton.name + ".json")


def beton_classes(beton: Path) -> list[str]:
    """Class names from the sidecar, else "0".."K-1" from the labels stored in the file."""
    sidecar = sidecar_path(beton)
    if sidecar.is_file():
        return list(json.loads(sidecar.read_text())["classes"])
    beton_reader = reader(beton)
    labels = (beton_reader.metadata["label"] if "label" in beton_reader.field_names
              else np.zeros(1, dtype=np.int64))
    return [str(i) for i in range(int(labels.max()) + 1)]


def reader(beton: Path):
    """ffcv's `Reader` for `beton`; an unreadable file is a `TntError`."""
    from ffcv.reader import Reader

    try:
        return Reader(str(beton))
    except Exception as err:
        raise TntError(f"{beton} is not a readable .beton file ({type(err).__name__}: {err})") from None
