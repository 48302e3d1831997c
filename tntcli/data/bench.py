"""Loader throughput: the FFCV train loader vs the torchvision DataLoader on the same images.

Both sides go through `build_loaders` with the same image size, batch size, workers and augmentations
(RandomResizedCrop + flip + normalise, RandAugment on in both or off in both; erasing and MixUp/CutMix off)
and the timed loop includes `batch_augment`, which is where the FFCV path applies RandAugment. One warm-up
epoch each (numba compilation, worker start-up) is not timed; the timed epochs alternate between the two
so drifts in machine load hit both alike.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tntcli.data.augment import AugmentSettings
from tntcli.errors import TntError

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


@dataclass
class BenchResult:
    settings: dict
    images_per_s: dict[str, list[float]] = field(default_factory=dict)  # loader name -> one rate per repeat

    def median(self, name: str) -> float:
        return statistics.median(self.images_per_s[name])

    @property
    def ratio(self) -> float:
        return self.median("ffcv") / self.median("torchvision")


def bench_augment(rand_augment: bool) -> AugmentSettings:
    return AugmentSettings(rand_augment=RAND_AUGMENT if rand_augment else None, random_erasing=0.0,
                           mixup=0.0, cutmix=0.0)


def ensure_beton(data: str, cache_dir: Path, *, data_root: str | None, workers: int) -> Path:
    """The `.beton` pair for `data` in `cache_dir`, written (jpg mode, quality 90) on first use."""
    from tntcli.data.ffcv import write_beton
    from tntcli.data.beton import beton_pair

    cache_dir.mkdir(parents=True, exist_ok=True)
    name = Path(data.rstrip("/")).name or "data"
    beton = cache_dir / f"{name}.beton"
    if not all(p.is_file() for p in beton_pair(beton)):
        write_beton(data, beton, write_mode="jpg", jpeg_quality=90, num_workers=workers, data_root=data_root)
    return beton


def _epoch_rate(loaders, epochs: int) -> float:
    images, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch, labels in loaders.train:
            batch, _ = loaders.batch_augment(batch, labels)
            images += len(batch)
    return images / (time.perf_counter() - start)


def run_bench(data: str, *, data_root: str | None = None, img_size: int = 112, batch_size: int = 128,
              workers: int = 2, repeats: int = 3, epochs: int = 1, rand_augment: bool = False,
              cache_dir: str | Path | None = None) -> BenchResult:
    """images/s of both loaders over `repeats` alternating rounds of `epochs` train epochs each."""
    from tntcli.data import build_loaders

    if data.endswith(".beton"):
        raise TntError("bench needs the source images (a folder or dataset name), not a .beton: it writes its own")
    if repeats < 1 or epochs < 1:
        raise TntError("--repeats and --epochs must be at least 1")
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "tnt-bench"
    beton = ensure_beton(data, cache, data_root=data_root, workers=workers)
    common = dict(img_size=img_size, batch_size=batch_size, workers=workers, aug=bench_augment(rand_augment),
                  data_root=data_root)
    # torchvision first: its workers fork before numba starts threads (numba's TBB layer warns otherwise)
    all_loaders = {"torchvision": build_loaders(data, **common)}
    _epoch_rate(all_loaders["torchvision"], 1)  # warm-up: starts the persistent workers
    all_loaders["ffcv"] = build_loaders(str(beton), **common)
    result = BenchResult(settings=dict(data=data, img_size=img_size, batch_size=batch_size, workers=workers,
                                       rand_augment=rand_augment, repeats=repeats, epochs=epochs,
                                       images=all_loaders["torchvision"].n_train))
    try:
        _epoch_rate(all_loaders["ffcv"], 1)  # warm-up: numba compilation
        for _ in range(repeats):
            for name, loaders in all_loaders.items():
                result.images_per_s.setdefault(name, []).append(_epoch_rate(loaders, epochs))
    finally:
        for loaders in all_loaders.values():
            loaders.close()
    return result


def print_result(result: BenchResult, console) -> None:
    from rich.table import Table

    s = result.settings
    table = Table(title=f"train loader throughput: {s['data']} ({s['images']} images), {s['img_size']}px, "
                        f"batch {s['batch_size']}, {s['workers']} workers, RandAugment "
                        f"{'on' if s['rand_augment'] else 'off'}")
    table.add_column("loader")
    table.add_column("median img/s", justify="right")
    table.add_column("runs img/s", justify="right")
    for name, rates in result.images_per_s.items():
        table.add_row(name, f"{result.median(name):,.0f}", ", ".join(f"{r:,.0f}" for r in rates))
    console.print(table)
    console.print(f"ffcv / torchvision = {result.ratio:.2f}x")
