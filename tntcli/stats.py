"""Uncertainty of compared accuracies: mean and spread over seeds, paired differences with a 95% interval.

Two runs of one variant differ by seed (initialisation, data order, augmentation draws), so a difference between
variants means something only beside that spread. Each variant is run with the same seeds as its baseline and
compared seed by seed (a paired difference):

- two or more seeds: Student's t interval over the per-seed differences (scipy's t quantile, n - 1 degrees of
  freedom);
- one seed: a paired bootstrap over the validation images, from each run's per-image correctness
  (`val_predictions.csv`); it covers the sampling of the validation images only, not the seed.

The verdict reads the interval: entirely above zero `better`, entirely below `worse`, otherwise `within noise`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BETTER, WORSE, NOISE, UNKNOWN = "better", "worse", "within noise", "unknown"
BOOTSTRAP_SAMPLES = 10_000


@dataclass
class Spread:
    """Mean, sample standard deviation (ddof 1; NaN for one value) and count of per-seed accuracies."""
    mean: float
    std: float
    n: int


def spread(values: list[float]) -> Spread:
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return Spread(float("nan"), float("nan"), 0)
    return Spread(float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else float("nan"), len(x))


@dataclass
class PairedDelta:
    """Variant minus baseline, in accuracy points: the mean paired difference and its 95% interval."""
    delta: float
    low: float
    high: float
    n_pairs: int
    method: str                  # "t over N seeds", "bootstrap over M images" or why there is no interval

    @property
    def verdict(self) -> str:
        if math.isnan(self.low) or math.isnan(self.high):
            return UNKNOWN
        return BETTER if self.low > 0 else WORSE if self.high < 0 else NOISE


def t_interval(differences: list[float], confidence: float = 0.95) -> PairedDelta:
    """Student t interval of the mean of paired differences (one per seed); needs two or more."""
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    n = len(d)
    if n < 2:
        mean = float(d.mean()) if n else float("nan")
        return PairedDelta(mean, float("nan"), float("nan"), n, "one seed: no interval over seeds")
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    mean = float(d.mean())
    return PairedDelta(mean, mean - half, mean + half, n, f"t over {n} seeds")


def bootstrap_interval(variant_correct: np.ndarray, base_correct: np.ndarray, confidence: float = 0.95,
                       samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> PairedDelta:
    """Percentile bootstrap of top-1(variant) - top-1(base) in points, resampling validation images (paired:
    the same images for both). `*_correct`: (N,) bools, image i of both runs being the same image."""
    a, b = np.asarray(variant_correct, dtype=float), np.asarray(base_correct, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"per-image correctness of different validation sets: {a.shape} vs {b.shape}")
    diff = a - b                                             # -1, 0 or 1 per image
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 1000):                    # 1000 resamples at a time: bounded memory
        idx = rng.integers(0, len(diff), size=(min(1000, samples - start), len(diff)))
        means[start:start + len(idx)] = diff[idx].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail]) * 100
    return PairedDelta(float(diff.mean() * 100), float(low), float(high), 1,
                       f"bootstrap over {len(diff)} val images")


def paired_delta(variant: dict[int, float], base: dict[int, float],
                 correct: tuple[np.ndarray | None, np.ndarray | None] | None = None) -> PairedDelta:
    """Variant vs baseline over the seeds both have (seed -> top-1 %). With one shared seed, the per-image
    correctness of that seed's two runs (`correct` = (variant, base)) gives a bootstrap interval instead."""
    seeds = sorted(set(variant) & set(base))
    if not seeds:
        return PairedDelta(float("nan"), float("nan"), float("nan"), 0, "no seed run by both")
    differences = [variant[s] - base[s] for s in seeds]
    if len(seeds) >= 2:
        return t_interval(differences)
    if correct is not None and correct[0] is not None and correct[1] is not None:
        boot = bootstrap_interval(*correct)
        return PairedDelta(differences[0], boot.low, boot.high, 1, boot.method)
    return PairedDelta(differences[0], float("nan"), float("nan"), 1,
                       "one seed and no val_predictions.csv: no interval")
