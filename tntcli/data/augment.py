"""Train augmentation after the crop, batched on the batch's device, timm semantics throughout.

- `ImagePipeline`: uint8 (B, 3, H, W) -> RandAugment (`tntcli.data.randaugment`) -> normalise (once) ->
  random erasing (timm `--reprob p --remode pixel`). Both loader paths run it: the torchvision path in its
  workers on each collated batch, the FFCV path in the main process on the batch's device.
- `BatchAugment`: the engine's `Loaders.batch_augment`: MixUp/CutMix on the whole batch (timm `Mixup`,
  mode 'batch'), with `set_epoch(epoch, step)`.

Randomness: every draw comes from a `torch.Generator` on the batch's device seeded from integers only
((seed, epoch, rank, step) for the FFCV path and `BatchAugment`, the batch's first sample seed, itself from
(seed, epoch, rank, position), for the torchvision path): no global RNG, no host tensors per batch, no
`.item()`. A resumed run repeats the same draws.

Label smoothing is left to the loss (`F.cross_entropy(..., label_smoothing=s)` on the mixed targets), which
equals timm's `mixup_target(..., smoothing=s)` (tested).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from tntcli.config import AugmentSettings  # the recipe's aug section, declared with the other recipe keys
from tntcli.data.randaugment import INTERPOLATIONS, RandAugment, parse_rand_augment
from tntcli.errors import TntError

__all__ = ["AugmentSettings", "BatchAugment", "ImagePipeline", "MixupCutmix", "RandomErasing", "fill_from_mean",
           "mix_seed", "mix_seeds", "parse_rand_augment"]


# ------------------------------------------------------------------------------------------------ seeds
_MASK64 = (1 << 64) - 1
IMAGE_STREAM = 0x1A6E  # tags the ImagePipeline's seeds apart from BatchAugment's for the same step


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


class Generators:
    """One `torch.Generator` per device, reseeded per batch (seeding is host-side: no device sync)."""

    def __init__(self):
        self._by_device: dict[torch.device, torch.Generator] = {}

    def seeded(self, device: torch.device, seed: int) -> torch.Generator:
        generator = self._by_device.get(device)
        if generator is None:
            generator = self._by_device[device] = torch.Generator(device=device)
        return generator.manual_seed(seed)


def fill_from_mean(mean: Sequence[float]) -> tuple[int, ...]:
    """Pixels uncovered by rotate/shear/translate get the dataset mean, as timm's `img_mean` hparam."""
    return tuple(min(255, round(255 * m)) for m in mean)


def _check_interpolation(name: str) -> None:
    if name not in INTERPOLATIONS:
        raise TntError(f"aug.interpolation {name!r}: expected one of {', '.join(INTERPOLATIONS)}")


# ------------------------------------------------------------------------------------------- erasing
class RandomErasing:
    """timm's `RandomErasing(probability=p, mode='pixel')` on a normalised float batch (B, C, H, W): per image
    with probability p, up to 10 attempts at a box of area U(0.02, 1/3) x H x W and log-uniform aspect in
    [0.3, 1/0.3]; the first box that fits is filled with N(0, 1) noise per pixel.
    `grouped` (default on CPU): the boxes are read on the host and written as slices, with noise drawn for their
    pixels only; otherwise (default elsewhere) a full-size noise tensor and `torch.where`, with no host sync.
    Both erase the same boxes; the noise values differ, being drawn for other shapes."""

    def __init__(self, probability: float, *, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, attempts: int = 10, grouped: bool | None = None):
        self.probability, self.min_area, self.max_area, self.attempts = probability, min_area, max_area, attempts
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.grouped = grouped
        self._ranges: dict = {}

    def draw(self, shape: torch.Size, generator: torch.Generator) -> tuple[Tensor, ...]:
        """(erase (B,) bool, top, left, box_h, box_w (B,) float64) for a batch of `shape`."""
        b, _, h, w = shape
        device = generator.device
        rand = lambda *size: torch.rand(size, generator=generator, device=device, dtype=torch.float64)  # noqa: E731
        erase = rand(b) <= self.probability
        area = (rand(b, self.attempts) * (self.max_area - self.min_area) + self.min_area) * (h * w)
        aspect = torch.exp(rand(b, self.attempts) * (self.log_aspect[1] - self.log_aspect[0]) + self.log_aspect[0])
        box_h, box_w = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
        fits = (box_w < w) & (box_h < h)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)      # first attempt that fits
        box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
        erase &= fits.any(dim=1)
        top = torch.floor(rand(b) * (h - box_h + 1))
        left = torch.floor(rand(b) * (w - box_w + 1))
        return erase, top, left, box_h, box_w

    def boxes(self, shape: torch.Size, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(erase (B,) bool, box (B, 1, H, W) bool) for a batch of `shape`."""
        b, _, h, w = shape
        erase, top, left, box_h, box_w = self.draw(shape, generator)
        rows, cols = self._positions(h, w, generator.device)
        inside_rows = (rows >= top.view(b, 1)) & (rows < (top + box_h).view(b, 1))      # (B, H)
        inside_cols = (cols >= left.view(b, 1)) & (cols < (left + box_w).view(b, 1))   # (B, W)
        return erase, (inside_rows[:, :, None] & inside_cols[:, None, :]).unsqueeze(1)

    def __call__(self, images: Tensor, generator: torch.Generator, inplace: bool = False) -> Tensor:
        """images (B, C, H, W) float -> erased images (`inplace`: written into `images` where possible)."""
        if self.probability <= 0 or images.shape[0] == 0:
            return images
        grouped = self.grouped if self.grouped is not None else images.device.type == "cpu"
        if grouped:    # boxes read on the host (free for a CPU tensor); noise only for the boxes' pixels
            erase, top, left, box_h, box_w = (t.tolist() for t in self.draw(images.shape, generator))
            chosen = [(i, int(t), int(l), int(bh), int(bw))
                      for i, (e, t, l, bh, bw) in enumerate(zip(erase, top, left, box_h, box_w)) if e]
            if not chosen:
                return images
            c = images.shape[1]
            noise = torch.randn(sum(c * bh * bw for *_, bh, bw in chosen), generator=generator,
                                device=images.device, dtype=images.dtype)
            out = images if inplace else images.clone()
            start = 0
            for i, t, l, bh, bw in chosen:   # the masked path's order: image, channel, row, column
                out[i, :, t:t + bh, l:l + bw] = noise[start:start + c * bh * bw].view(c, bh, bw)
                start += c * bh * bw
            return out
        erase, box = self.boxes(images.shape, generator)
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return torch.where(box & erase.view(-1, 1, 1, 1), noise, images)

    def _positions(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (h, w, device)
        if key not in self._ranges:
            self._ranges[key] = (torch.arange(h, device=device, dtype=torch.float64),
                                 torch.arange(w, device=device, dtype=torch.float64))
        return self._ranges[key]


# ------------------------------------------------------------------------------------------ image pipeline
class ImagePipeline:
    """Per-image train augmentation of a cropped uint8 batch, then normalisation (once).

    `__call__(images (B, 3, H, W) uint8, seed) -> (B, 3, H, W) float32 normalised`, on the images' device.
    `aug=None`: normalisation only.
    """

    def __init__(self, aug: AugmentSettings | None, *, mean: Sequence[float], std: Sequence[float],
                 grouped: bool | None = None):
        spec = parse_rand_augment(aug.rand_augment) if aug is not None else None
        if aug is not None:
            _check_interpolation(aug.interpolation)
        self.rand_augment = (RandAugment(spec, fill=fill_from_mean(mean), interpolation=aug.interpolation,
                                         grouped=grouped) if spec else None)
        erase_p = aug.random_erasing if aug is not None else 0.0
        self.erasing = RandomErasing(erase_p, grouped=grouped) if erase_p > 0 else None
        self.mean, self.std = tuple(mean), tuple(std)
        self._scale: dict = {}
        self._generators = Generators()

    @property
    def is_random(self) -> bool:
        return self.rand_augment is not None or self.erasing is not None

    def __call__(self, images: Tensor, seed: int = 0) -> Tensor:
        generator = self._generators.seeded(images.device, seed) if self.is_random else None
        if self.rand_augment is not None:
            images = self.rand_augment(images, generator)
        out = self.normalize(images)
        if self.erasing is not None:
            out = self.erasing(out, generator, inplace=True)
        return out

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 -> float32 (x / 255 - mean) / std, as (x - 255 mean) * (1 / (255 std))."""
        key = images.device
        if key not in self._scale:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=key).view(1, -1, 1, 1) * 255
            inv_std = 1.0 / (torch.tensor(self.std, dtype=torch.float32, device=key).view(1, -1, 1, 1) * 255)
            self._scale[key] = (mean, inv_std)
        mean, inv_std = self._scale[key]
        # FFCV's batches are channels-last views: a contiguous float result keeps every later op (erasing,
        # MixUp, the model) on fast contiguous kernels (on CPU 3x faster here, 6x in MixUp's lerp)
        return images.to(torch.float32, memory_format=torch.contiguous_format).sub_(mean).mul_(inv_std)


# ------------------------------------------------------------------------------------------ mixup / cutmix
class MixupCutmix:
    """timm's `Mixup(mode='batch', prob=1)` on the device: per batch, CutMix with probability `switch_prob`
    (else MixUp) when both alphas are > 0; lam ~ Beta(alpha, alpha); the partner of image i is image B-1-i
    (`x.flip(0)`); CutMix's box as timm's `rand_bbox` and lam corrected to the box's clipped area.
    Targets are mixed one-hot vectors without smoothing (see the module docstring)."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, *, switch_prob: float = 0.5, num_classes: int):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("MixupCutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.switch_prob = switch_prob if (mixup_alpha > 0 and cutmix_alpha > 0) else (
            1.0 if cutmix_alpha > 0 else 0.0)
        self.num_classes = num_classes
        self._constants: dict = {}

    def draw(self, shape: torch.Size, generator: torch.Generator) -> dict[str, Tensor]:
        """use_cutmix () bool, lam () float64 (corrected for CutMix), box (1, 1, H, W) bool (CutMix region)."""
        _, _, h, w = shape
        device = generator.device
        alphas, rows, cols = self._device_constants(h, w, device)
        rand = lambda *size: torch.rand(size, generator=generator, device=device, dtype=torch.float64)  # noqa: E731
        use_cutmix = rand() < self.switch_prob
        gammas = torch._standard_gamma(alphas, generator=generator)        # (2 alphas, 2 draws)
        lam_mix, lam_cut = (gammas[:, 0] / gammas.sum(dim=1)).unbind()     # Beta(a, a) = G1 / (G1 + G2)
        ratio = torch.sqrt(1.0 - lam_cut)
        cut_h, cut_w = torch.trunc(h * ratio), torch.trunc(w * ratio)
        cy, cx = torch.floor(rand() * h), torch.floor(rand() * w)
        half = lambda v: torch.div(v, 2, rounding_mode="floor")  # noqa: E731  (numpy's // on ints)
        top, bottom = (cy - half(cut_h)).clamp(0, h), (cy + half(cut_h + 1)).clamp(0, h)
        left, right = (cx - half(cut_w)).clamp(0, w), (cx + half(cut_w + 1)).clamp(0, w)
        box = ((rows >= top) & (rows < bottom)).view(h, 1) & ((cols >= left) & (cols < right)).view(1, w)
        lam_box = 1.0 - (bottom - top) * (right - left) / (h * w)
        lam = torch.where(use_cutmix, lam_box, lam_mix)
        return {"use_cutmix": use_cutmix, "lam": lam, "box": box.view(1, 1, h, w)}

    def __call__(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """images (B, C, H, W) float, labels (B,) int64 -> (mixed images, (B, num_classes) float32 targets)."""
        d = self.draw(images.shape, generator)
        lam = d["lam"].to(images.dtype)
        weight = torch.where(d["use_cutmix"], (~d["box"]).to(images.dtype), lam)  # share of the image itself
        mixed = torch.lerp(images.flip(0), images, weight)   # exact at weights 0 and 1 (CutMix)
        one_hot = torch.zeros(labels.shape[0], self.num_classes, device=labels.device, dtype=torch.float32)
        one_hot.scatter_(1, labels.view(-1, 1), 1.0)
        lam = d["lam"].to(torch.float32)
        return mixed, one_hot * lam + one_hot.flip(0) * (1 - lam)

    def _device_constants(self, h: int, w: int, device: torch.device):
        key = (h, w, device)
        if key not in self._constants:
            alphas = torch.tensor([[self.mixup_alpha or 1.0] * 2, [self.cutmix_alpha or 1.0] * 2],
                                  dtype=torch.float64, device=device)
            self._constants[key] = (alphas, torch.arange(h, dtype=torch.float64, device=device),
                                    torch.arange(w, dtype=torch.float64, device=device))
        return self._constants[key]


# --------------------------------------------------------------------------------------- batch augment
class BatchAugment:
    """`Loaders.batch_augment`: (normalised images, int labels) -> (images, targets) on the images' device.

    MixUp/CutMix when the recipe has them (targets become (B, num_classes) probabilities), else a pass-through.
    Draws are a function of (seed, epoch, rank, step); `set_epoch(epoch, step)` positions them (a run resumed
    mid-epoch passes the step it resumes at).
    """

    def __init__(self, aug: AugmentSettings | None, num_classes: int, *, seed: int = 0, rank: int = 0):
        on = aug is not None and (aug.mixup > 0 or aug.cutmix > 0)
        self.mix = (MixupCutmix(aug.mixup, aug.cutmix, switch_prob=aug.mixup_switch_prob, num_classes=num_classes)
                    if on else None)
        self.seed, self.rank = seed, rank
        self.epoch, self.step = 0, 0
        self._generators = Generators()

    def set_epoch(self, epoch: int, step: int = 0) -> None:
        """Draws of epoch `epoch` from batch `step` on (a run resumed mid-epoch starts past step 0)."""
        self.epoch, self.step = epoch, step

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.mix is None:
            return images, labels
        generator = self._generators.seeded(images.device, mix_seed(self.seed, self.epoch, self.rank, self.step))
        self.step += 1
        return self.mix(images, labels, generator)
