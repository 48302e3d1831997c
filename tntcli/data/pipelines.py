"""The torchvision path: PIL crop/flip per sample, the batched `ImagePipeline` per batch, samplers, DataLoaders.

Per sample (in the workers): decode, RandomResizedCrop (bilinear or bicubic per call with
`aug.interpolation="random"`, timm's default) and flip on PIL, then an uint8 tensor. Per batch (the collate
function, also in the workers): `ImagePipeline` = RandAugment + normalisation + random erasing on the uint8
batch, the same code the FFCV path runs on its device.

Determinism: the train sampler yields `(index, sample_seed)` pairs; the dataset wrapper seeds the torch RNG
with `sample_seed` before cropping that sample, and the collate seeds the batch's `ImagePipeline` with the
first sample's seed. Seeds and order are a pure function of (seed, epoch, rank, position in the epoch), so a
batch does not depend on the number of workers and repeated samples (RASampler) still get different
augmentations.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, get_worker_info
from torchvision.transforms import v2

from tntcli.config import AugmentSettings
from tntcli.data.augment import IMAGE_STREAM, ImagePipeline, mix_seed, mix_seeds
from tntcli.errors import TntError

INTERPOLATIONS = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR,
                  "nearest": v2.InterpolationMode.NEAREST}


def interpolation_mode(name: str) -> v2.InterpolationMode:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise TntError(f"interpolation {name!r}: expected one of {', '.join(INTERPOLATIONS)}") from None


# ----------------------------------------------------------------------------------------- transforms
def eval_transform(img_size: int, *, crop_pct: float, interpolation: str) -> v2.Compose:
    """Resize the short side to img_size / crop_pct, center crop img_size (timm's eval transform); uint8."""
    resize = int(math.floor(img_size / crop_pct))
    return v2.Compose([v2.Resize(resize, interpolation=interpolation_mode(interpolation), antialias=True),
                       v2.CenterCrop(img_size), v2.PILToTensor()])


class RandomResizedCrop:
    """RandomResizedCrop whose interpolation is drawn per call from `modes` (timm's 'random': bilinear or
    bicubic), with the torch RNG like the rest of the per-sample transform."""

    def __init__(self, size: int, scale: tuple[float, float], modes: Sequence[str]):
        self.crops = [v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=interpolation_mode(m),
                                           antialias=True) for m in modes]

    def __call__(self, img):
        pick = int(torch.randint(len(self.crops), ())) if len(self.crops) > 1 else 0
        return self.crops[pick](img)


def train_transform(img_size: int, aug: AugmentSettings) -> v2.Compose:
    """Per-sample train augmentation on PIL: RandomResizedCrop, flip; uint8 out (the rest is per batch)."""
    modes = ("bilinear", "bicubic") if aug.interpolation == "random" else (aug.interpolation,)
    steps: list = [RandomResizedCrop(img_size, tuple(aug.scale), modes)]
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    return v2.Compose([*steps, v2.PILToTensor()])


class SeededDataset:
    """Applies `transform` to `dataset[i]`'s image -> (uint8 image, label, seed). A `(index, seed)` key seeds
    the torch RNG first: in a worker its private RNG, in the main process under `fork_rng` so the caller's
    RNG is left alone. A plain index gets seed 0 (eval: nothing random)."""

    def __init__(self, dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            img, label = self.dataset[key]
            return self.transform(img), label, 0
        index, seed = key
        img, label = self.dataset[index]
        if get_worker_info() is not None:
            torch.random.default_generator.manual_seed(seed)
            return self.transform(img), label, seed
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return self.transform(img), label, seed


class Collate:
    """Stack (uint8 image, label, seed) samples and run the batch's `ImagePipeline`, seeded from the first
    sample's seed (tagged, so its stream differs from that sample's crop): (float32 (B, 3, H, W), int64 (B,))."""

    def __init__(self, pipeline: ImagePipeline):
        self.pipeline = pipeline

    def __call__(self, batch: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, seeds = zip(*batch)
        images = torch.stack([img.as_subclass(torch.Tensor) for img in images])
        return self.pipeline(images, mix_seed(int(seeds[0]), IMAGE_STREAM)), torch.tensor(labels, dtype=torch.int64)


# ------------------------------------------------------------------------------------------- samplers
class ShuffleSampler(Sampler[int]):
    """A random permutation per epoch, a pure function of (seed, epoch)."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def permutation(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch)))

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation().tolist())


class ShardSampler(Sampler[int]):
    """Evaluation shard of one rank: indices rank, rank+world, ... (no padding, so no sample counts twice)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, n, num_replicas))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class RASampler(ShuffleSampler):
    """Repeated augmentation (Hoffer et al. 2020; DeiT): each index appears `repeats` times in a row in the
    shuffled list, which is dealt round-robin to the ranks, so the copies land on different ranks.

    `truncate=True` (DeiT, used for training) keeps the epoch at ceil(n / world) samples per rank so schedules
    in epochs mean the same with and without it; `truncate=False` yields the whole repeated list
    (ceil(n * repeats / world) per rank), covering every index `repeats` times across ranks.
    """

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0, repeats: int = 3, seed: int = 0,
                 truncate: bool = True):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        super().__init__(n, seed)
        self.world, self.rank, self.repeats, self.truncate = num_replicas, rank, repeats, truncate
        self.per_rank = math.ceil(n * repeats / num_replicas)
        self.selected = math.ceil(n / num_replicas) if truncate else self.per_rank

    def __len__(self) -> int:
        return self.selected

    def __iter__(self) -> Iterator[int]:
        order = self.permutation().repeat_interleave(self.repeats).tolist()
        total = self.per_rank * self.world
        order += order[: total - len(order)]  # pad so every rank gets the same count
        return iter(order[self.rank:total:self.world][: self.selected])


class SeededSampler(Sampler[tuple]):
    """Wraps an index sampler: yields `(index, sample_seed)` with seeds from (seed, epoch, rank, position)."""

    def __init__(self, sampler: Sampler[int], seed: int, rank: int):
        self.sampler, self.seed, self.rank, self.epoch = sampler, seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        indices = list(self.sampler)
        seeds = mix_seeds(mix_seed(self.seed, self.epoch, self.rank), np.arange(len(indices))).tolist()
        return iter(zip(indices, seeds))


def world_and_rank(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 1, 0
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise TntError("distributed=True needs torch.distributed to be initialised first (run under torchrun)")
    return dist.get_world_size(), dist.get_rank()


def train_sampler(n: int, *, world: int, rank: int, repeated_aug: int, seed: int) -> Sampler[int]:
    # One permutation per (seed, epoch) whatever the world size: without repeats, the ranks' step-i batches
    # together are exactly the single-process step-i batch, so DDP reproduces a one-process run.
    if repeated_aug > 1 or world > 1:
        return RASampler(n, world, rank, repeats=repeated_aug, seed=seed)
    return ShuffleSampler(n, seed)


# ------------------------------------------------------------------------------------------- loaders
class DeviceLoader:
    """A DataLoader whose batches arrive on `device`; `epoch(max_steps)` stops early and cleans up."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device
        self.non_blocking = device.type == "cuda"

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        sampler = self.loader.batch_sampler.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def __iter__(self):
        return self.epoch()

    def epoch(self, max_steps: int | None = None, skip: int = 0):
        """Batches of one epoch from step `skip` on (the workers still build the skipped ones: their samples' seeds
        come from positions in the epoch)."""
        for step, (images, labels) in enumerate(self.loader):
            if max_steps is not None and step >= max_steps:
                break
            if step < skip:
                continue
            yield (images.to(self.device, non_blocking=self.non_blocking),
                   labels.to(self.device, non_blocking=self.non_blocking))

    def close(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)  # persistent workers live here
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


def subset(dataset, count: int, seed: int) -> torch.utils.data.Subset:
    """`count` samples drawn at random (a fixed function of seed), so sorted folders keep all classes."""
    picked = np.sort(np.random.default_rng(seed).permutation(len(dataset))[:count])
    return torch.utils.data.Subset(dataset, picked.tolist())


def make_loader(dataset, sampler: Sampler, collate: Collate, *, batch_size: int, workers: int,
                device: torch.device, drop_last: bool) -> DeviceLoader:
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        collate_fn=collate, pin_memory=device.type == "cuda", drop_last=drop_last,
                        persistent_workers=workers > 0)
    return DeviceLoader(loader, device)


def torchvision_loaders(source, *, img_size: int, batch_size: int, workers: int, mean, std, crop_pct: float,
                        interpolation: str, aug: AugmentSettings | None, distributed: bool,
                        repeated_aug: int, device: torch.device, seed: int, drop_last: bool,
                        max_train_images: int | None) -> tuple[DeviceLoader, DeviceLoader, int, int]:
    """(train, val, n_train, n_val) DeviceLoaders for a map-style `DataSource`."""
    world, rank = world_and_rank(distributed)
    val_tf = eval_transform(img_size, crop_pct=crop_pct, interpolation=interpolation)
    train_tf = train_transform(img_size, aug) if aug is not None else val_tf
    train_set = source.train
    if max_train_images is not None and max_train_images < len(train_set):
        train_set = subset(train_set, max_train_images, seed)
    sampler = SeededSampler(train_sampler(len(train_set), world=world, rank=rank, repeated_aug=repeated_aug,
                                          seed=seed), seed, rank)
    train = make_loader(SeededDataset(train_set, train_tf), sampler,
                        Collate(ImagePipeline(aug, mean=mean, std=std, grouped=True)), batch_size=batch_size,
                        workers=workers, device=device, drop_last=drop_last)
    val = make_loader(SeededDataset(source.val, val_tf), ShardSampler(len(source.val), world, rank),
                      Collate(ImagePipeline(None, mean=mean, std=std)), batch_size=batch_size, workers=workers,
                      device=device, drop_last=False)
    return train, val, len(train_set), len(source.val)
