"""CSD* on the tank: the score prior, started from the linearised image, with a data-consistency
step on the measured differences at every reverse step (the ``dds`` sampler).

Without the data term, CSD* can only denoise the linearised image, whose amplitude is far from
the prior's images; on validation data it did no better than the linearised step itself.

The data term is the linearised model in the representation the models reconstruct
(relative conductivity clipped to [0, 2]): ``dv ~ gain * J (x - 1)``. The clipping is not
physics -- a metal object is 5-100 times more conductive than water, not 2 -- so ``gain`` and
the model-error level are fitted by least squares on the simulated training split
(:func:`fit_linear_model`): on the quick tank data the gain is about 2.2, and the model error
is ~45 times the measurement noise, which is what the data term is weighted by. Each step is
the proximal problem ``argmin ||r - gain J dx||^2_W + ||dx||^2 / prior^2`` over the inside
pixels (``W``: inverse error variances), solved with an eigendecomposition of ``J^T W J``
kept per measurement mask, so a step costs two matrix-vector products per image.
"""

from __future__ import annotations

import numpy as np
import torch

from dgm_eit.errors import InputError


def fit_linear_model(rec, sigma: np.ndarray, v_clean: np.ndarray) -> dict:
    """``{"gain", "error_scale"}``: ``v_clean ~ gain * J (sigma - 1)`` over training samples, and
    the RMS of the weighted residual per measurement (in units of the measurement noise)."""
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

    def step(self, images: np.ndarray, dv: np.ndarray, masks: np.ndarray, prior_std: float) -> np.ndarray:
        out = np.array(images, dtype=np.float64)
        flat = out.reshape(len(out), -1)
        inside = self.rec.inside
        for b in range(len(out)):
            keep = masks[b] & np.isfinite(dv[b])
            J, JtW, lam, U = self._decomposition(keep)
            x = flat[b, inside]
            r = dv[b, keep] - J @ (x - 1.0)
            flat[b, inside] = x + U @ ((U.T @ (JtW @ r)) / (lam + 1.0 / prior_std**2))
        return out


@torch.no_grad()
def sample_dds(model, start: np.ndarray, dv: np.ndarray, masks: np.ndarray, fidelity: LinearisedFidelity, *,
               t0: float, n_steps: int, dc_weight: float, n_samples: int, eta: float = 1.0, mode: str = "replace",
               seed: int = 0) -> dict:
    """``{"recon", "recon_std"?}``: the mean (and std) of ``n_samples`` dds runs per image,
    each from the linearised image ``start`` at ``t0``."""
    if not dc_weight > 0:
        raise InputError(f"dc_weight must be > 0, got {dc_weight}")
    n = int(n_samples)
    settings = model.sampling_options({"sampler": "dds", "t0": float(t0), "n_steps": int(n_steps), "eta": eta,
                                       "mode": mode, "n_samples": n})
    sampler = model.make_sampler(settings)
    device = model.sigma_mean.device
    b, size = len(start), start.shape[-1]
    init = model.normalise_image(torch.as_tensor(start, dtype=torch.float32, device=device))
    init = init[:, None].repeat_interleave(n, dim=0)
    dv_rows, mask_rows = np.repeat(dv, n, axis=0), np.repeat(masks, n, axis=0)
    support = model.support.cpu().numpy()
    scale = float(model.sigma_std)

    def consistency(x0: torch.Tensor, t: float) -> torch.Tensor:
        images = model.denormalise_image(x0[:, 0]).to("cpu", torch.float64).numpy() * support
        prior = dc_weight * scale * float(model.sde.sigma(torch.tensor(float(t), dtype=torch.float64)))
        images = fidelity.step(images, dv_rows, mask_rows, prior)
        return model.normalise_image(torch.from_numpy(images).to(device=device, dtype=x0.dtype))[:, None]

    generator = torch.Generator(device=device).manual_seed(int(seed))
    x, _ = sampler(model.score, (b * n, 1, size, size), generator=generator, init=init, consistency=consistency,
                   device=device)
    images = (model.denormalise_image(x[:, 0]) * model.support).reshape(b, n, size, size).cpu().numpy()
    out = {"recon": images.mean(axis=1)}
    if n > 1:
        out["recon_std"] = images.std(axis=1)
    return out
