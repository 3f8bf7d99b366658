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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
