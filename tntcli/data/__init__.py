"""The data layer: `--data` resolution, train/val loaders (torchvision or FFCV) and batch augmentation.

    loaders = build_loaders("digits", img_size=32, batch_size=64, aug=AugmentSettings())
    for epoch in range(epochs):
        loaders.set_epoch(epoch)
        for images, labels in loaders.train:             # or loaders.train.epoch(max_steps, skip)
            images, targets = loaders.batch_augment(images, labels)
    loaders.close()

Train augmentation: crop + flip per sample (PIL in the DataLoader workers, or FFCV's compiled decoder), then
the batched `ImagePipeline` (timm-exact RandAugment on uint8, normalisation, random erasing) on whole batches
(in the workers, or on the FFCV batch's device), then `batch_augment` (MixUp/CutMix) on the device.

Randomness: with `set_epoch(e)` the order, the per-sample and per-batch augmentation and `batch_augment` of
epoch e are a pure function of (seed, e, rank, position/step) on the torchvision path (independent of the
number of workers); every batched draw comes from its own seeded `torch.Generator`, never the global RNG. On
the FFCV path the order, the `ImagePipeline` and `batch_augment` are reproducible, FFCV's compiled crop/flip
are not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from tntcli.config import AugmentSettings
from tntcli.data.augment import BatchAugment
from tntcli.data.sources import DataSource, resolve_source

__all__ = ["AugmentSettings", "DataSource", "Loaders", "build_loaders", "resolve_source"]


@dataclass
class Loaders:
    """Train and val iterables of `(images float32 NCHW normalised, labels int64)` already on the device."""

    train: Any
    val: Any
    num_classes: int
    classes: list[str]
    batch_augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    n_train: int
    n_val: int

    def set_epoch(self, epoch: int) -> None:
        self.train.set_epoch(epoch)
        self.batch_augment.set_epoch(epoch)

    def close(self) -> None:
        """Stop any epoch still running (FFCV threads, DataLoader workers). Safe to call twice."""
        self.train.close()
        self.val.close()


def build_loaders(data: str, *, data_root: str | None = None, img_size: int, batch_size: int, workers: int = 2,
                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct: float = 0.9, interpolation: str = "bicubic",
                  aug: AugmentSettings | None = None, distributed: bool = False, repeated_aug: int = 1,
                  device: str | torch.device = "cpu", seed: int = 0, drop_last: bool = True,
                  max_train_images: int | None = None, strict: bool = False, eval_only: bool = False) -> Loaders:
    """Loaders for `--data` (see `tntcli.data.sources`). `aug=None`: no augmentation at all (resize + center
    crop for train too, batch_augment passes through). `.beton` data uses FFCV; everything else torchvision.
    `strict`: an unreadable image is an error instead of a skip with a warning. `eval_only`: only `val` will
    be read (an image folder's train/ is not scanned; `train` then iterates the val images)."""
    from tntcli.data.pipelines import world_and_rank
    from tntcli.errors import TntError

    if img_size < 1 or batch_size < 1 or workers < 0 or not 0 < crop_pct <= 1:
        raise TntError(f"bad loader settings: img_size={img_size}, batch_size={batch_size}, workers={workers}, "
                       f"crop_pct={crop_pct} (crop_pct must be in (0, 1])")
    device = torch.device(device)
    source = resolve_source(data, data_root, strict=strict, eval_only=eval_only)
    settings = dict(img_size=img_size, batch_size=batch_size, workers=workers, mean=mean, std=std,
                    crop_pct=crop_pct, aug=aug, distributed=distributed, repeated_aug=repeated_aug,
                    device=device, seed=seed, drop_last=drop_last, max_train_images=max_train_images)
    if source.is_ffcv:
        from tntcli.data.ffcv import ffcv_loaders

        train, val, n_train, n_val = ffcv_loaders(source, eval_only=eval_only, **settings)
    else:
        from tntcli.data.pipelines import torchvision_loaders

        train, val, n_train, n_val = torchvision_loaders(source, interpolation=interpolation, **settings)
    _, rank = world_and_rank(distributed)
    batch_augment = BatchAugment(aug, source.num_classes, seed=seed, rank=rank)
    loaders = Loaders(train, val, source.num_classes, source.classes, batch_augment, n_train, n_val)
    loaders.set_epoch(0)
    return loaders
