"""CSD* on the tank: the score prior, started from the linearised image, with a data-consistency
step on the measured differences at every reverse step (the ``dds`` sampler).

Without the data term, CSD* can only denoise the linearised image, whose amplitude is far from
the prior's images; on validation data it did no better than the linearised step itself.

The data term is the linearised model in the representation the models reconstruct
(relative conductivity clipped to [0, 2]): ``dv ~ gain * J (x - 1)``. The clipping is not
physics -- a metal object is 5-100 times more conductive than water, not 2 -- so ``gain`` and
the model-error level are fitted by least squares on the simulated training split
(:func:`fit_linear_model`): on the quick tank data the gain is about 2.2, and the model error
was ~45 times the measurement noise when the linearised step weighed by the noise model; the
fitted level times the linearised step's own error std (``tank.data_std``) weights the data
term. Each step is the proximal problem ``argmin ||r - gain J dx||^2_W + ||dx||^2 / prior^2``
over the inside pixels (``W``: inverse error variances), solved with an eigendecomposition of
``J^T W J`` kept per measurement mask, so a step costs two matrix-vector products per image.
"""

from __future__ import annotations

import numpy as np
import torch

from dgm_eit.errors import InputError


def fit_linear_model(rec, sigma: np.ndarray, v_clean: np.ndarray) -> dict:
    """``{"gain", "error_scale"}``: ``v_clean ~ gain * J (sigma - 1)`` over training samples, and
    the RMS of the weighted residual per measurement (in units of the data term's std,
    :attr:`dgm_eit.ktc.tank.Tank.data_std`)."""
    x = sigma.reshape(len(sigma), -1)[:, rec.inside].astype(np.float64) - 1.0
    pred = x @ rec.J0.T
    v = v_clean.astype(np.float64)
    w = rec.weights
    gain = float(np.sum(v * pred * w) / np.sum(pred * pred * w))
    chi2 = np.sum((v - gain * pred) ** 2 * w, axis=1) / v.shape[1]
    return {"gain": gain, "error_scale": float(np.sqrt(np.median(chi2))), "n_samples": int(len(v))}


class LinearisedFidelity:
    """Proximal data-consistency steps with the linearised tank model (see the module docstring)."""

    def __init__(self, rec, gain: float, error_scale: float):
        if not (gain > 0 and error_scale > 0):
            raise InputError(f"the linear data model needs gain > 0 and error_scale > 0, got {gain}, {error_scale}")
        self.rec, self.gain = rec, float(gain)
        self.weights = rec.weights / float(error_scale) ** 2
        self._eig: dict[bytes, tuple] = {}

    def _decomposition(self, keep: np.ndarray) -> tuple:
        key = keep.tobytes()
        if key not in self._eig:
            J = self.gain * self.rec.J0[keep]
            JtW = J.T * self.weights[keep]
            lam, U = np.linalg.eigh(JtW @ J)
            self._eig[key] = (J, JtW, np.maximum(lam, 0.0), U)
        return self._eig[key]

    def bind(self, dv: np.ndarray):
        """``step(images, prior_std) -> images`` for these difference voltages (N, M); NaN marks a
        measurement that is missing or dropped by the level."""
        dv = np.asarray(dv, dtype=np.float64)
        keeps = np.isfinite(dv)
        inside = self.rec.inside

        def step(images: np.ndarray, prior_std: float) -> np.ndarray:
            out = np.array(images, dtype=np.float64)
            flat = out.reshape(len(out), -1)
            for b in range(len(out)):
                J, JtW, lam, U = self._decomposition(keeps[b])
                x = flat[b, inside]
                r = dv[b, keeps[b]] - J @ (x - 1.0)
                flat[b, inside] = x + U @ ((U.T @ (JtW @ r)) / (lam + 1.0 / prior_std**2))
            return out

        return step


def sample_dds(model, start: np.ndarray, dv: np.ndarray, masks: np.ndarray, fidelity: LinearisedFidelity,
               csd: dict, seed: int = 0) -> dict:
    """``{"recon", "recon_std"?}``: the mean (and std) of ``csd["n_samples"]`` dds runs per image,
    each from the linearised image ``start`` at ``csd["t0"]``; ``csd`` holds the sampling settings
    (the ``[csd]`` keys)."""
    from dgm_eit.models.posterior import PosteriorSampler, SamplingSettings

    settings = SamplingSettings.resolve(csd, {"sampler": "dds"})
    device = model.sigma_mean.device
    batch = {"gn": torch.as_tensor(start, dtype=torch.float32, device=device),
             "v": torch.as_tensor(np.where(masks, dv, np.nan), dtype=torch.float64, device=device)}
    generator = torch.Generator(device=device).manual_seed(int(seed))
    out = PosteriorSampler(model, settings, fidelity=fidelity).reconstruct(batch, generator)
    return {k: out[k].cpu().numpy() for k in ("recon", "recon_std") if k in out}
