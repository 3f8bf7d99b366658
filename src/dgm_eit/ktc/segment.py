"""Relative-conductivity images -> the challenge's three classes, and the thresholds' choice.

Every method (the linearised step, GN, CVAE, CNF, CSD*) segments the same way: its image
(``sigma / sigma_water`` on the model grid) is upsampled bilinearly to 256 x 256 (water
outside the disk, so the rim is not read as an object), then pixels below ``low`` are
resistive (1), above ``high`` conductive (2), the rest water (0). ``low`` and ``high`` are
chosen per method on simulated validation data (:func:`tune_thresholds`), never on real
targets. The conductive map depends on ``high`` only and the resistive map on ``low`` only,
so the two are chosen separately (exact, and linear instead of quadratic in the grid).
"""

from __future__ import annotations

import numpy as np

from dgm_eit.data.phantoms import disk_mask
from dgm_eit.datasets.ktc2023 import IMAGE_SIZE, SCORE_C1, SCORE_C2, SCORE_SIGMA_PX, _window
from dgm_eit.errors import InputError

# wide enough for the linearised images, whose amplitude is not that of the truth
DEFAULT_LOW = tuple(float(x) for x in np.round(np.linspace(-0.5, 0.9, 15), 3))
DEFAULT_HIGH = tuple(float(x) for x in np.round(np.linspace(1.1, 3.0, 20), 3))


def upsample(images, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, h, w) or (h, w) relative-conductivity images -> (N, size, size), water (1) outside the disk."""
    import torch

    x = np.asarray(images, dtype=np.float32)
    single = x.ndim == 2
    x = x[None] if single else x
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise InputError(f"images must have shape (N, n, n), got {np.shape(images)}")
    x = np.where(disk_mask(x.shape[-1])[None], x, 1.0)
    up = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear",
                                         align_corners=False)[:, 0].numpy()
    up = np.where(disk_mask(size)[None], up, 1.0)
    return up[0] if single else up


def segment(images256, low: float, high: float) -> np.ndarray:
    """Upsampled images -> uint8 classes (0 water, 1 resistive, 2 conductive)."""
    if not low < 1.0 < high:
        raise InputError(f"segmentation needs low < 1 < high, got low = {low}, high = {high}")
    x = np.asarray(images256)
    return ((x < low) * 1 + (x > high) * 2).astype(np.uint8)


def segment_images(images, low: float, high: float) -> np.ndarray:
    return segment(upsample(images), low, high)


def _binary_ssims(truth: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """The challenge's SSIM of one binary ``truth`` against each binary map of ``maps`` (T, n, n).

    For maps in {0, 1}, E[a^2] = E[a]: two window averages per map instead of five, in
    float32 (within 1e-5 of :func:`dgm_eit.datasets.ktc2023.ktc_ssim`; the final scores use
    that exact function)."""
    w, mass = _window(truth.shape[0], SCORE_SIGMA_PX)
    w, mass = w.astype(np.float32), mass.astype(np.float32)

    def mean(x):
        return (w @ x @ w.T) / mass

    a = truth.astype(np.float32)
    mu_a = mean(a)
    var_a = mu_a - mu_a**2
    b = maps.astype(np.float32)
    mu_b = mean(b)
    var_b = mu_b - mu_b**2
    cov = mean(b * a) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SCORE_C1) * (2 * cov + SCORE_C2)
    den = (mu_a**2 + mu_b**2 + SCORE_C1) * (var_a + var_b + SCORE_C2)
    return (num / den).mean(axis=(-2, -1)).astype(np.float64)


def tune_thresholds(images256, truths, low=DEFAULT_LOW, high=DEFAULT_HIGH) -> dict:
    """The ``low`` and ``high`` with the best mean score over ``images256`` vs ``truths`` (class maps).

    Returns ``{"low", "high", "score", "resistive", "conductive", "n_images", "image_scores",
    "table"}``; the score is the mean per-image challenge score (at most 1), ``image_scores``
    each image's at the chosen thresholds."""
    images256 = np.asarray(images256)
    truths = np.asarray(truths)
    if images256.shape != truths.shape or images256.ndim != 3:
        raise InputError(f"images and truths must both be (N, 256, 256), got {images256.shape} and {truths.shape}")
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    res_each = np.stack([_binary_ssims(t == 1, x[None] < low[:, None, None]) for x, t in zip(images256, truths)])
    con_each = np.stack([_binary_ssims(t == 2, x[None] > high[:, None, None]) for x, t in zip(images256, truths)])
    res, con = res_each.mean(axis=0), con_each.mean(axis=0)
    i, j = int(np.argmax(res)), int(np.argmax(con))
    return {"low": float(low[i]), "high": float(high[j]), "score": float(0.5 * (res[i] + con[j])),
            "resistive": float(res[i]), "conductive": float(con[j]), "n_images": int(len(truths)),
            "image_scores": (0.5 * (res_each[:, i] + con_each[:, j])).tolist(),
            "table": {"low": dict(zip(low.tolist(), res.tolist())), "high": dict(zip(high.tolist(), con.tolist()))}}
