"""Image-quality metrics: one implementation used for every method (the paper's reference code
computed them differently per model, with swapped arguments and clamping for some models only).

All metrics are computed on the full image (the zero background outside the disk
included), per sample, against the ground truth ``x`` of that sample:

========  =======================================================  ==============
name      definition                                               better
========  =======================================================  ==============
MSE       mean((x̂ - x)²)                                           lower
PSNR      10 log10(R² / MSE), R = max(x) - min(x)                  higher
SSIM      Wang et al. 2004 with data range R (settings below)      higher
RE        ‖x̂ - x‖₁ / ‖x‖₁                                          lower
AE        mean(|x̂ - x|)                                            lower
DR        (max x̂ - min x̂) / (max x - min x)                        closest to 1
========  =======================================================  ==============

The paper's reference code computed these differently per model (swapped arguments,
clamping for some models only); here nothing is clamped or rescaled, so a method that
overshoots is charged for it.

SSIM settings (:data:`SSIM_SETTINGS`) are pinned because scikit-image's defaults have
changed across releases and the window matters on 32 x 32 images: a 7 x 7 uniform
window (``gaussian_weights=False``), sample covariance, K1 = 0.01, K2 = 0.03, and the data
range R of the ground truth (never of the prediction, so every method is measured
against the same scale). Summaries are mean and population standard deviation
(``ddof=0``) over the samples.

Calibration of a std map (:func:`evaluate_calibration`), for the methods that give each pixel
a posterior mean x̂ and std s. The reconstruction files keep only these two, so the posterior
of a pixel is approximated by the Gaussian N(x̂, s²): its central interval of level p is
x̂ ± z s, z the (1 + p)/2 quantile of the standard normal (1.645 for 90%). Unlike the metrics
above, these are computed over the pixels inside the disk only (the mask of the phantoms and
figures, :func:`dgm_eit.data.phantoms.disk_mask`): outside it the truth, the mean and the std
are all 0, so those pixels would count as covered and flatter every std map.

===================  =====================================================================
coverageNN           share of disk pixels whose truth lies in the central NN% interval, for
                     each level of :data:`COVERAGE_LEVELS` (coverage90: the 90% interval; a
                     calibrated std map gives 0.9, less is over-confident, more
                     under-confident); a pixel of std 0 is covered only if its error is 0
std_err_corr_pixels  Pearson correlation of s and |x̂ - x| over every disk pixel of every image
std_err_corr_images  Pearson correlation, over the images, of each image's mean s and its RMSE
===================  =====================================================================

A correlation is NaN where either side is constant (a constant std map points at no error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dgm_eit.data.phantoms import disk_mask
from dgm_eit.errors import InputError

METRICS = ("MSE", "PSNR", "SSIM", "RE", "AE", "DR")
LOWER_IS_BETTER = {"MSE": True, "PSNR": False, "SSIM": False, "RE": True, "AE": True, "DR": None}

SSIM_SETTINGS = {
    "win_size": 7,
    "gaussian_weights": False,
    "use_sample_covariance": True,
    "K1": 0.01,
    "K2": 0.03,
}

# nominal levels of the central intervals whose observed coverage makes the calibration curve
COVERAGE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# the interval a study calibrates the std maps to (run.calibration_images) and its report leads with
CALIBRATION_LEVEL = 0.9


def coverage_name(level: float) -> str:
    """The name of the coverage of the central interval of ``level``: ``coverage90`` for 0.9."""
    return f"coverage{round(100 * level)}"


COVERAGE = tuple(coverage_name(p) for p in COVERAGE_LEVELS)
CALIBRATION = (*COVERAGE, "std_err_corr_pixels", "std_err_corr_images")
SCALED_COVERAGE = tuple(f"{name}_scaled" for name in COVERAGE)   # of the std maps times their validation scale


@dataclass(frozen=True)
class Summary:
    """Mean and population std of one metric over ``n`` samples."""

    mean: float
    std: float
    n: int

    def format(self, digits: int = 4) -> str:
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def _as_batch(array, what: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise InputError(f"{what} must be images of shape (N,H,W), got shape {array.shape}")
    if array.shape[0] == 0:
        raise InputError(f"{what} holds no images")
    if not np.all(np.isfinite(array)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(array), axis=(1, 2)))[0])
        raise InputError(f"{what} contains NaN or infinite values (first in sample {bad})")
    return array


def check_pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``(pred, truth)`` as float64 arrays of the same (N,H,W) shape."""
    pred = _as_batch(pred, "prediction")
    truth = _as_batch(truth, "ground truth")
    if pred.shape != truth.shape:
        raise InputError(f"prediction has shape {pred.shape} but the ground truth has shape {truth.shape}")
    ranges = truth.max(axis=(1, 2)) - truth.min(axis=(1, 2))
    if np.any(ranges <= 0):
        bad = int(np.flatnonzero(ranges <= 0)[0])
        raise InputError(f"ground-truth sample {bad} is constant; PSNR, SSIM and DR need a non-zero range")
    return pred, truth


def ssim(pred: np.ndarray, truth: np.ndarray, data_range: float) -> float:
    """SSIM of one image pair with the pinned :data:`SSIM_SETTINGS`."""
    from skimage.metrics import structural_similarity

    if min(truth.shape) < SSIM_SETTINGS["win_size"]:
        raise InputError(f"images of shape {truth.shape} are smaller than the SSIM window {SSIM_SETTINGS['win_size']}")
    return float(structural_similarity(truth, pred, data_range=data_range, **SSIM_SETTINGS))


def per_sample(pred, truth) -> dict[str, np.ndarray]:
    """Each metric of :data:`METRICS` for every sample: ``{name: (N,) array}``."""
    pred, truth = check_pair(pred, truth)
    axes = (1, 2)
    err = pred - truth
    mse = np.mean(err**2, axis=axes)
    data_range = truth.max(axis=axes) - truth.min(axis=axes)
    with np.errstate(divide="ignore"):
        # a perfect reconstruction has MSE 0 and infinite PSNR, which is the honest value
        psnr = 10.0 * np.log10(data_range**2 / mse)
    truth_l1 = np.sum(np.abs(truth), axis=axes)
    if np.any(truth_l1 == 0):
        raise InputError("a ground-truth image is all zeros; RE is undefined")
    return {
        "MSE": mse,
        "PSNR": psnr,
        "SSIM": np.array([ssim(p, t, r) for p, t, r in zip(pred, truth, data_range)]),
        "RE": np.sum(np.abs(err), axis=axes) / truth_l1,
        "AE": np.mean(np.abs(err), axis=axes),
        "DR": (pred.max(axis=axes) - pred.min(axis=axes)) / data_range,
    }


def summarize(values: dict[str, np.ndarray]) -> dict[str, Summary]:
    """Mean and population std (ddof=0) of each per-sample metric array."""
    # an exact reconstruction has PSNR = inf, whose std is NaN; that is reported, not warned about
    with np.errstate(invalid="ignore"):
        return {name: Summary(float(np.mean(v)), float(np.std(v)), int(len(v))) for name, v in values.items()}


def evaluate(pred, truth) -> dict[str, Summary]:
    """Score a batch of reconstructions against the ground truth: ``{metric: Summary}``."""
    return summarize(per_sample(pred, truth))


# ---------------------------------------------------------------------------------------
# calibration of std maps


def central_interval_z(levels=COVERAGE_LEVELS) -> np.ndarray:
    """z of the central Gaussian interval mean ± z std of each level: the (1 + p)/2 normal quantile."""
    from scipy.special import ndtri

    levels = np.asarray(levels, dtype=np.float64)
    if np.any((levels <= 0) | (levels >= 1)):
        raise InputError(f"interval levels must lie in (0, 1), got {levels.tolist()}")
    return ndtri((1.0 + levels) / 2.0)


def disk_pixels(pred, std, truth) -> tuple[np.ndarray, np.ndarray]:
    """``(|pred - truth|, std)`` at the disk pixels of each image, each ``(N, P)`` float64."""
    pred = _as_batch(pred, "posterior mean")
    std = _as_batch(std, "std map")
    truth = _as_batch(truth, "ground truth")
    if not pred.shape == std.shape == truth.shape:
        raise InputError(f"posterior mean {pred.shape}, std map {std.shape} and ground truth {truth.shape} "
                         "must have the same shape")
    if pred.shape[1] != pred.shape[2]:
        raise InputError(f"images of the disk must be square, got shape {pred.shape[1:]}")
    if np.any(std < 0):
        raise InputError("the std map has negative values")
    inside = disk_mask(pred.shape[-1])
    return np.abs(pred - truth)[:, inside], std[:, inside]


def coverage(abs_error: np.ndarray, std: np.ndarray, levels=COVERAGE_LEVELS) -> np.ndarray:
    """``(N, L)``: per image (row of ``abs_error`` and ``std``, ``(N, P)``), the share of its
    pixels whose truth lies in the Gaussian central interval mean ± z std of each level.

    The bounds are inclusive, so a pixel of std 0 (an interval of one point) is covered only
    when its error is exactly 0."""
    # one level at a time: an (N, P, L) array of a paper-sized test set would take gigabytes
    return np.stack([np.mean(abs_error <= z * std, axis=1) for z in central_interval_z(levels)], axis=1)


def pearson(a, b) -> float:
    """Pearson correlation of two equally long samples (flattened); NaN, without a warning,
    when either is constant or holds fewer than two values: there is no spread to correlate."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise InputError(f"cannot correlate {a.size} values with {b.size}")
    # tested on the raw values: centring a constant array can leave rounding noise of either sign
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    return float(np.clip(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)), -1.0, 1.0))


def evaluate_calibration(pred, std, truth) -> dict[str, Summary]:
    """Calibration of the std maps ``std`` of posterior means ``pred`` against ``truth``, over
    the disk pixels (module docstring): ``{name: Summary}`` for every name of :data:`CALIBRATION`.

    ``coverageNN``: mean and std over the images of each image's covered share (every image
    has the same disk pixels, so the mean is also the share of all pixels of the set). The
    correlations are figures of the whole set, with no spread over images: std NaN. ``n`` is
    the number of images throughout."""
    abs_error, spread = disk_pixels(pred, std, truth)
    out = summarize(dict(zip(COVERAGE, coverage(abs_error, spread).T)))
    n = len(abs_error)
    rmse = np.sqrt(np.mean(abs_error**2, axis=1))
    out["std_err_corr_pixels"] = Summary(pearson(spread, abs_error), math.nan, n)
    out["std_err_corr_images"] = Summary(pearson(spread.mean(axis=1), rmse), math.nan, n)
    return out


def std_scale_for_coverage(pred, std, truth, level: float = 0.9) -> float:
    """The factor s that makes the std maps ``s * std`` cover ``level`` of the disk pixels of
    these images (their Gaussian central interval of that level; inclusive bounds, as
    :func:`coverage`): the ``level`` quantile of |error| / (z std) over the pixels.

    Chosen on validation images, it is a temperature of the std maps, as a sampler's own
    temperature is of its draws: it rescales them and leaves their ranking of the pixels (the
    std-error correlations) as it is. A pixel of std 0 and error > 0 no factor covers; if more
    than 1 - ``level`` of the pixels are such, no factor reaches ``level`` and this refuses."""
    abs_error, spread = disk_pixels(pred, std, truth)
    z = float(central_interval_z([level])[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(abs_error == 0, 0.0, abs_error / (z * spread)).ravel()
    # the smallest s with share(ratio <= s) >= level: the order statistic ceil(level * n)
    k = math.ceil(level * ratio.size) - 1
    scale = float(np.partition(ratio, k)[k])
    if not math.isfinite(scale):
        raise InputError(f"no std scale covers {100 * level:.0f}% of the pixels: more than "
                         f"{100 * (1 - level):.0f}% have std 0 and a non-zero error")
    return scale


def scaled_coverage(pred, std, truth, scale: float, scale_images: int) -> dict[str, Summary]:
    """The coverages (:data:`SCALED_COVERAGE`) of the std maps times ``scale``, a factor chosen
    on ``scale_images`` validation images (:func:`std_scale_for_coverage`), and the factor
    itself as ``std_scale`` (n: those images)."""
    abs_error, spread = disk_pixels(pred, std, truth)
    out = summarize(dict(zip(SCALED_COVERAGE, coverage(abs_error, float(scale) * spread).T)))
    out["std_scale"] = Summary(float(scale), math.nan, int(scale_images))
    return out


def calibrated_sampler_coverage(level: float, n_samples: int) -> float:
    """The coverage of the Gaussian interval mean ± z std of ``level`` for a perfectly calibrated
    sampler whose mean and std (ddof 1) are those of ``n_samples`` draws from a Gaussian
    posterior, the truth being one more draw: (truth - mean) / (std √(1 + 1/n)) is then Student-t
    with n - 1 degrees of freedom, so a std of few samples covers less than ``level`` even for
    the true posterior (4 samples: 76% for 90%). NaN below 2 samples (no std)."""
    from scipy.special import stdtr

    if n_samples < 2:
        return math.nan
    z = float(central_interval_z([level])[0])
    return float(2.0 * stdtr(n_samples - 1, z / math.sqrt(1.0 + 1.0 / n_samples)) - 1.0)
