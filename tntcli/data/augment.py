"""Augmentations shared by the torchvision and FFCV paths.

- `parse_rand_augment`: timm-style `rand-m9-n2-mstd0.5-inc1` strings.
- `TimmRandAugment`: torchvision's RandAugment with timm's per-op Gaussian magnitude noise (`mstd`).
- `BatchAugment`: the `Loaders.batch_augment` callable. MixUp/CutMix on the batch; on the FFCV path also the
  per-sample RandAugment + RandomErasing that FFCV cannot do, one random draw per image.

Randomness never touches the global RNG: every call runs under `torch.random.fork_rng`, seeded from
(seed, epoch, rank, call number), so `set_epoch` makes a whole epoch reproducible.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from tntcli.config import AugmentSettings  # the recipe's aug section, declared with the other recipe keys
from tntcli.errors import TntError

MAGNITUDE_MAX = 10.0    # timm's level denominator: m9 means 90 % of each op's range
MAGNITUDE_STEPS = 10    # bins per magnitude unit (timm draws continuous magnitudes; 0.1 steps are close)


# ------------------------------------------------------------------------------------------------ seeds
_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 chain): seeds for (seed, epoch, rank, ...)."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = _splitmix64((h ^ (int(part) & _MASK64)) & _MASK64)
    return h >> 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seeds(base: int, positions: np.ndarray) -> np.ndarray:
    """Vectorised `mix_seed(base, p)` for many positions (per-sample seeds of an epoch) as int64."""
    z = np.asarray(positions, dtype=np.uint64) ^ np.uint64(base & _MASK64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(1)).astype(np.int64)


def seed_generators(seed: int, device: torch.device) -> None:
    """Seed the CPU generator and `device`'s one only (torch.manual_seed would reseed every GPU)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


# ---------------------------------------------------------------------------------------- RandAugment
@dataclass(frozen=True)
class RandAugmentSpec:
    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.0


def parse_rand_augment(spec: str | None) -> RandAugmentSpec | None:
    """`rand-m9-n2-mstd0.5-inc1` -> RandAugmentSpec. None/"" -> None. `inc` is accepted and ignored:
    torchvision's ops are already the 'increasing' variants (stronger with magnitude)."""
    if not spec:
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise TntError(f"rand_augment {spec!r}: expected a timm-style string like 'rand-m9-mstd0.5-inc1'")
    values = {"m": 9.0, "n": 2.0, "mstd": 0.0}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|w|p)([0-9.]+)", part)
        if not match:
            raise TntError(f"rand_augment {spec!r}: cannot read {part!r} (known: m<magnitude>, n<ops>, "
                           "mstd<std>, inc<0|1>)")
        key, number = match.groups()
        if key in values:
            values[key] = float(number)
    if not 0 <= values["m"] <= MAGNITUDE_MAX:
        raise TntError(f"rand_augment {spec!r}: magnitude must be in 0..{MAGNITUDE_MAX:g}")
    return RandAugmentSpec(values["m"], int(values["n"]), values["mstd"])


class TimmRandAugment(v2.RandAugment):
    """RandAugment whose magnitude is drawn per op from N(m, mstd) clipped to [0, 10], as in timm."""

    def __init__(self, spec: RandAugmentSpec, fill: Sequence[int] | None = None,
                 interpolation: str = "bilinear"):
        bins = int(MAGNITUDE_MAX * MAGNITUDE_STEPS) + 1
        super().__init__(num_ops=spec.num_ops, magnitude=round(spec.magnitude * MAGNITUDE_STEPS),
                         num_magnitude_bins=bins, interpolation=interpolation,
                         fill=list(fill) if fill is not None else None)
        self.spec = spec

    def _draw_magnitude_bin(self) -> int:
        m = self.spec.magnitude
        if self.spec.magnitude_std > 0:
            m = float(torch.normal(m, self.spec.magnitude_std, ()).clamp(0.0, MAGNITUDE_MAX))
        return round(m * MAGNITUDE_STEPS)

    def forward(self, *inputs):
        flat, image = self._flatten_and_extract_image_or_video(inputs)
        height, width = v2.functional.get_size(image)
        for _ in range(self.num_ops):
            op, (magnitudes_fn, signed) = self._get_random_item(self._AUGMENTATION_SPACE)
            magnitudes = magnitudes_fn(self.num_magnitude_bins, height, width)
            magnitude = 0.0
            if magnitudes is not None:
                magnitude = float(magnitudes[self._draw_magnitude_bin()])
                if signed and torch.rand(()) <= 0.5:
                    magnitude = -magnitude
            image = self._apply_image_or_video_transform(image, op, magnitude,
                                                         interpolation=self.interpolation, fill=self._fill)
        return self._unflatten_and_insert_image_or_video(flat, image)


def fill_from_mean(mean: Sequence[float]) -> list[int]:
    """Pixels uncovered by shear/rotate/translate get the dataset mean, like timm."""
    return [int(round(255 * m)) for m in mean]


def random_erasing(p: float) -> v2.RandomErasing:
    """timm's 'pixel' mode: the erased box holds per-pixel normal noise (inputs are normalised)."""
    return v2.RandomErasing(p=p, value="random")


def build_mix(aug: AugmentSettings | None, num_classes: int):
    """MixUp, CutMix, or a random choice between them (CutMix with `mixup_switch_prob`); None when both off."""
    if aug is None:
        return None
    mixup = v2.MixUp(alpha=aug.mixup, num_classes=num_classes) if aug.mixup > 0 else None
    cutmix = v2.CutMix(alpha=aug.cutmix, num_classes=num_classes) if aug.cutmix > 0 else None
    if mixup and cutmix:
        p = aug.mixup_switch_prob
        return v2.RandomChoice([mixup, cutmix], p=[1.0 - p, p])
    return mixup or cutmix


@contextmanager
def _single_cpu_thread(device: torch.device):
    """Per-image ops are tiny: intra-op threads only add sync cost, and next to FFCV's numba threads the
    oversubscription slowed RandAugment on CPU by >10x (measured)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------- batch augment
class BatchAugment:
    """`Loaders.batch_augment`: (normalised images, int labels) -> (images, targets) on the images' device.

    `per_sample=True` (FFCV path) also applies RandAugment and RandomErasing image by image: RandAugment on
    uint8 (denormalise -> round -> op -> renormalise, so posterize/solarize/equalize behave as on PIL).
    Randomness is seeded from (seed, epoch, rank, call index) under `fork_rng`: the global RNG is untouched.
    """

    def __init__(self, aug: AugmentSettings | None, num_classes: int, *, mean: Sequence[float],
                 std: Sequence[float], per_sample: bool, seed: int = 0, rank: int = 0):
        self.mix = build_mix(aug, num_classes)
        spec = parse_rand_augment(aug.rand_augment) if (aug and per_sample) else None
        self.rand_augment = TimmRandAugment(spec, fill=fill_from_mean(mean)) if spec else None
        erase_p = aug.random_erasing if (aug and per_sample) else 0.0
        self.erase_p = erase_p
        self.erase = random_erasing(1.0) if erase_p > 0 else None
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.seed, self.rank = seed, rank
        self.epoch, self.calls = 0, 0

    @property
    def is_identity(self) -> bool:
        return self.mix is None and self.rand_augment is None and self.erase is None

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Draws of epoch `epoch` from batch `step` on (a run resumed mid-epoch starts past step 0)."""
        self.epoch, self.calls = epoch, step

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.is_identity:
            return images, labels
        seed = mix_seed(self.seed, self.epoch, self.rank, self.calls)
        self.calls += 1
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            seed_generators(seed, images.device)
            if self.rand_augment is not None:
                images = self._rand_augment(images)
            if self.erase is not None:
                images = self._erase(images)
            if self.mix is not None:
                images, labels = self.mix(images, labels)
        return images, labels

    def _rand_augment(self, images: Tensor) -> Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        pixels = (images * std + mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        with _single_cpu_thread(images.device):
            pixels = torch.stack([self.rand_augment(img) for img in pixels])
        return (pixels.float().div_(255) - mean) / std

    def _erase(self, images: Tensor) -> Tensor:
        chosen = (torch.rand(len(images)) < self.erase_p).nonzero().flatten().tolist()
        if not chosen:
            return images
        images = images.clone()  # FFCV hands out views of reused buffers: never write into them
        for i in chosen:
            images[i] = self.erase(images[i])
        return images
