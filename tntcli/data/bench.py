"""Loader throughput: the FFCV train loader vs the torchvision DataLoader on the same images.

Both sides go through `build_loaders` with the same image size, batch size, workers, device and
augmentation: a recipe's full train augmentation (`recipe="tnt-s-imagenet"`: crop, flip, RandAugment,
erasing, MixUp/CutMix), the same without RandAugment, or crop + flip with RandAugment on or off. The timed
loop includes `batch_augment` (MixUp/CutMix). One warm-up epoch each (numba compilation, worker start-up) is
not timed; the timed epochs alternate between the two so drifts in machine load hit both alike. `append_csv`
adds one row per loader to `results/data_bench.csv` (columns `CSV_COLUMNS`).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tntcli.config import AugmentSettings
from tntcli.errors import TntError

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
CSV_COLUMNS = ("loader", "augment", "device", "workers", "batch", "img_per_s")


@dataclass
class BenchResult:
    settings: dict
    images_per_s: dict[str, list[float]] = field(default_factory=dict)  # loader name -> one rate per repeat

    def median(self, name: str) -> float:
        return statistics.median(self.images_per_s[name])

    @property
    def ratio(self) -> float:
        return self.median("ffcv") / self.median("torchvision")


def bench_augment(rand_augment: bool | None, recipe: str | None = None,
                  data: str = "digits") -> tuple[AugmentSettings, str]:
    """(settings, label): the recipe's `aug` section, or crop + flip (+ RandAugment) without a recipe.

    With a recipe, `rand_augment=False` drops the recipe's RandAugment and keeps the rest (erasing, MixUp/CutMix):
    the row that shows what the two loaders' ratio would be if RandAugment cost nothing. None or True keep it.
    """
    if recipe:
        from tntcli.config import build_config, load_recipe

        aug = build_config(load_recipe(recipe), {"data.data": data}).aug
        if rand_augment is False and aug.rand_augment:
            return dataclasses.replace(aug, rand_augment=None), f"recipe {recipe} without RandAugment"
        return aug, f"recipe {recipe}"
    aug = AugmentSettings(rand_augment=RAND_AUGMENT if rand_augment else None, random_erasing=0.0,
                          mixup=0.0, cutmix=0.0)
    return aug, "crop+flip" + (f"+{RAND_AUGMENT}" if rand_augment else "")


def device_label(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{device.type} ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"


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
              workers: int = 2, repeats: int = 3, epochs: int = 1, rand_augment: bool | None = None,
              recipe: str | None = None, device: str = "cpu", cache_dir: str | Path | None = None) -> BenchResult:
    """images/s of both loaders over `repeats` alternating rounds of `epochs` train epochs each."""
    from tntcli.data import build_loaders

    if data.endswith(".beton"):
        raise TntError("bench needs the source images (a folder or dataset name), not a .beton: it writes its own")
    if repeats < 1 or epochs < 1:
        raise TntError("--repeats and --epochs must be at least 1")
    import torch

    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise TntError(f"--device {device}: not usable here ({str(err).splitlines()[0]})") from None
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "tnt-bench"
    beton = ensure_beton(data, cache, data_root=data_root, workers=workers)
    aug, augment_label = bench_augment(rand_augment, recipe, data)
    common = dict(img_size=img_size, batch_size=batch_size, workers=workers, aug=aug, data_root=data_root,
                  device=device)
    # torchvision first: its workers fork before numba starts threads (numba's TBB layer warns otherwise)
    all_loaders = {"torchvision": build_loaders(data, **common)}
    _epoch_rate(all_loaders["torchvision"], 1)  # warm-up: starts the persistent workers
    all_loaders["ffcv"] = build_loaders(str(beton), **common)
    result = BenchResult(settings=dict(data=data, img_size=img_size, batch_size=batch_size, workers=workers,
                                       augment=augment_label, device=device_label(device), repeats=repeats,
                                       epochs=epochs, images=all_loaders["torchvision"].n_train))
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
                        f"batch {s['batch_size']}, {s['workers']} workers, {s['augment']}, {s['device']}")
    table.add_column("loader")
    table.add_column("median img/s", justify="right")
    table.add_column("runs img/s", justify="right")
    for name, rates in result.images_per_s.items():
        table.add_row(name, f"{result.median(name):,.0f}", ", ".join(f"{r:,.0f}" for r in rates))
    console.print(table)
    console.print(f"ffcv / torchvision = {result.ratio:.2f}x")


def append_csv(result: BenchResult, results_dir: str | Path) -> Path:
    """Append one row per loader (median img/s) to `results_dir/data_bench.csv`, atomically, under the results
    folder's lock (two benches finishing together keep both their rows)."""
    from tntcli.results import atomic_write_text, locked

    path = Path(results_dir) / "data_bench.csv"
    with locked(results_dir):
        old = path.read_text() if path.is_file() else ""
        if old and old.splitlines()[0].split(",") != list(CSV_COLUMNS):
            raise TntError(f"{path} has other columns than {', '.join(CSV_COLUMNS)}; move it away first")
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        if not old:
            writer.writerow(CSV_COLUMNS)
        s = result.settings
        for name in result.images_per_s:
            writer.writerow([name, s["augment"], s["device"], s["workers"], s["batch_size"],
                             f"{result.median(name):.1f}"])
        return atomic_write_text(path, old + ("" if not old or old.endswith("\n") else "\n") + out.getvalue())
