"""timm's RandAugment (`rand-m9-mstd0.5-inc1`, timm/data/auto_augment.py), batched on uint8 image tensors.

    ra = RandAugment(parse_rand_augment("rand-m9-mstd0.5-inc1"), fill=(128, 128, 128))
    out = ra(images, generator)        # images: (B, 3, H, W) uint8 on any device -> same shape/dtype/device

What timm does per image, reproduced here per image of the batch:
- `num_ops` (n, default 2) ops drawn uniformly *with replacement* from the 15 ops of `inc1`
  (`OPS_INCREASING`) or of `inc0` (`OPS`); timm's `np.random.choice(ops, n, replace=True)`.
- each op applied with probability `prob` (p, default 0.5).
- its magnitude drawn per op from N(m, mstd) (uniform(0, m) when mstd > 100), clipped to [0, mmax or 10].
- magnitude -> op argument exactly as timm's `LEVEL_TO_ARG` (`level_to_arg` below), including the random
  sign of rotate/shear/translate/enhance-increasing and the integer truncation of posterize/solarize.
- geometric ops use PIL's affine conventions (output pixel centre (x+.5, y+.5) mapped to the source point;
  source points outside the image get the fill colour, points inside sample with edge clamping) and an
  interpolation drawn per call from (bilinear, bicubic) when `interpolation="random"` (timm's default
  `--train-interpolation random`).
- pixel ops reproduce PIL's integer/float arithmetic (RGB->L as ITU-R 601-2 in 16-bit fixed point,
  `Image.blend` truncating, `ImageOps` LUTs), so they match PIL to the level; see tests/test_data_randaugment.py.

Known difference, by construction: PIL's affine bicubic uses the cubic kernel a=-1, torch's `grid_sample`
a=-0.75, so bicubic rotate/shear/translate differ from PIL by a few levels at edges (measured in the tests);
bilinear and nearest agree with PIL to rounding.

Batching: every image gets its own ops and magnitudes. Ops fall in five families (lookup tables, colour,
sharpness, affine-bilinear, affine-bicubic); a family runs once per op slot on the images that drew it.
`grouped=True` (the default on CPU) gathers those images first (`nonzero`, which costs nothing on the host);
`grouped=False` (the default elsewhere) computes the family on the whole batch and selects with `torch.where`,
which needs no host sync on CUDA. Both give the same result. Randomness comes only from the generator passed
in; constants are built once per (device, size) and cached.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from tntcli.errors import TntError

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude m means m/10 of each op's range

# timm's _RAND_INCREASING_TRANSFORMS (inc1) and _RAND_TRANSFORMS (inc0), in timm's order
OPS_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
       "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INTERPOLATIONS = ("random", "bilinear", "bicubic", "nearest")
TRANSLATE_PCT = 0.45  # timm's default hparams['translate_pct'] for the *Rel translations


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string (defaults: timm's when a key is absent)."""

    magnitude: float = LEVEL_DENOM
    num_ops: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0          # inf: uniform in [0, magnitude]
    magnitude_max: float | None = None  # None: clip at 10
    increasing: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return OPS_INCREASING if self.increasing else OPS


def parse_rand_augment(spec: str | None) -> RandAugmentSpec | None:
    """`rand-m9-mstd0.5-inc1` -> RandAugmentSpec, with timm's keys: m, n, p, mstd (>100: uniform), mmax, inc.
    None/"" -> None. Weighted/named op sets (`t...`) are not supported."""
    if not spec:
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise TntError(f"rand_augment {spec!r}: expected a timm-style string like 'rand-m9-mstd0.5-inc1'")
    values: dict = {}
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)([0-9.]+)", part)
        if not match:
            raise TntError(f"rand_augment {spec!r}: cannot read {part!r} (known: m<magnitude>, n<ops>, p<prob>, "
                           "mstd<std>, mmax<max>, inc<0|1>)")
        key, number = match.groups()
        try:
            values[key] = float(number)
        except ValueError:
            raise TntError(f"rand_augment {spec!r}: {part!r} is not a number") from None
    mstd = values.get("mstd", 0.0)
    out = RandAugmentSpec(magnitude=values.get("m", LEVEL_DENOM), num_ops=int(values.get("n", 2)),
                          prob=values.get("p", 0.5), magnitude_std=math.inf if mstd > 100 else mstd,
                          magnitude_max=values.get("mmax") or None, increasing=bool(int(values.get("inc", 0))))
    if out.magnitude < 0 or out.num_ops < 0 or not 0 <= out.prob <= 1:
        raise TntError(f"rand_augment {spec!r}: need m >= 0, n >= 0 and 0 <= p <= 1")
    return out


# ------------------------------------------------------------------------------------ magnitude -> argument
def _signed(value: Tensor, negate: Tensor) -> Tensor:
    return torch.where(negate, -value, value)


def _enhance(level: Tensor, negate: Tensor) -> Tensor:
    return (level / LEVEL_DENOM) * 1.8 + 0.1


def _enhance_increasing(level: Tensor, negate: Tensor) -> Tensor:
    return (1.0 + _signed((level / LEVEL_DENOM) * 0.9, negate)).clamp(min=0.1)


def _posterize(level: Tensor, negate: Tensor) -> Tensor:
    return torch.trunc((level / LEVEL_DENOM) * 4)


def _solarize(level: Tensor, negate: Tensor) -> Tensor:
    return torch.trunc((level / LEVEL_DENOM) * 256).clamp(max=256)


# Each maps (level, negate) float64/bool tensors to the op's argument, as timm's LEVEL_TO_ARG[name] does
# (`negate` stands for timm's `_randomly_negate` draw). None: the op takes no argument.
LEVEL_TO_ARG: dict[str, Callable[[Tensor, Tensor], Tensor] | None] = {
    "AutoContrast": None,
    "Equalize": None,
    "Invert": None,
    "Rotate": lambda level, negate: _signed((level / LEVEL_DENOM) * 30.0, negate),          # degrees
    "Posterize": _posterize,                                                                # bits kept
    "PosterizeIncreasing": lambda level, negate: 4 - _posterize(level, negate),
    "Solarize": _solarize,                                                                  # threshold
    "SolarizeIncreasing": lambda level, negate: 256 - _solarize(level, negate),
    "SolarizeAdd": lambda level, negate: torch.trunc((level / LEVEL_DENOM) * 110).clamp(max=128),  # added
    "Color": _enhance, "ColorIncreasing": _enhance_increasing,                              # blend factors
    "Contrast": _enhance, "ContrastIncreasing": _enhance_increasing,
    "Brightness": _enhance, "BrightnessIncreasing": _enhance_increasing,
    "Sharpness": _enhance, "SharpnessIncreasing": _enhance_increasing,
    "ShearX": lambda level, negate: _signed((level / LEVEL_DENOM) * 0.3, negate),           # shear factor
    "ShearY": lambda level, negate: _signed((level / LEVEL_DENOM) * 0.3, negate),
    "TranslateXRel": lambda level, negate: _signed((level / LEVEL_DENOM) * TRANSLATE_PCT, negate),  # of width
    "TranslateYRel": lambda level, negate: _signed((level / LEVEL_DENOM) * TRANSLATE_PCT, negate),  # of height
}

LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize",
           "SolarizeIncreasing", "SolarizeAdd", "Contrast", "ContrastIncreasing", "Brightness",
           "BrightnessIncreasing")
COLOR_OPS = ("Color", "ColorIncreasing")
SHARPNESS_OPS = ("Sharpness", "SharpnessIncreasing")
AFFINE_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


# ------------------------------------------------------------------------------------------- pixel maths
def luminance(images: Tensor) -> Tensor:
    """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16. (N, 3, H, W) uint8 -> (N, 1, H, W) int32."""
    r, g, b = images.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def blend(degenerate: Tensor, images: Tensor, factor: Tensor) -> Tensor:
    """PIL's `Image.blend(degenerate, images, factor)`: float32 `d + f * (x - d)`, truncated, clipped to 0..255.
    degenerate: broadcastable to images (N, 3, H, W); factor: (N,). Returns uint8."""
    d = degenerate.to(torch.float32)
    f = factor.to(torch.float32).view(-1, 1, 1, 1)
    return (d + f * (images.to(torch.float32) - d)).clamp_(0, 255).to(torch.uint8)   # the cast truncates


def smooth(images: Tensor) -> Tensor:
    """PIL's `ImageFilter.SMOOTH` (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, divided by 13, rounded), border pixels
    copied unchanged. (N, 3, H, W) uint8 -> uint8."""
    n, c, h, w = images.shape
    if h < 3 or w < 3:
        return images
    x = images.to(torch.float32)
    # 3x3 sum as two 3-tap passes over shifted views (exact integers; several times faster on CPU than
    # avg_pool2d) + 4 x centre; S / 13 is never k + 0.5, so rounding needs no care
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    total = (rows[..., :-2] + rows[..., 1:-1]).add_(rows[..., 2:]).add_(x[:, :, 1:-1, 1:-1], alpha=4.0)
    inner = total.div_(13.0).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)
    out = images.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def apply_luts(images: Tensor, luts: Tensor) -> Tensor:
    """out[n, c, y, x] = luts[n, c, images[n, c, y, x]]. images (N, 3, H, W) uint8, luts (N, 3, 256) uint8."""
    n, c, h, w = images.shape
    return torch.gather(luts, 2, images.reshape(n, c, h * w).to(torch.int64)).view(n, c, h, w)


def histograms(images: Tensor) -> Tensor:
    """Per image and channel 256-bin histograms: (N, 3, H, W) uint8 -> (N, 3, 256) int64."""
    n, c, h, w = images.shape
    flat = images.reshape(n * c, h * w).to(torch.int64)
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=images.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    return hist.view(n, c, 256)


def autocontrast_luts(hist: Tensor, levels: Tensor) -> Tensor:
    """`ImageOps.autocontrast` (cutoff 0): per channel stretch [lo, hi] to [0, 255] with `int()` truncation.
    hist (N, 3, 256) -> LUTs (N, 3, 256) int64; channels with hi <= lo map to themselves."""
    present = hist > 0
    lo = torch.where(present, levels, 256.0).amin(dim=2, keepdim=True)
    hi = torch.where(present, levels, -1.0).amax(dim=2, keepdim=True)
    flat = hi <= lo
    span = torch.where(flat, 1.0, hi - lo)
    scale = torch.full_like(span, 255.0) / span  # not `255.0 / span`: torch's scalar/tensor is not IEEE-exact
    offset = -lo * scale
    lut = torch.trunc(levels * scale + offset).clamp(0, 255)
    return torch.where(flat, levels, lut).to(torch.int64)


def equalize_luts(hist: Tensor, levels: Tensor) -> Tensor:
    """`ImageOps.equalize`: step = (count - count of the top used level) // 255, lut[i] = (step // 2 +
    #pixels below i) // step (clipped to 255 as `Image.point` does); identity when step is 0."""
    total = hist.sum(dim=2, keepdim=True)
    top = torch.where(hist > 0, levels.to(torch.int64), -1).amax(dim=2, keepdim=True)
    step = (total - hist.gather(2, top.clamp(min=0))) // 255
    below = hist.cumsum(dim=2) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    return torch.where(step > 0, lut, levels.to(torch.int64))


# ------------------------------------------------------------------------------------------- RandAugment
class RandAugment:
    """timm's RandAugment for uint8 (B, 3, H, W) batches; see the module docstring.

    `fill`: RGB colour of uncovered pixels (timm: the normalisation mean x 255, 128 for TNT's 0.5).
    `interpolation`: "random" (bilinear or bicubic per op call, timm's default), "bilinear", "bicubic" or
    "nearest". `grouped`: see the module docstring (None: True on CPU, False elsewhere).
    """

    def __init__(self, spec: RandAugmentSpec, fill: Sequence[int] = (128, 128, 128),
                 interpolation: str = "random", grouped: bool | None = None):
        if interpolation not in INTERPOLATIONS:
            raise TntError(f"interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
        self.spec = spec
        self.ops = spec.ops
        self.fill = tuple(int(v) for v in fill)
        self.interpolation = interpolation
        self.grouped = grouped
        self._constants: dict = {}

    def __repr__(self) -> str:
        s = self.spec
        return (f"RandAugment(n={s.num_ops}, m={s.magnitude:g}, mstd={s.magnitude_std:g}, p={s.prob:g}, "
                f"ops={len(self.ops)}, fill={self.fill}, interpolation={self.interpolation})")

    # ------------------------------------------------------------------------------------------- draws
    def draw(self, batch: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Every random choice for a batch, on the generator's device: op index, applied, magnitude, sign and
        bicubic-or-not per image and op slot, each (batch, num_ops)."""
        device, s = generator.device, self.spec
        shape = (batch, s.num_ops)
        uniform = lambda: torch.rand(shape, generator=generator, device=device, dtype=torch.float64)  # noqa: E731
        op = torch.randint(0, len(self.ops), shape, generator=generator, device=device)
        applied = uniform() <= s.prob
        if math.isinf(s.magnitude_std):
            magnitude = uniform() * s.magnitude
        elif s.magnitude_std > 0:
            magnitude = torch.normal(s.magnitude, s.magnitude_std, shape, generator=generator, device=device,
                                     dtype=torch.float64)
        else:
            magnitude = torch.full(shape, float(s.magnitude), device=device, dtype=torch.float64)
        magnitude = magnitude.clamp(0.0, s.magnitude_max or LEVEL_DENOM)
        negate = uniform() > 0.5
        bicubic = uniform() < 0.5
        return {"op": op, "applied": applied, "magnitude": magnitude, "negate": negate, "bicubic": bicubic}

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """images: (B, 3, H, W) uint8 on the generator's device -> augmented copy, same shape and dtype."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"RandAugment expects (B, 3, H, W) uint8 images, got {tuple(images.shape)} "
                             f"{images.dtype}")
        if images.shape[0] == 0 or self.spec.num_ops == 0:
            return images
        return self.apply(images, self.draw(images.shape[0], generator))

    def apply(self, images: Tensor, draws: dict[str, Tensor]) -> Tensor:
        """Apply given draws (from `draw`): op slot after op slot, each image its own op."""
        # a copy of ours to update in place: the caller's (possibly reused FFCV) buffer stays intact
        x = images.clone(memory_format=torch.contiguous_format)
        for slot in range(draws["op"].shape[1]):
            x = self.apply_ops(x, draws["op"][:, slot].masked_fill(~draws["applied"][:, slot], -1),
                               draws["magnitude"][:, slot], draws["negate"][:, slot], draws["bicubic"][:, slot])
        return x

    def apply_ops(self, x: Tensor, op: Tensor, magnitude: Tensor, negate: Tensor, bicubic: Tensor) -> Tensor:
        """One op per image: op (B,) index into `self.ops` or -1 for none; magnitude (B,) float64 in [0, 10];
        negate, bicubic (B,) bool. x (B, 3, H, W) uint8 -> new uint8 tensor."""
        ids = self._op_ids(x.device)
        in_family = lambda names: torch.isin(op, ids[names])  # noqa: E731
        x = self._rows(in_family(LUT_OPS), self._lut_family, x, op, magnitude, negate)
        x = self._rows(in_family(COLOR_OPS), self._color_family, x, op, magnitude, negate)
        x = self._rows(in_family(SHARPNESS_OPS), self._sharpness_family, x, op, magnitude, negate)
        affine = in_family(AFFINE_OPS)
        if self.interpolation == "random":
            modes = (("bilinear", ~bicubic), ("bicubic", bicubic))
        else:
            modes = ((self.interpolation, torch.ones_like(bicubic)),)
        for mode, chosen in modes:
            x = self._rows(affine & chosen, lambda *t, mode=mode: self._affine_family(*t, mode=mode),
                           x, op, magnitude, negate)
        return x

    # ---------------------------------------------------------------------------------------- selection
    def _is_grouped(self, device: torch.device) -> bool:
        return self.grouped if self.grouped is not None else device.type == "cpu"

    def _rows(self, mask: Tensor, fn: Callable[..., Tensor], x: Tensor, *params: Tensor) -> Tensor:
        """x with its rows where `mask` holds replaced by fn(those rows, their params). Grouped: fn sees only
        those rows, written back into x in place; otherwise fn sees every row and `torch.where` keeps the
        others in a new tensor (no host sync)."""
        if self._is_grouped(x.device):
            index = mask.nonzero().flatten()
            if index.numel() == 0:
                return x
            return x.index_copy_(0, index, fn(x.index_select(0, index), *(p.index_select(0, index) for p in params)))
        return torch.where(mask.view(-1, *[1] * (x.dim() - 1)), fn(x, *params), x)

    def _op_ids(self, device: torch.device) -> dict:
        key = ("ids", device)
        if key not in self._constants:
            index = {name: i for i, name in enumerate(self.ops)}
            self._constants[key] = {
                names: torch.tensor([index[n] for n in names if n in index] or [-2], device=device)
                for names in (LUT_OPS, COLOR_OPS, SHARPNESS_OPS, AFFINE_OPS)}
        return self._constants[key]

    def _levels(self, device: torch.device) -> Tensor:
        key = ("levels", device)
        if key not in self._constants:
            self._constants[key] = torch.arange(256, dtype=torch.float64, device=device)
        return self._constants[key]

    def _is(self, op: Tensor, name: str) -> Tensor:
        return op == (self.ops.index(name) if name in self.ops else -2)

    # ------------------------------------------------------------------------------------------ families
    def _lut_family(self, x: Tensor, op: Tensor, magnitude: Tensor, negate: Tensor) -> Tensor:
        """All ops that are a per-image, per-channel lookup table, applied with one gather."""
        levels = self._levels(x.device)                        # (256,) float64
        n = x.shape[0]
        lut = levels.expand(n, 3, 256)
        arg = lambda name: LEVEL_TO_ARG[name](magnitude, negate).view(n, 1, 1)  # noqa: E731

        def choose(name: str, table: Callable[[], Tensor]) -> None:
            nonlocal lut
            if name in self.ops:
                lut = torch.where(self._is(op, name).view(n, 1, 1), table(), lut)

        choose("Invert", lambda: 255.0 - levels)
        for name in ("Posterize", "PosterizeIncreasing"):  # keep the top `bits` bits; bits >= 8: unchanged
            choose(name, lambda name=name: _posterize_lut(levels, arg(name)))
        for name in ("Solarize", "SolarizeIncreasing"):    # invert levels >= threshold
            choose(name, lambda name=name: torch.where(levels < arg(name), levels, 255.0 - levels))
        choose("SolarizeAdd", lambda: torch.where(levels < 128, (levels + arg("SolarizeAdd")).clamp(max=255),
                                                  levels))
        for name in ("Brightness", "BrightnessIncreasing"):   # blend with black
            choose(name, lambda name=name: _blend_levels(torch.zeros_like(levels), levels, arg(name)))
        # image statistics only for the images that need them (grouped), else for all (no sync)
        contrast = self._is(op, "Contrast") | self._is(op, "ContrastIncreasing")
        mean = self._rows(contrast, _luminance_mean, torch.zeros(n, dtype=torch.float64, device=x.device), x)
        for name in ("Contrast", "ContrastIncreasing"):   # blend with the mean grey level
            choose(name, lambda name=name: _blend_levels(mean.view(n, 1, 1), levels, arg(name)))
        stats = self._is(op, "AutoContrast") | self._is(op, "Equalize")
        hist = self._rows(stats, lambda _, images: histograms(images),
                          torch.zeros(n, 3, 256, dtype=torch.int64, device=x.device), x)
        choose("AutoContrast", lambda: autocontrast_luts(hist, levels).to(torch.float64))
        choose("Equalize", lambda: equalize_luts(hist, levels).to(torch.float64))
        return apply_luts(x, lut.to(torch.uint8).expand(n, 3, 256).contiguous())

    def _color_family(self, x: Tensor, op: Tensor, magnitude: Tensor, negate: Tensor) -> Tensor:
        """ImageEnhance.Color: blend with the image's greyscale (L) version."""
        name = "ColorIncreasing" if "ColorIncreasing" in self.ops else "Color"
        return blend(luminance(x), x, LEVEL_TO_ARG[name](magnitude, negate))

    def _sharpness_family(self, x: Tensor, op: Tensor, magnitude: Tensor, negate: Tensor) -> Tensor:
        """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image."""
        name = "SharpnessIncreasing" if "SharpnessIncreasing" in self.ops else "Sharpness"
        return blend(smooth(x), x, LEVEL_TO_ARG[name](magnitude, negate))

    def _affine_family(self, x: Tensor, op: Tensor, magnitude: Tensor, negate: Tensor, mode: str) -> Tensor:
        """Rotate / shear / translate as one batched resampling (PIL's AFFINE conventions, fill outside)."""
        n, _, h, w = x.shape
        matrix = affine_matrices(op, magnitude, negate, self.ops, width=w, height=h)
        return affine(x, matrix, mode=mode, fill=self._fill(x.device),
                      grid=self._pixel_centres(h, w, x.device))

    def _fill(self, device: torch.device) -> Tensor:
        key = ("fill", device)
        if key not in self._constants:
            self._constants[key] = torch.tensor(self.fill, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return self._constants[key]

    def _pixel_centres(self, h: int, w: int, device: torch.device) -> Tensor:
        key = ("grid", h, w, device)
        if key not in self._constants:
            self._constants[key] = pixel_centres(h, w, device)
        return self._constants[key]


def _posterize_lut(levels: Tensor, bits: Tensor) -> Tensor:
    shift = 2.0 ** (8 - bits.clamp(0, 8))
    return torch.floor(levels / shift) * shift


def _blend_levels(degenerate: Tensor, levels: Tensor, factor: Tensor) -> Tensor:
    """`blend` on the 256 levels (float32 maths as PIL), as float64 LUT values."""
    d = degenerate.to(torch.float32)
    out = d + factor.to(torch.float32) * (levels.to(torch.float32) - d)
    return out.clamp(0, 255).trunc().to(torch.float64)


def _luminance_mean(_: Tensor, images: Tensor) -> Tensor:
    """`int(ImageStat.Stat(image.convert("L")).mean[0] + 0.5)` per image: (N, 3, H, W) uint8 -> (N,) float64."""
    lum = luminance(images).flatten(1).sum(dim=1, dtype=torch.int64)
    return torch.floor(lum.to(torch.float64) / (images.shape[2] * images.shape[3]) + 0.5)


# --------------------------------------------------------------------------------------------- geometry
def pixel_centres(h: int, w: int, device: torch.device) -> Tensor:
    """(H, W, 3) float32 homogeneous output pixel centres (x + 0.5, y + 0.5, 1)."""
    ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy, torch.ones_like(gx)], dim=-1)


def affine_matrices(op: Tensor, magnitude: Tensor, negate: Tensor, ops: Sequence[str], *, width: int,
                    height: int) -> Tensor:
    """PIL AFFINE data (a, b, c, d, e, f) per image as (N, 2, 3) float64: the source point of output point
    (X, Y) is (aX + bY + c, dX + eY + f). Non-geometric ops get the identity."""
    n = op.shape[0]
    one, zero = torch.ones_like(magnitude), torch.zeros_like(magnitude)
    m = torch.stack([one, zero, zero, zero, one, zero], dim=1)   # identity

    def put(name: str, coefficients: Callable[[], list[Tensor]]) -> None:
        nonlocal m
        if name in ops:
            m = torch.where((op == ops.index(name)).view(n, 1), torch.stack(coefficients(), dim=1), m)

    def arg(name: str) -> Tensor:
        return LEVEL_TO_ARG[name](magnitude, negate)

    put("ShearX", lambda: [one, arg("ShearX"), zero, zero, one, zero])
    put("ShearY", lambda: [one, zero, zero, arg("ShearY"), one, zero])
    put("TranslateXRel", lambda: [one, zero, arg("TranslateXRel") * width, zero, one, zero])
    put("TranslateYRel", lambda: [one, zero, zero, zero, one, arg("TranslateYRel") * height])

    def rotation() -> list[Tensor]:  # PIL's Image.rotate about the centre (w/2, h/2)
        angle = -torch.deg2rad(arg("Rotate"))
        cos, sin = torch.cos(angle), torch.sin(angle)
        cx, cy = width / 2.0, height / 2.0
        return [cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy]

    put("Rotate", rotation)
    return m.view(n, 2, 3)


def affine(images: Tensor, matrix: Tensor, *, mode: str, fill: Tensor, grid: Tensor) -> Tensor:
    """Resample (N, 3, H, W) uint8 images with PIL AFFINE matrices (N, 2, 3): output pixels whose source point
    falls outside the image get `fill` (1, 3, 1, 1); inside, sampling clamps at the edges (PIL's XCLIP).
    `grid`: `pixel_centres(H, W)`. Bilinear/bicubic results are truncated to uint8 as PIL does."""
    n, _, h, w = images.shape
    src = torch.einsum("hwk,njk->nhwj", grid, matrix.to(torch.float32))          # (N, H, W, 2) source points
    size = grid[-1, -1, :2] + 0.5                # (W, H) from the last pixel centre: no host tensor per call
    inside = ((src >= 0) & (src < size)).all(dim=-1).unsqueeze(1)
    if mode == "nearest":                 # PIL takes floor(source); sample at that pixel's centre
        src = torch.floor(src) + 0.5
    normalised = src.mul_(2.0 / size).sub_(1.0)                                 # grid_sample's [-1, 1]
    sampled = F.grid_sample(images.to(torch.float32), normalised, mode=mode, padding_mode="border",
                            align_corners=False)
    out = torch.where(inside, sampled, fill)
    return out.clamp_(0, 255).to(torch.uint8)   # the cast truncates, as PIL
