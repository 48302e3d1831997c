"""Our batched RandAugment / erasing / MixUp-CutMix against timm's (PIL) implementation, op by op.

Tolerances (max |ours - timm| in 8-bit levels, over synthetic smooth and noise images, m in 0/5/9/10, both
signs of the random negation):
- every pixel op (AutoContrast, Equalize, Invert, Posterize*, Solarize*, SolarizeAdd, Color*, Contrast*,
  Brightness*, Sharpness*): 0, the same integer/float arithmetic as PIL.
- geometric ops (Rotate, ShearX/Y, TranslateX/YRel): nearest 0 (same matrices, fill and coverage test);
  bilinear 1 (float32 grid vs PIL's double coordinates, both truncating); bicubic: PIL's affine bicubic uses
  the cubic kernel a=-1, torch's grid_sample a=-0.75, so results differ: <= BICUBIC_TOLERANCE on smooth
  images (measured 2-3); not asserted: up to 12 on 32px CIFAR-10 photos and 23 on white noise.
- PosterizeIncreasing at m=10 (and Posterize at m=0) keeps 0 bits: the image turns black, which is what
  Pillow < 10 (the official runs) did; newer Pillow refuses `posterize(img, 0)` and timm then raises, so that
  case is compared with black.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from tntcli.data.augment import BatchAugment, ImagePipeline, MixupCutmix, RandomErasing, AugmentSettings
from tntcli.data.randaugment import (LEVEL_TO_ARG, OPS, OPS_INCREASING, RandAugment, RandAugmentSpec,
                                     parse_rand_augment)

aa = pytest.importorskip("timm.data.auto_augment")
MAGNITUDES = (0, 5, 9, 10)
AFFINE = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
PIXEL_OPS = tuple(dict.fromkeys(o for o in OPS_INCREASING + OPS if o not in AFFINE))
BICUBIC_TOLERANCE = 4
GEOMETRY_NOTE = "PIL affine bicubic: a=-1; torch grid_sample bicubic: a=-0.75"
PIL_MODES = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def smooth_images(n: int, h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8 photo-like images: smooth colour waves plus mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for _ in range(n):
        chans = [127.5 + 90 * np.sin(xx / w * rng.uniform(1, 6) + yy / h * rng.uniform(1, 6) + rng.uniform(0, 6))
                 for _ in range(3)]
        img = np.stack(chans, -1) * rng.uniform(0.5, 1.0) + rng.uniform(-40, 40) + rng.normal(0, 6, (h, w, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def noise_images(n: int, h: int = 40, w: int = 48, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def to_batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).contiguous()


def timm_op(name: str, magnitude: float, negate: bool, image: np.ndarray, interpolation: str = "bilinear"):
    """timm's AugmentOp (prob 1, fixed magnitude) on one image, with `_randomly_negate` forced."""
    op = aa.AugmentOp(name, prob=1.0, magnitude=magnitude,
                      hparams={"img_mean": (128, 128, 128), "interpolation": PIL_MODES[interpolation]})
    saved = random.random
    random.random = (lambda: 0.9) if negate else (lambda: 0.1)  # _randomly_negate: negative when > 0.5
    try:
        return np.asarray(op(Image.fromarray(image)))
    except ValueError:
        if name.startswith("Posterize"):  # 0 bits: Pillow >= 10 refuses, Pillow < 10 (official runs) gave black
            return np.zeros_like(image)
        raise
    finally:
        random.random = saved


def ours(name: str, magnitude: float, negate: bool, images: np.ndarray, interpolation: str = "bilinear"):
    ops = OPS_INCREASING if name in OPS_INCREASING else OPS
    ra = RandAugment(RandAugmentSpec(increasing=ops is OPS_INCREASING), interpolation=interpolation)
    n = len(images)
    out = ra.apply_ops(to_batch(images), torch.full((n,), ops.index(name)),
                       torch.full((n,), float(magnitude), dtype=torch.float64), torch.full((n,), negate),
                       torch.full((n,), interpolation == "bicubic"))
    return out.permute(0, 2, 3, 1).numpy()


def max_diff(name: str, images: np.ndarray, interpolation: str = "bilinear") -> int:
    worst = 0
    for m in MAGNITUDES:
        for negate in (False, True):
            ref = np.stack([timm_op(name, m, negate, img, interpolation) for img in images])
            worst = max(worst, int(np.abs(ours(name, m, negate, images, interpolation).astype(int) - ref).max()))
    return worst


# ------------------------------------------------------------------------------------------ op list, spec
def test_op_lists_are_timms():
    assert OPS_INCREASING == tuple(aa._RAND_INCREASING_TRANSFORMS)
    assert OPS == tuple(aa._RAND_TRANSFORMS)


def test_recipe_string_parses_as_timm_does():
    timm_ra = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": (128, 128, 128)})
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert spec.num_ops == timm_ra.num_layers == 2 and timm_ra.choice_weights is None  # uniform, with replacement
    assert spec.ops == tuple(op.name for op in timm_ra.ops)
    first = timm_ra.ops[0]
    assert (spec.magnitude, spec.prob, spec.magnitude_std, spec.magnitude_max) == (
        first.magnitude, first.prob, first.magnitude_std, first.magnitude_max)
    assert parse_rand_augment("rand-m7-n3-p0.8-mstd101-mmax12").magnitude_std == float("inf")
    assert parse_rand_augment("rand-m9").ops == OPS  # timm's default is inc0


@pytest.mark.parametrize("name", [n for n in dict.fromkeys(OPS_INCREASING + OPS) if LEVEL_TO_ARG[n]])
def test_magnitude_to_argument_is_timms(name):
    for m in MAGNITUDES + (0.3, 4.5, 9.7):
        for negate in (False, True):
            saved = random.random
            random.random = (lambda: 0.9) if negate else (lambda: 0.1)
            try:
                (expected,) = aa.LEVEL_TO_ARG[name](m, {"translate_pct": 0.45})
            finally:
                random.random = saved
            got = LEVEL_TO_ARG[name](torch.tensor([m], dtype=torch.float64), torch.tensor([negate]))
            assert got.item() == expected, (name, m, negate)


def test_magnitude_draws_follow_timms_rule():
    """N(9, 0.5) clipped to [0, 10]; each op applied with p=0.5; ops uniform over 15, with replacement."""
    ra = RandAugment(parse_rand_augment("rand-m9-mstd0.5-inc1"))
    d = ra.draw(20000, torch.Generator().manual_seed(0))
    m = d["magnitude"]
    assert m.min() >= 0 and m.max() == 10.0           # clipped at 10 (about 2 % of draws)
    assert abs(m.mean() - 8.99) < 0.02 and abs(m[m < 10].std() - 0.47) < 0.03
    assert abs(d["applied"].double().mean() - 0.5) < 0.02
    counts = torch.bincount(d["op"].flatten(), minlength=15).double() / d["op"].numel()
    assert counts.min() > 0.055 and counts.max() < 0.078
    assert abs((d["op"][:, 0] == d["op"][:, 1]).double().mean() - 1 / 15) < 0.01  # with replacement
    assert abs(d["negate"].double().mean() - 0.5) < 0.02 and abs(d["bicubic"].double().mean() - 0.5) < 0.02


# ------------------------------------------------------------------------------------- outputs vs PIL
@pytest.mark.parametrize("name", PIXEL_OPS)
def test_pixel_ops_equal_pil(name):
    images = np.concatenate([smooth_images(3), noise_images(2)])
    assert max_diff(name, images) == 0


@pytest.mark.parametrize("name", AFFINE)
@pytest.mark.parametrize("interpolation, tolerance", [("nearest", 0), ("bilinear", 1),
                                                      ("bicubic", BICUBIC_TOLERANCE)])
def test_geometric_ops_match_pil(name, interpolation, tolerance):
    images = smooth_images(3) if interpolation == "bicubic" else np.concatenate([smooth_images(2), noise_images(1)])
    assert max_diff(name, images, interpolation) <= tolerance, GEOMETRY_NOTE


def test_fill_colour_is_the_mean_and_covers_what_pil_uncovers():
    ra = RandAugment(RandAugmentSpec(increasing=True), fill=(10, 20, 30), interpolation="nearest")
    x = torch.full((1, 3, 16, 16), 200, dtype=torch.uint8)
    out = ra.apply_ops(x, torch.tensor([OPS_INCREASING.index("TranslateXRel")]),
                       torch.tensor([10.0], dtype=torch.float64), torch.tensor([False]), torch.tensor([False]))
    assert out[0, :, :, -7:].flatten(1).unique(dim=1).tolist() == [[10], [20], [30]]   # 45 % of 16 px
    assert (out[0, :, :, :9] == 200).all()


# ------------------------------------------------------------------------------------------- batching
def test_grouped_and_masked_batching_give_the_same_images():
    images = to_batch(np.concatenate([smooth_images(12), noise_images(4)]))
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    grouped, masked = RandAugment(spec, grouped=True), RandAugment(spec, grouped=False)
    for seed in range(3):
        a = grouped(images, torch.Generator().manual_seed(seed))
        b = masked(images, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)


def test_each_image_gets_its_own_ops_and_the_seed_fixes_them():
    images = to_batch(np.repeat(smooth_images(1), 32, axis=0))
    ra = RandAugment(parse_rand_augment("rand-m9-mstd0.5-inc1"))
    out = ra(images, torch.Generator().manual_seed(0))
    distinct = {bytes(img.numpy().tobytes()) for img in out}
    assert len(distinct) > 20                             # same input, different ops/magnitudes per image
    assert torch.equal(out, ra(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, ra(images, torch.Generator().manual_seed(1)))
    assert images.dtype == out.dtype and images.shape == out.shape


def test_the_device_path_has_no_host_syncs_or_per_batch_host_tensors(monkeypatch):
    """Masked mode (the CUDA default) on a CPU tensor: no .item()/.tolist()/bool(tensor), and after the first
    call (which builds the cached constants) no host tensor is created from Python data."""
    images = to_batch(smooth_images(8))
    labels = torch.arange(8) % 3
    pipeline = ImagePipeline(AugmentSettings(), mean=(0.5,) * 3, std=(0.5,) * 3, grouped=False)
    mix = BatchAugment(AugmentSettings(), 3)
    mix(pipeline(images, seed=0), labels)      # warm-up: constants built once per device

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync or host tensor on the batch path")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, forbidden)
    out, targets = mix(pipeline(images, seed=1), labels)
    monkeypatch.undo()
    assert out.shape == (8, 3, 40, 48) and targets.shape == (8, 3)


def test_normalisation_turns_ffcvs_channels_last_view_into_a_contiguous_batch():
    """FFCV hands over (B, H, W, 3) buffers viewed as NCHW; later ops (erasing, MixUp, the model) are several
    times slower on a channels-last float batch, so the pipeline's output is contiguous, with the same values."""
    nhwc = torch.from_numpy(smooth_images(4))
    view = nhwc.permute(0, 3, 1, 2)
    out = ImagePipeline(None, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))(view)
    assert out.is_contiguous()
    expected = (view.contiguous().double() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / \
        torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(out.double(), expected, atol=1e-5)


# --------------------------------------------------------------------------------- erasing, mixup
def test_random_erasing_follows_timms_pixel_mode():
    x = torch.zeros(4000, 3, 20, 30)
    erasing = RandomErasing(0.25)
    out = erasing(x, torch.Generator().manual_seed(0))
    erased = (out != 0).flatten(1).any(1)
    assert abs(erased.double().mean() - 0.25) < 0.03
    area = (out[erased, 0] != 0).flatten(1).sum(1).double() / 600   # one channel's box
    assert area.min() >= 0.015 and area.max() <= 1 / 3 + 0.03       # U(0.02, 1/3) of the area, rounded sides
    noise = out[erased][out[erased] != 0]
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02  # per-pixel N(0, 1) ('pixel' mode)
    masked = RandomErasing(0.25, grouped=False)(x, torch.Generator().manual_seed(0))
    assert torch.equal(masked != 0, out != 0)  # same boxes; the noise is drawn for other shapes, so differs


def test_mixup_cutmix_match_timm_with_label_smoothing():
    """Our targets + the engine's `cross_entropy(label_smoothing=s)` == timm's smoothed mixup targets."""
    mixup = pytest.importorskip("timm.data.mixup")
    x, labels = torch.randn(8, 3, 12, 16), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    mix = MixupCutmix(0.8, 1.0, switch_prob=0.5, num_classes=5)
    seen = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        d = mix.draw(x.shape, torch.Generator().manual_seed(seed))
        out, targets = mix(x, labels, g)
        lam = float(d["lam"])
        if bool(d["use_cutmix"]):
            box = d["box"][0, 0]
            assert torch.equal(out[:, :, box], x.flip(0)[:, :, box]) and torch.equal(out[:, :, ~box], x[:, :, ~box])
            assert lam == pytest.approx(1 - box.double().mean().item())
        else:
            assert torch.allclose(out, x * lam + x.flip(0) * (1 - lam), atol=1e-6)
        seen.add(bool(d["use_cutmix"]))
        logits = torch.randn(8, 5)
        ours_loss = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
        timm_target = mixup.mixup_target(labels, 5, lam, smoothing=0.1)
        timm_loss = -(timm_target * logits.log_softmax(1)).sum(1).mean()
        assert ours_loss.item() == pytest.approx(timm_loss.item(), rel=1e-5)
    assert seen == {True, False}


def test_batch_augment_draws_are_a_function_of_epoch_and_step():
    x, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    aug = BatchAugment(AugmentSettings(), 3, seed=3)
    aug.set_epoch(2, 5)
    first = aug(x, labels)
    aug.set_epoch(2, 5)
    assert torch.equal(aug(x, labels)[0], first[0])
    aug.set_epoch(2, 6)
    assert not torch.equal(aug(x, labels)[0], first[0])
