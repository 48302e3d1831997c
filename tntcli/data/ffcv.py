"""FFCV: write `.beton` files and build FFCV loaders. `ffcv` is imported lazily so everything else works
without it; a `.beton` path then fails with one line saying what to install.

Files: `write_beton(src, "out/x.beton")` writes `out/x-train.beton` + `out/x-val.beton` for a source with both
splits (a train/val folder, a named dataset, digits) or `out/x.beton` for a plain `<class>/<image>` folder,
each with a `<file>.json` sidecar holding the class names. Writes are atomic: a temp file in the same
folder, renamed at the end, removed on any failure.

Loaders (see `ffcv_loaders`): decoding, crop and flip run in FFCV's compiled (numba) pipeline into uint8
batches; RandAugment, normalisation and erasing then run batched on the batch's device (`ImagePipeline`). The
`Loader` objects live as long as `Loaders` (re-creating them leaks memory, ffcv issues 345/393). An epoch
cut short is stopped with `stop_epoch_iterator`, which lets FFCV's worker thread finish: leaving it running
makes the process abort at exit (code 134) in a good share of runs.

Determinism: the order is a pure function of (seed, epoch, rank); the crop/flip draws come from numba's
per-thread generators and are not reproducible; the `ImagePipeline` (RandAugment/erasing) and `batch_augment`
(MixUp/CutMix) draws are, from (seed, epoch, rank, step).
"""
from __future__ import annotations

import ctypes
import itertools
import json
import os
import queue
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tntcli.data.augment import IMAGE_STREAM, ImagePipeline, mix_seed
from tntcli.data.beton import beton_pair, reader, require_ffcv, sidecar_path
from tntcli.errors import TntError

WRITE_MODES = ("proportion", "jpg", "raw", "smart")
DEFAULT_MAX_RESOLUTION = 500   # ffcv-imagenet's longest side for ImageNet
DEFAULT_PAGE_SIZE = 1 << 23    # ffcv's DatasetWriter default (8 MiB)
_PAGE_OVERFLOW = re.compile(r"Tried allocating (\d+) but page size is (\d+)")
_STOP_TIMEOUT_S = 60.0


# ------------------------------------------------------------------------------------------- writing
def write_beton(src: str, out: str | os.PathLike, *, max_resolution: int | None = DEFAULT_MAX_RESOLUTION,
                jpeg_quality: int = 90, compress_probability: float = 0.5, write_mode: str = "proportion",
                num_workers: int | None = None, progress: bool = True, data_root: str | None = None,
                strict: bool = False, overwrite: bool = False) -> list[Path]:
    """Write `src` (ImageFolder root, class-folder root, named dataset or digits) to .beton; return the files.

    Defaults follow ffcv-imagenet: longest side at most 500 px (`max_resolution`; None or 0 keeps sizes),
    proportion mode with half the images JPEG-compressed at quality 90. The page size is chosen so that the
    largest raw image fits (`page_size_for`). Existing files are refused unless `overwrite`.
    """
    out = Path(out).expanduser()
    if out.suffix != ".beton":
        raise TntError(f"output {out} must end with .beton")
    if write_mode not in WRITE_MODES:
        raise TntError(f"write_mode {write_mode!r}: expected one of {', '.join(WRITE_MODES)}")
    if max_resolution is not None and max_resolution < 0:
        raise TntError(f"--max-resolution {max_resolution}: give a longest side in pixels, or 0 to keep sizes")
    splits = _source_splits(src, data_root, strict)  # user mistakes first: importing ffcv takes seconds
    targets = beton_pair(out) if len(splits) == 2 else (out,)
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise TntError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace")
    require_ffcv()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TntError(f"cannot create output folder {out.parent}: {err.strerror}") from None
    written = []
    for (_, dataset, classes), path in zip(splits, targets):
        fields = _fields(write_mode, max_resolution or None, jpeg_quality, compress_probability)
        _write_atomic(dataset, classes, path, fields, num_workers or os.cpu_count() or 1,
                      label=path.name if progress else None, page_size=page_size_for(max_resolution))
        written.append(path)
    return written


def page_size_for(max_resolution: int | None) -> int:
    """FFCV's page size (a power of two, >= its 8 MiB default) that holds a raw RGB image of
    `max_resolution` x `max_resolution`; the default when sizes are kept (None/0)."""
    if not max_resolution:
        return DEFAULT_PAGE_SIZE
    need = max_resolution * max_resolution * 3 + (1 << 16)   # + room for the sample's own header
    return max(DEFAULT_PAGE_SIZE, 1 << (need - 1).bit_length())


def _source_splits(src: str, data_root: str | None, strict: bool) -> list[tuple[str, Sequence, list[str]]]:
    from tntcli.data import sources

    root = Path(src).expanduser()
    is_class_root = root.is_dir() and not (root / "train").is_dir() and not (root / "val").is_dir()
    if is_class_root and any(p.is_dir() for p in root.iterdir()):
        dataset, skipped = sources.scan_class_folders(root, strict=strict)
        sources.warn_skipped(skipped, str(root))
        return [("all", dataset, dataset.classes)]
    if src.endswith(".beton"):
        raise TntError(f"{src} is already a .beton; give an image folder or a dataset name")
    source = sources.resolve_source(src, data_root, strict=strict)
    return [("train", source.train, source.classes), ("val", source.val, source.classes)]


def _fields(write_mode: str, max_resolution: int | None, jpeg_quality: int, compress_probability: float) -> dict:
    from ffcv.fields import IntField, RGBImageField

    return {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                                   compress_probability=compress_probability),
            "label": IntField()}


class _Items:
    """What DatasetWriter reads: (HxWx3 uint8 array, int label)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return _load_item(self.dataset, index)


def _load_item(dataset, index: int):
    img, label = dataset[index]
    return np.asarray(img, dtype=np.uint8), int(label)


def _write_atomic(dataset, classes: list[str], path: Path, fields: dict, num_workers: int, label: str | None,
                  page_size: int = DEFAULT_PAGE_SIZE):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_meta = sidecar_path(tmp)
    try:
        writer = _writer_class()(str(tmp), fields, num_workers=num_workers, progress_label=label,
                                 page_size=page_size)
        writer.from_indexed_dataset(_Items(dataset), chunksize=64)
        tmp_meta.write_text(json.dumps({"classes": list(classes), "num_samples": len(dataset)}))
        os.replace(tmp, path)
        os.replace(tmp_meta, sidecar_path(path))
    finally:
        for leftover in (tmp, tmp_meta):
            leftover.unlink(missing_ok=True)


def _write_failure(name: str, error: str) -> str:
    overflow = _PAGE_OVERFLOW.search(error)
    if overflow:
        size, page = (int(v) for v in overflow.groups())
        return (f"writing {name} failed: an image needs {size:,} bytes but a .beton page holds {page:,}; pass "
                f"--max-resolution (ImageNet: {DEFAULT_MAX_RESOLUTION}) to store large images smaller")
    return f"writing {name} failed: {error}"


def _guarded_worker(work_fn, errors, *args) -> None:
    """Run ffcv's writer job; report a failure as one line instead of a traceback and a silent hang."""
    try:
        work_fn(*args)
    except BaseException as err:  # noqa: BLE001 - the parent decides what to do
        errors.put(f"{type(err).__name__}: {err}".splitlines()[0])
        raise SystemExit(1) from None


def _writer_class():
    from ffcv.writer import DatasetWriter

    class Writer(DatasetWriter):
        """ffcv's DatasetWriter with a rich progress bar, and errors instead of a hang when a worker fails
        (the original waits forever for samples a dead worker will never write)."""

        def __init__(self, fname, fields, num_workers, progress_label, page_size=DEFAULT_PAGE_SIZE):
            super().__init__(fname, fields, num_workers=num_workers, page_size=page_size)
            self.progress_label = progress_label

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            from multiprocessing import Process, Queue, Value

            from ffcv.memory_allocator import MemoryAllocator

            self.num_samples = num_samples
            self.prepare()
            work, allocations, errors = Queue(), Queue(), Queue()
            for todo in queue_content:
                work.put(todo)
            for _ in range(self.num_workers):
                work.put(None)
            done = Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                    *extra_worker_args)
            procs = [Process(target=_guarded_worker, args=(work_fn, errors, *args)) for _ in range(self.num_workers)]
            try:
                for p in procs:
                    p.start()
                self._wait(done, procs, errors)
                table = []
                for _ in procs:
                    table.extend(allocations.get(timeout=120))
                self.finalize(table)
            finally:
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                    p.join(timeout=10)
                self.metadata_sm.close()
                self.metadata_sm.unlink()

        def _wait(self, done, procs, errors) -> None:
            from rich.progress import Progress

            with Progress(disable=self.progress_label is None, transient=False) as bar:
                task = bar.add_task(f"writing {self.progress_label}", total=self.num_samples)
                while done.value < self.num_samples:
                    try:
                        raise TntError(_write_failure(self.progress_label or self.fname, errors.get_nowait()))
                    except queue.Empty:
                        pass
                    codes = [p.exitcode for p in procs]
                    crashed = [c for c in codes if c not in (None, 0)]
                    # all exited yet samples missing: re-read `done` after the exit codes to avoid a race
                    lost = all(c == 0 for c in codes) and done.value < self.num_samples
                    if crashed or lost:
                        raise TntError(f"writing {self.fname} failed: a writer process exited early "
                                       f"(exit code {crashed[0] if crashed else 0})")
                    bar.update(task, completed=done.value)
                    time.sleep(0.05)
                bar.update(task, completed=self.num_samples)

    return Writer


# ------------------------------------------------------------------------------------------- loading
def stop_epoch_iterator(iterator, timeout: float = _STOP_TIMEOUT_S) -> None:
    """Stop an FFCV EpochIterator cut short and wait for its thread: no more batches are scheduled, the
    output queue is drained so a blocked `put` returns, then the epoch's memory context is released."""
    iterator.terminate_event.set()
    iterator.iter_ixes = iter(())  # the thread's next `next()` ends the epoch
    deadline = time.monotonic() + timeout
    while iterator.is_alive() and time.monotonic() < deadline:
        try:
            while True:
                iterator.output_queue.get_nowait()
        except queue.Empty:
            pass
        iterator.join(timeout=0.05)
    iterator.close()


def _next_batch(iterator):
    """`EpochIterator.__next__` that notices a dead worker thread: FFCV's own waits forever when the
    pipeline raised (e.g. a numba typing error), which would hang training instead of failing."""
    while True:
        try:
            item = iterator.output_queue.get(timeout=0.5)
            break
        except queue.Empty:
            if not iterator.is_alive() and iterator.output_queue.empty():
                raise TntError("the FFCV loader thread stopped with an error (printed above)") from None
    if item is None:
        iterator.close()
        return None
    slot, batch = item
    if iterator.cuda_streams[slot] is not None:  # wait for the copy to the GPU, as FFCV does
        iterator.current_stream.wait_stream(iterator.cuda_streams[slot])
    return batch


class FfcvLoader:
    """One FFCV `Loader`, reused every epoch. Batches are `(float32 NCHW normalised, int64)` on the device
    FFCV's pipeline delivers to (`_image_pipeline`).

    FFCV decodes, crops and flips into uint8 (B, H, W, 3) buffers (on CUDA: copied to the GPU as uint8);
    `pipeline` (an `ImagePipeline`: RandAugment + normalisation + erasing, or normalisation alone) then runs
    on the whole batch on that device, its draws seeded from (seed, epoch, rank, step).
    """

    def __init__(self, loader, pipeline, *, seed: int = 0, rank: int = 0):
        self.loader, self.pipeline = loader, pipeline
        self.seed, self.rank, self.epoch_index = seed, rank, 0
        self._live = None

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch_index = epoch
        self.loader.next_epoch = epoch  # FFCV orders by (seed + epoch), or DistributedSampler.set_epoch

    def __iter__(self):
        return self.epoch()

    def epoch(self, max_steps: int | None = None, skip: int = 0):
        """Batches of one epoch from step `skip` on (a resumed run: earlier batches are drawn but not augmented;
        draws stay keyed by the step); stopping early (max_steps, break, exception) shuts FFCV's thread down."""
        self.close()
        iterator = self._live = iter(self.loader)
        finished = False
        try:
            for step in itertools.count():
                if max_steps is not None and step >= max_steps:
                    break
                batch = _next_batch(iterator)
                if batch is None:
                    finished = True
                    break
                if step < skip:
                    continue
                images, labels = batch
                seed = mix_seed(self.seed, self.epoch_index, self.rank, step, IMAGE_STREAM)
                yield self.pipeline(images, seed), labels   # reads FFCV's reused buffer, returns a new tensor
        finally:
            if not finished:
                stop_epoch_iterator(iterator)
            self._live = None

    def close(self) -> None:
        if self._live is not None:
            stop_epoch_iterator(self._live)
            self._live = None


def _image_pipeline(decoder, ops: list, device: torch.device) -> list:
    """FFCV's compiled decode/crop/flip first, then plain ops (on CPU, compiled -> plain -> compiled hangs);
    uint8 NCHW out (a channels-last view of FFCV's buffer), on `device`."""
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    if device.type == "cuda":
        return [decoder, *ops, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
    return [decoder, *ops, ToTensor(), ToTorchImage()]


def _label_pipeline(device: torch.device) -> list:
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    ops = [IntDecoder(), ToTensor(), Squeeze(1)]
    return ops + [ToDevice(device, non_blocking=True)] if device.type == "cuda" else ops


def _ra_order(repeats: int, world: int, rank: int, seed: int):
    """A TraversalOrder dealing DeiT's RASampler order (which also shards across ranks)."""
    from ffcv.traversal_order.base import TraversalOrder

    from tntcli.data.pipelines import RASampler

    class RepeatedAugOrder(TraversalOrder):
        def sample_order(self, epoch: int):
            sampler = RASampler(len(self.indices), world, rank, repeats=repeats, seed=seed)
            sampler.set_epoch(epoch)
            return self.indices[np.array(list(sampler), dtype=np.int64)]

    return RepeatedAugOrder


def ffcv_loaders(source, *, img_size: int, batch_size: int, workers: int, mean, std, crop_pct: float,
                 aug, distributed: bool, repeated_aug: int, device: torch.device, seed: int, drop_last: bool,
                 max_train_images: int | None, eval_only: bool = False):
    """(train, val, n_train, n_val) FfcvLoaders for an FFCV `DataSource`. `eval_only`: train is the val loader
    (no train `Loader` is built, its file is not opened)."""
    require_ffcv()
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip

    from tntcli.data.pipelines import world_and_rank

    world, rank = world_and_rank(distributed)
    size = (img_size, img_size)

    def center_crop():
        return CenterCropRGBImageDecoder(size, ratio=crop_pct)

    n_val = int(reader(source.val_path).num_samples)
    val = FfcvLoader(Loader(str(source.val_path), batch_size=batch_size, num_workers=workers,
                            order=OrderOption.SEQUENTIAL, indices=np.arange(rank, n_val, world), drop_last=False,
                            pipelines={"image": _image_pipeline(center_crop(), [], device),
                                       "label": _label_pipeline(device)}),
                     ImagePipeline(None, mean=mean, std=std))
    if eval_only:
        return val, val, n_val, n_val
    n_train = int(reader(source.train_path).num_samples)

    if aug is None:
        train_image = _image_pipeline(center_crop(), [], device)
    else:
        flip = [RandomHorizontalFlip(aug.hflip)] if aug.hflip > 0 else []
        train_image = _image_pipeline(RandomResizedCropRGBImageDecoder(size, scale=tuple(aug.scale)), flip,
                                      device)
    train_indices = None
    if max_train_images is not None and max_train_images < n_train:
        train_indices = np.sort(np.random.default_rng(seed).permutation(n_train)[:max_train_images])
        n_train = max_train_images
    use_ra = repeated_aug > 1
    train = Loader(str(source.train_path), batch_size=batch_size, num_workers=workers, order=OrderOption.RANDOM,
                   distributed=distributed and not use_ra, seed=seed, indices=train_indices, drop_last=drop_last,
                   pipelines={"image": train_image, "label": _label_pipeline(device)})
    if use_ra:  # ffcv's constructor takes no order class with arguments: swap it in afterwards
        train.traversal_order = _ra_order(repeated_aug, world, rank, seed)(train)
        train.first_traversal_order = train.next_traversal_order()
    return (FfcvLoader(train, ImagePipeline(aug, mean=mean, std=std), seed=seed, rank=rank), val,
            n_train, n_val)
