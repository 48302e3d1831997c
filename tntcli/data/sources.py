"""Resolve the one `--data` option every subcommand takes into a `DataSource`.

Accepted values, tried in this order:

1. `PATH.beton` -> FFCV. Convention: `--data out/cifar.beton` means the pair `out/cifar-train.beton` +
   `out/cifar-val.beton` (what `tnt data write SRC out/cifar.beton` produces from a source with both splits).
   When only `out/cifar.beton` itself exists (written from a plain class-folder root), it serves as both the
   train and the val split, which is meant for evaluation. Class names come from the `<file>.json` sidecar
   that `write_beton` writes next to each file (else they are "0".."K-1").
2. `digits` -> scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), as RGB, split
   80/20 stratified with a fixed seed. The offline quickstart dataset.
3. `cifar10`, `cifar100`, `flowers102`, `pets` -> torchvision datasets under `data_root` (default `./data`),
   downloaded when missing and the network allows.
4. a folder with `train/` and `val/` ImageFolder subfolders (`<split>/<class>/<image>`); both splits must
   list the same classes. For evaluation (`eval_only`) `val/` alone will do, or a `<class>/<image>` root
   (as timm's validate.py), and `X.beton` needs only `X-val.beton`.

Image files are checked when the source is resolved (header + JPEG/PNG end marker, a full decode only for
suspicious files); unreadable ones are skipped with one warning that names them and counts them, or raise
`TntError` under `strict=True`. Every image is returned as 8-bit RGB whatever its mode (L, P, CMYK, RGBA,
16-bit...).
"""
from __future__ import annotations

import os
import shutil
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from tntcli.data.beton import beton_classes, beton_pair, require_ffcv
from tntcli.errors import TntError, TntWarning

NAMED_DATASETS = ("cifar10", "cifar100", "flowers102", "pets")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGITS_SPLIT_SEED = 0
_DOWNLOAD_TIMEOUT_S = 30
_WARN_LIST_MAX = 10


@dataclass
class DataSource:
    """What `--data` named. Map-style splits return `(PIL RGB image, int label)`; FFCV sources have paths."""

    kind: str                      # "ffcv" | "folder" | "torchvision" | "digits"
    name: str                      # the --data value as given
    classes: list[str]
    train: Sequence | None = None  # indexable datasets (None for ffcv)
    val: Sequence | None = None
    train_path: Path | None = None  # .beton files (ffcv only)
    val_path: Path | None = None
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (relative paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_ffcv(self) -> bool:
        return self.kind == "ffcv"


def resolve_source(data: str, data_root: str | None = None, *, strict: bool = False,
                   eval_only: bool = False) -> DataSource:
    """Turn a `--data` value into a `DataSource` (see the module docstring); user mistakes raise `TntError`.

    `eval_only`: the caller reads the val split alone, so an image folder's train/ files are not checked (at
    ImageNet scale that scan is the slow part of start-up); `train` then aliases `val`."""
    if not data:
        raise TntError("--data is empty: give a folder with train/ and val/, a .beton, digits or one of "
                       + ", ".join(NAMED_DATASETS))
    if data.endswith(".beton"):
        return _beton_source(data, eval_only=eval_only)
    if data.lower() == "digits":
        return digits_source()
    if data.lower() in NAMED_DATASETS:
        return torchvision_source(data.lower(), data_root or "./data")
    return folder_source(data, strict=strict, eval_only=eval_only)


# ------------------------------------------------------------------------------------------------ images
def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; 16/32-bit integer and float images are rescaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        arr = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max(initial=0)
        top = 1.0 if img.mode == "F" and peak <= 1.0 else (255.0 if peak <= 255 else 65535.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's "palette with transparency" warning
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def check_image(path: Path) -> str | None:
    """Why `path` is not a readable image, or None. Cheap: header + end marker; decodes only when in doubt."""
    try:
        with Image.open(path) as img:
            fmt = img.format
            if _has_end_marker(path, fmt):
                return None
            img.load()  # missing end marker: trailing bytes are legal, truncation is not; decode to tell
        return None
    except Exception as err:  # PIL raises many types for bad files
        return f"{type(err).__name__}: {err}".splitlines()[0][:120]


def _has_end_marker(path: Path, fmt: str | None) -> bool:
    tails = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
    if fmt not in tails:
        return False
    tail = tails[fmt]
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - len(tail)))
        return fh.read() == tail


# ----------------------------------------------------------------------------------------------- folders
class ImageFileDataset:
    """(path, label) samples; `__getitem__` gives (RGB PIL image, label). A file that became unreadable after
    the scan is replaced by the next sample with a warning (or raises under strict), so training never dies
    on one bad file."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], strict: bool = False):
        self.samples = samples
        self.classes = classes
        self.targets = [label for _, label in samples]
        self.strict = strict

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                return load_rgb(path), label
            except Exception as err:
                if self.strict:
                    raise TntError(f"unreadable image {path}: {err}") from None
                warnings.warn(f"skipping unreadable image {path} ({err}); --strict makes this an error",
                              TntWarning, stacklevel=2)
        raise TntError("no readable image left in the dataset")


def list_class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_class_folders(split_dir: Path, *, strict: bool = False,
                       classes: list[str] | None = None) -> tuple[ImageFileDataset, list[str]]:
    """ImageFolder-style scan of `split_dir/<class>/<file>` with every file checked. Returns the dataset and
    the skipped files (relative to split_dir's parent). Empty classes raise `TntError`.

    Large folders (>= MANIFEST_MIN_FILES files) keep the check's result in a manifest under the user cache
    (`scan_cache_dir()`), keyed by the listing (every file's path, size and mtime): the next start-up with an
    unchanged folder stats the files instead of opening them."""
    classes = classes if classes is not None else list_class_folders(split_dir)
    if not classes:
        raise TntError(f"{split_dir} has no class folders: expected {split_dir}/<class>/<image files>")
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        entries = sorted(_files_under(split_dir / name))
        if not entries:
            raise TntError(f"class folder {split_dir / name} is empty")
        files.extend((p, label) for p in entries)

    paths = [p for p, _ in files]
    problems = _checked_problems(split_dir, paths)
    base = split_dir.parent
    skipped = [f"{os.path.relpath(p, base)} ({why})" for p, why in zip(paths, problems) if why]
    samples = [(p, label) for (p, label), why in zip(files, problems) if not why]
    if skipped and strict:
        raise TntError(f"{len(skipped)} unreadable image file(s) under {split_dir}: "
                       + "; ".join(skipped[:_WARN_LIST_MAX]))
    present = {label for _, label in samples}
    for label, name in enumerate(classes):
        if label not in present:
            raise TntError(f"class folder {split_dir / name} has no readable image")
    return ImageFileDataset(samples, classes, strict), skipped


def _files_under(folder: Path) -> list[str]:
    """Every non-hidden file below `folder` (os.scandir: no stat per entry)."""
    out, stack = [], [str(folder)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append(entry.path)
                elif entry.is_file():
                    out.append(entry.path)
    return out


MANIFEST_MIN_FILES = 5000


def scan_cache_dir() -> Path:
    """Where folder-scan manifests live: $TNT_CACHE_DIR, else $XDG_CACHE_HOME/tnt, else ~/.cache/tnt."""
    root = os.environ.get("TNT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tnt"
    return Path(root) / "folder-scans"


def _checked_problems(split_dir: Path, paths: list[str]) -> list[str | None]:
    """`_file_problem` of every path, from a manifest when the listing is unchanged."""
    if len(paths) < MANIFEST_MIN_FILES:
        return _check_all(paths)
    import hashlib
    import json

    digest = hashlib.sha256(str(split_dir.resolve()).encode())
    listing = []
    for path in paths:             # a stat is ~100x cheaper than opening the file (page-cached metadata)
        st = os.stat(path)
        listing.append(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n")
    digest.update("".join(listing).encode())
    manifest = scan_cache_dir() / f"{digest.hexdigest()}.json"
    try:
        known = json.loads(manifest.read_text())
        return [known.get(p) for p in paths]
    except (OSError, ValueError):
        pass
    problems = _check_all(paths)
    try:
        from tntcli.fsio import atomic_write_text

        atomic_write_text(manifest, json.dumps({p: why for p, why in zip(paths, problems) if why}))
    except OSError:
        pass  # a read-only home only costs the next start-up its scan
    return problems


def _check_all(paths: list[str]) -> list[str | None]:
    with ThreadPoolExecutor(max_workers=8) as pool:  # I/O bound: threads overlap the opens
        return list(pool.map(_file_problem, paths))


def _file_problem(path: str) -> str | None:
    suffix = os.path.splitext(path)[1]
    if suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file type ({suffix or 'no extension'})"
    return check_image(Path(path))


def warn_skipped(skipped: list[str], where: str) -> None:
    """One `TntWarning` naming the files left out (the first ten) and the `--strict` flag."""
    if not skipped:
        return
    shown = "; ".join(skipped[:_WARN_LIST_MAX]) + ("; ..." if len(skipped) > _WARN_LIST_MAX else "")
    warnings.warn(f"left out {len(skipped)} unreadable file(s) under {where} (--strict makes this an error): "
                  f"{shown}", TntWarning, stacklevel=3)


def folder_source(data: str, *, strict: bool = False, eval_only: bool = False) -> DataSource:
    root = Path(data).expanduser()
    if not root.exists():
        raise TntError(f"--data {data}: no such file or folder (expected a folder with train/ and val/, "
                       f"a .beton, digits or one of {', '.join(NAMED_DATASETS)})")
    if not root.is_dir():
        raise TntError(f"--data {data} is a file; expected a folder with train/ and val/ or a .beton")
    if not any(root.iterdir()):
        raise TntError(f"--data {data} is an empty folder; expected {data}/train/<class>/* and {data}/val/<class>/*")
    if eval_only:
        return _eval_folder_source(data, root, strict)
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise TntError(f"--data {data} has no {' or '.join(s + '/' for s in missing)} subfolder; "
                       f"expected {data}/train/<class>/* and {data}/val/<class>/*")
    train_classes, val_classes = list_class_folders(root / "train"), list_class_folders(root / "val")
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise TntError(f"train/ and val/ under {data} list different classes: only in train: {only_train or '-'}; "
                       f"only in val: {only_val or '-'}")
    train, skipped_train = scan_class_folders(root / "train", strict=strict, classes=train_classes)
    val, skipped_val = scan_class_folders(root / "val", strict=strict, classes=train_classes)
    skipped = skipped_train + skipped_val
    warn_skipped(skipped, str(root))
    return DataSource("folder", data, train_classes, train=train, val=val, skipped=skipped)


def _eval_folder_source(data: str, root: Path, strict: bool) -> DataSource:
    """Evaluation data as timm's validate.py takes it: `root/val/<class>/*` (train/ may be absent and is never
    read), or `root/<class>/*` itself."""
    split = root / "val" if (root / "val").is_dir() else root
    if split == root and (root / "train").is_dir():
        raise TntError(f"--data {data} has train/ but no val/ subfolder; evaluation reads {data}/val/<class>/*")
    val, skipped = scan_class_folders(split, strict=strict)
    warn_skipped(skipped, str(root))
    return DataSource("folder", data, val.classes, train=val, val=val, skipped=skipped)


# ------------------------------------------------------------------------------------------------ digits
class ArrayImageDataset:
    """In-memory uint8 images (N, H, W, 3) + labels -> (PIL RGB, int)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str]):
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.targets = [int(t) for t in labels]
        self.classes = classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return Image.fromarray(self.images[index], "RGB"), self.targets[index]


def digits_source() -> DataSource:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    idx_train, idx_val = train_test_split(np.arange(len(rgb)), test_size=0.2, stratify=digits.target,
                                          random_state=DIGITS_SPLIT_SEED)
    classes = [str(c) for c in range(10)]
    return DataSource("digits", "digits", classes,
                      train=ArrayImageDataset(rgb[idx_train], digits.target[idx_train], classes),
                      val=ArrayImageDataset(rgb[idx_val], digits.target[idx_val], classes))


# ------------------------------------------------------------------------------------ torchvision named
class _RGBView:
    """Make every torchvision dataset item `(RGB PIL image, int)`."""

    def __init__(self, dataset, classes: list[str]):
        self.dataset = dataset
        self.classes = classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, label = self.dataset[index]
        return to_rgb(img), int(label)


def _named_splits(name: str, root: str) -> tuple[Callable, Callable, str]:
    """Builders for (train, val) given download=bool, and the folder torchvision uses under root."""
    from torch.utils.data import ConcatDataset
    from torchvision import datasets as tvd

    if name == "cifar10":
        return (lambda d: tvd.CIFAR10(root, train=True, download=d),
                lambda d: tvd.CIFAR10(root, train=False, download=d), "cifar-10-batches-py")
    if name == "cifar100":
        return (lambda d: tvd.CIFAR100(root, train=True, download=d),
                lambda d: tvd.CIFAR100(root, train=False, download=d), "cifar-100-python")
    if name == "flowers102":  # the usual transfer protocol: train on train+val, evaluate on test
        return (lambda d: ConcatDataset([tvd.Flowers102(root, split=s, download=d) for s in ("train", "val")]),
                lambda d: tvd.Flowers102(root, split="test", download=d), "flowers-102")
    return (lambda d: tvd.OxfordIIITPet(root, split="trainval", download=d),
            lambda d: tvd.OxfordIIITPet(root, split="test", download=d), "oxford-iiit-pet")


def _class_names(name: str, dataset) -> list[str]:
    inner = dataset.datasets[0] if hasattr(dataset, "datasets") else dataset
    if getattr(inner, "classes", None):
        return list(inner.classes)
    labels = inner._labels if hasattr(inner, "_labels") else []
    return [str(i) for i in range(max(labels) + 1)] if labels else []


def _missing_parents(folder: Path) -> list[Path]:
    """The outermost of `folder` and its ancestors that does not exist yet (what mkdir(parents=True) would
    create), as a list of zero or one path."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing = [path]
    return missing


def torchvision_source(name: str, root: str) -> DataSource:
    make_train, make_val, folder = _named_splits(name, root)
    expected = Path(root) / folder
    try:
        train, val = make_train(False), make_val(False)
    except Exception:  # not there yet: try the download (bounded, so no network means an error, not a hang)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
        created = _missing_parents(Path(root))
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train, val = make_train(True), make_val(True)
        except Exception as err:
            for folder in created:          # leave no empty ./data (or partial download) behind
                shutil.rmtree(folder, ignore_errors=True)
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:160]
            raise TntError(f"{name} is not at {expected} and could not be downloaded ({reason}); download it "
                           f"there by hand (torchvision layout) or pass --data-root") from None
        finally:
            socket.setdefaulttimeout(previous)
    classes = _class_names(name, train)
    return DataSource("torchvision", name, classes, train=_RGBView(train, classes), val=_RGBView(val, classes))


# ------------------------------------------------------------------------------------------------- ffcv
def _beton_source(data: str, eval_only: bool = False) -> DataSource:
    require_ffcv()
    single = Path(data).expanduser()
    train, val = beton_pair(single)
    if eval_only and val.is_file():   # the train file is neither needed nor opened
        train = val
    elif train.is_file() and val.is_file():
        pass
    elif single.is_file():
        train = val = single
    else:
        raise TntError(f"--data {data}: found neither {train.name} + {val.name} nor {single.name} in "
                       f"{single.parent} (write them with `tnt data write SRC {data}`)")
    return DataSource("ffcv", data, beton_classes(train), train_path=train, val_path=val)
