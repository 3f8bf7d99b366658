"""How sure a comparison is: paired bootstrap intervals over test images and training seeds,
per-image win rates, and rankings that call overlapping methods tied.

A method's error on a test set has two sources of chance: which test images were drawn and
which training seed made the model. An interval over images alone answers "would another
test set agree?" for one trained model; resampling the seeds as well answers "would another
training run agree?", which is the question a comparison of methods asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from dgm_eit.errors import InputError

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A relative change in percent (negative: lower error than the reference) and its
    confidence interval."""

    change: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """``better`` when the whole interval lies below 0, ``worse`` above, else ``tied``."""
        if self.high < 0:
            return "better"
        if self.low > 0:
            return "worse"
        return "tied"

    def overlaps(self, other: "Interval") -> bool:
        return self.low <= other.high and other.low <= self.high

    def format(self) -> str:
        return f"{self.change:+.0f}% [{self.low:+.0f}, {self.high:+.0f}]"


def _errors(method, reference) -> tuple[np.ndarray, np.ndarray]:
    method = np.asarray(method, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if method.ndim == 1:
        method = method[None]
    if method.ndim != 2 or reference.ndim != 1 or method.shape[1] != reference.shape[0]:
        raise InputError(f"per-image errors must be (seeds, images) and (images,), got {method.shape} "
                         f"and {reference.shape}")
    if method.shape[1] == 0:
        raise InputError("no test images to compare")
    if not (np.isfinite(method).all() and np.isfinite(reference).all()):
        raise InputError("per-image errors contain NaN or infinite values")
    if reference.mean() <= 0:
        raise InputError("the reference's mean error is 0: a relative change is undefined")
    return method, reference


def _draws(rng: np.random.Generator, k: int, n: int, b: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``b`` bootstrap draws of ``n`` image indices and, when ``k`` > 1, ``k`` seed indices."""
    images = rng.integers(0, n, size=(b, n))
    seeds = rng.integers(0, k, size=(k, b)) if k > 1 else None
    return images, seeds


def _resampled_mean(values: np.ndarray, images: np.ndarray, seeds: np.ndarray | None) -> np.ndarray:
    """The mean of (K, N) ``values`` over each draw's images, then over its seeds: (b,)."""
    per_seed = values[:, images].mean(axis=2)                      # (K, b): each seed on the drawn images
    if seeds is not None:
        per_seed = np.take_along_axis(per_seed, seeds, axis=0)
    return per_seed.mean(axis=0)


def _percentiles(samples: np.ndarray, point: float, level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    # a statistic that is the same in every resample gives a zero-width interval; keep the
    # bounds on the right side of the point against rounding
    return float(min(low, point)), float(max(high, point))


def relative_change(method, reference, *, resamples: int = 2000, seed: int = 0, level: float = LEVEL,
                    chunk: int = 250) -> Interval:
    """Relative change of the mean error, ``100 (mean(method) / mean(reference) - 1)``, with a
    paired percentile-bootstrap interval.

    ``method`` (K, N): the error of K training seeds on N test images; ``reference`` (N,):
    the same images' error of the reference (GN, which has no seed). Each resample draws N
    images with replacement, the same ones for both (paired), and, when K > 1, K seeds with
    replacement; ``resamples`` and ``seed`` fix the draw."""
    method, reference = _errors(method, reference)
    if resamples < 1:
        raise InputError(f"the bootstrap needs at least one resample, got {resamples}")
    k, n = method.shape
    rng = np.random.default_rng(seed)
    changes = []
    for start in range(0, resamples, chunk):
        images, seeds = _draws(rng, k, n, min(chunk, resamples - start))
        changes.append(_resampled_mean(method, images, seeds) / reference[images].mean(axis=1) - 1.0)
    point = 100.0 * (method.mean() / reference.mean() - 1.0)
    return Interval(float(point), *_percentiles(100.0 * np.concatenate(changes), point, level))


def mean_interval(values, *, resamples: int = 2000, seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean of (K, N) ``values`` (K seeds, N images) with a percentile-bootstrap interval
    over the images, and the seeds when K > 1 (``change`` holds the mean itself)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[None] if values.ndim == 1 else values
    if values.ndim != 2 or values.shape[1] == 0 or not np.isfinite(values).all():
        raise InputError(f"values must be a finite (seeds, images) array, got shape {values.shape}")
    images, seeds = _draws(np.random.default_rng(seed), *values.shape, resamples)
    point = float(values.mean())
    return Interval(point, *_percentiles(_resampled_mean(values, images, seeds), point, level))


def paired_interval(first, second, *, resamples: int = 2000, seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean of ``first - second`` with a paired percentile-bootstrap interval: (K1, N) and
    (K2, N) values (seeds, images) of the same N images. Every pair of their seeds is one row of
    the difference, so a resample draws images (the same for both) and seed pairs."""
    a, b = (np.asarray(x, dtype=np.float64) for x in (first, second))
    a, b = (x[None] if x.ndim == 1 else x for x in (a, b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"a paired difference needs (seeds, images) values of the same images, got shapes "
                         f"{np.shape(first)} and {np.shape(second)}")
    difference = (a[:, None, :] - b[None, :, :]).reshape(-1, a.shape[1])
    return mean_interval(difference, resamples=resamples, seed=seed, level=level)


def order_agreement(pairs: Mapping[tuple[str, str], Interval], scores: Mapping[str, float]) -> dict[str, list]:
    """Which of the pairs one source separates another orders alike (higher is better in both).

    ``pairs[a, b]``: the interval of ``a - b`` on the first source (say, paired validation
    scores); ``scores``: one number per method on the second (the real targets' totals). Returns
    the pairs as ``agree`` (the interval excludes 0 and the second source orders them the same
    way), ``disagree`` (it excludes 0, the second source orders them the other way or ties them)
    and ``tied`` (the interval holds 0: the first source cannot order them)."""
    out = {"agree": [], "disagree": [], "tied": []}
    for (a, b), iv in pairs.items():
        if iv.low <= 0.0 <= iv.high:
            out["tied"].append((a, b))
        else:
            same = (scores[a] - scores[b]) * (1.0 if iv.low > 0 else -1.0) > 0
            out["agree" if same else "disagree"].append((a, b))
    return out


def std_interval(values, level: float = LEVEL) -> tuple[float, float, float]:
    """``(std, low, high)``: the sample std (ddof 1) of ``values`` with its chi-square
    confidence interval, for values drawn from one normal distribution. With 3 values (2
    degrees of freedom) the 95% interval runs from 0.52 to 6.3 times the estimate: three
    training seeds cannot show that a spread is below a goal unless it is far below."""
    from scipy.stats import chi2

    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) < 2 or not np.isfinite(values).all():
        raise InputError(f"a std interval needs at least 2 finite values, got {values.tolist()}")
    dof = len(values) - 1
    std = float(np.std(values, ddof=1))
    tail = (1.0 - level) / 2
    return std, std * float(np.sqrt(dof / chi2.ppf(1 - tail, dof))), std * float(np.sqrt(dof / chi2.ppf(tail, dof)))


def spread_verdict(low: float, high: float, goal: float) -> str:
    """``met`` when a std's whole interval lies at or below ``goal``, ``missed`` when above it,
    else ``undecided`` (more seeds would tell)."""
    if high <= goal:
        return "met"
    if low > goal:
        return "missed"
    return "undecided"


def win_rate(method, reference) -> float:
    """The share of (seed, image) pairs on which ``method``'s error is below ``reference``'s."""
    method, reference = _errors(method, reference)
    return float(np.mean(method < reference[None, :]))


def ranks(intervals: Mapping[str, Interval]) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Rank methods by their change (lower is better): a method's rank is 1 + the number of
    methods whose whole interval lies below its own, so methods whose intervals overlap are
    never ordered against each other. Returns ``{name: (rank, names it is tied with)}``."""
    out = {}
    for name, iv in intervals.items():
        better = sum(1 for other, o in intervals.items() if other != name and o.high < iv.low)
        tied = tuple(other for other, o in intervals.items() if other != name and o.overlaps(iv))
        out[name] = (1 + better, tied)
    return out


def rank_agreement(first: Mapping[str, float], second: Mapping[str, float]) -> float:
    """Spearman's rank correlation of two scores of the same methods (1: both order the
    methods alike, -1: in reverse); ties get their mean rank. How well one data source (a
    simulated validation set, say) predicts the ranking on another (real targets)."""
    from scipy.stats import spearmanr

    names = sorted(first)
    if sorted(second) != names:
        raise InputError(f"rank agreement needs scores of the same methods, got {names} and {sorted(second)}")
    if len(names) < 3:
        raise InputError(f"rank agreement needs at least 3 methods, got {len(names)}")
    a, b = (np.array([scores[n] for n in names], dtype=float) for scores in (first, second))
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        raise InputError("rank agreement is undefined when one score gives every method the same value")
    return float(spearmanr(a, b).statistic)
