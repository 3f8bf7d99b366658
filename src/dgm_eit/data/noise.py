"""Measurement noise at a signal-to-noise ratio, SNR = 10 log10(||v||^2 / ||n||^2).

Each sample gets white Gaussian noise ``n ~ N(0, s^2 I)`` with ``s = ||v|| / sqrt(M) *
10^(-SNR/20)``, so the SNR holds **in expectation** (``E||n||^2 = M s^2``): the realised SNR
of one sample scatters around the target by about ``4.3 * sqrt(2/M)`` dB (0.4 dB for the
208 measurements of the paper's protocol), as it does for a real instrument with a fixed
noise floor. The measured SNR of a data set (``dgm-eit inspect``) is the mean over samples.
"""

from __future__ import annotations

import math

import numpy as np

from dgm_eit.errors import InputError


def check_snr_db(snr_db: float) -> float:
    if not math.isfinite(snr_db):
        raise InputError(f"data.snr_db must be a finite number of dB, got {snr_db}")
    return float(snr_db)


def noise_std(v_clean: np.ndarray, snr_db: float) -> np.ndarray:
    """Per-sample noise standard deviation for ``v_clean`` ``(..., M)`` -> ``(...)``."""
    check_snr_db(snr_db)
    v_clean = np.asarray(v_clean, dtype=np.float64)
    rms = np.linalg.norm(v_clean, axis=-1) / math.sqrt(v_clean.shape[-1])
    return rms * 10.0 ** (-snr_db / 20.0)


def add_noise(v_clean: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``v_clean + n`` with ``n`` white Gaussian at ``snr_db`` (in expectation), drawn from ``rng``."""
    v_clean = np.asarray(v_clean, dtype=np.float64)
    std = noise_std(v_clean, snr_db)
    return v_clean + np.asarray(std)[..., None] * rng.standard_normal(v_clean.shape)


def measured_snr_db(v_clean: np.ndarray, v_noisy: np.ndarray) -> np.ndarray:
    """Realised SNR of each sample, ``10 log10(||v||^2 / ||v_noisy - v||^2)`` (inf where noiseless)."""
    v_clean = np.asarray(v_clean, dtype=np.float64)
    noise = np.asarray(v_noisy, dtype=np.float64) - v_clean
    signal_power = np.sum(v_clean**2, axis=-1)
    noise_power = np.sum(noise**2, axis=-1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(signal_power / noise_power)
