"""Data consistency for images: proximal Gauss-Newton steps on measured voltages.

Given an image estimate ``x`` (a denoised state of a reverse diffusion, say) and measured
voltages ``v`` with noise standard deviation ``noise_std`` per measurement, one step solves
the linearised proximal problem around ``x``::

    dx = argmin ||v - F(x) - J dx||^2 / noise_std^2 + ||dx||^2 / prior_std^2

over the pixels inside the disk, ``J`` the pixel Jacobian (element Jacobian times the
pixel -> element averaging). ``prior_std`` says how far the estimate may move: a reverse
diffusion passes the uncertainty of its denoised image at the current noise level, so early
steps follow the data and late steps keep the prior's detail. The step is solved in data
space, ``dx = J^T (J J^T + (noise_std / prior_std)^2 I)^-1 r`` (an M x M system), and the
image is floored at ``min_sigma`` so the next forward solve stays defined. ``max_step``
shortens a step as a whole so that no pixel moves by more than that (a trust region).
"""

from __future__ import annotations

import numpy as np

from dgm_eit.errors import InputError


def noise_std_from_snr(v: np.ndarray, snr_db: float) -> np.ndarray:
    """Per-measurement noise std of white noise at ``snr_db`` (SNR = ||v||^2 / ||n||^2), per row."""
    v = np.atleast_2d(np.asarray(v, dtype=np.float64))
    return np.linalg.norm(v, axis=1) * 10.0 ** (-float(snr_db) / 20.0) / np.sqrt(v.shape[1])


class ProximalGaussNewton:
    """``step(images, v, noise_std, prior_std) -> images``: one proximal GN step per image.

    ``refresh=False`` reuses each image's last Jacobian (a chord step: the residual is exact,
    the linearisation is the one at the image where the Jacobian was last computed). Its data
    matrix ``J J^T`` is kept as an eigendecomposition, so that a step with another
    ``prior_std`` costs one forward solve and two matrix-vector products."""

    def __init__(self, fm, grid, min_sigma: float = 1e-3, max_step: float | None = None):
        if grid.mesh is not fm.mesh and grid.mesh.n_elements != fm.n_elements:
            raise InputError("the pixel grid was built on a different mesh than the forward model")
        self.fm, self.grid = fm, grid
        self.min_sigma = float(min_sigma)
        self.max_step = None if max_step is None else float(max_step)
        self.inside = np.flatnonzero(np.asarray(grid.inside).ravel())
        # pixel -> element averaging restricted to the pixels inside the disk (m, n_inside)
        self._P = grid.element_matrix.tocsc()[:, self.inside]
        self._linearisations: dict[int, tuple] = {}

    def _linearise(self, sigma: np.ndarray) -> tuple:
        v_model, J = self.fm.jacobian(sigma)
        Jp = np.ascontiguousarray((self._P.T @ J.T).T)          # (M, n_inside)
        eigval, eigvec = np.linalg.eigh(Jp @ Jp.T)
        return v_model, Jp, np.maximum(eigval, 0.0), eigvec

    def step(self, images: np.ndarray, v: np.ndarray, noise_std, prior_std, refresh: bool = True) -> np.ndarray:
        images = np.asarray(images, dtype=np.float64)
        v = np.atleast_2d(np.asarray(v, dtype=np.float64))
        if images.ndim != 3 or len(images) != len(v):
            raise InputError(f"need images (B,H,W) and voltages (B,M) of one batch, got {images.shape} and {v.shape}")
        noise_std = np.broadcast_to(np.asarray(noise_std, dtype=np.float64), (len(v),))
        prior_std = np.broadcast_to(np.asarray(prior_std, dtype=np.float64), (len(v),))
        out = images.copy()
        flat = out.reshape(len(out), -1)
        for b in range(len(out)):
            pixels = np.maximum(flat[b, self.inside], self.min_sigma)
            sigma = self._P @ pixels
            if refresh or b not in self._linearisations:
                v_model, *lin = self._linearise(sigma)
                self._linearisations[b] = lin
            else:
                v_model = self.fm.forward(sigma)
            Jp, eigval, eigvec = self._linearisations[b]
            # the floor keeps the system invertible when the prior is very wide (early, noisy states)
            damping = max((noise_std[b] / prior_std[b]) ** 2, 1e-9 * eigval.mean())
            y = eigvec @ ((eigvec.T @ (v[b] - v_model)) / (eigval + damping))
            dx = Jp.T @ y
            biggest = float(np.abs(dx).max())
            if self.max_step is not None and biggest > self.max_step:
                dx *= self.max_step / biggest   # a trust region: the linearisation holds near x only
            flat[b, self.inside] = np.maximum(pixels + dx, self.min_sigma)
        return out
