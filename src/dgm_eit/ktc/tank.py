"""The KTC2023 tank as simulations and reconstructions see it; the linearised difference
reconstruction and its iterated (Gauss-Newton) form.

:class:`Tank` builds, from the ``[tank]`` config section and the shipped empty-tank frame
(:func:`public_dir`), everything a sample or a real measurement needs:

- the background conductivity and contact impedance **fitted to the reference frame**
  (:func:`dgm_eit.datasets.ktc2023.fit_reference`, on the simulation mesh) and the fit's
  relative residual;
- a fine forward model (``sim_h0``, makes the training data) and a coarse one (``h0``,
  reconstructs): two meshes, so the learned data never see the inverse crime;
- the organisers' noise model, ``std_i^2 = (rel |U_ref,i|)^2 + (abs max|U_ref|)^2``, from
  the measured frame, times ``noise_scale``: the simulated data's noise;
- the data term's error std: that noise model, or with ``data_std`` > 0 the same std on every
  measurement. The error a linearised step makes is its linearisation's and the model's
  (the empty tank's frame alone misfits by 0.034 V rms, over 100 times the noise), not the
  noise's, so weighing the small voltages up by their small noise trusts them too much.

Images are **relative conductivity** ``sigma / sigma_water`` on the coarse mesh's pixel grid
(1 = water, 0 outside the disk). :class:`DifferenceReconstructor` is the linearised
difference step with a Gaussian smoothness prior, ``x = 1 + (J^T S^-1 J + G^-1)^-1 J^T S^-1 dv``
(``J``: Jacobian at the water-filled tank in that pixel basis; ``S``: the data term's error covariance; ``G``:
prior covariance ``std^2 exp(-d^2 / (2 l^2))`` between pixel centres, plus a small nugget so
that it inverts). Gauss-Newton iterates on ``u = log x`` with the same prior on ``u`` (so
conductivity stays positive and plastic, where d v / d x grows without bound, stays
tractable); its first iterate is ``exp`` of the linearised step's change. Measurements a
level drops (or NaN in a file) are left out by a mask.
"""

from __future__ import annotations

import functools
import signal
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
import scipy.linalg as la
import scipy.sparse as sp

from dgm_eit.datasets import ktc2023 as ktc
from dgm_eit.errors import InputError
from dgm_eit.physics.fem import blas_threads
from dgm_eit.runtime import (cpu_count, exit_with_parent, forkserver_context, release_sigint, sigint_held_back,
                             stop_pool)

# Gaussian-kernel covariances are numerically singular; a nugget of this share of the
# variance keeps G invertible without changing the images visibly
NUGGET = 1e-3
# Gauss-Newton keeps the relative conductivity in this range: plastic and metal saturate the
# data long before (the FEM needs > 0, and its Jacobian blows up as sigma -> 0)
X_MIN, X_MAX = 1e-2, 1e2
# Gauss-Newton spreads its images over worker processes only from this many images per worker:
# starting one and shipping it the reconstructor costs about a second, an image 0.1-1.5 s
MIN_IMAGES_PER_WORKER = 4


def public_dir() -> Path:
    """The shipped copy of the four public KTC2023 targets and the reference frame."""
    return Path(str(resources.files("dgm_eit.ktc").joinpath("public")))


@functools.lru_cache(maxsize=2)
def _fit(h0: float):
    ref = ktc.load_reference(public_dir() / "ref.mat")
    return ref, ktc.fit_reference(ref, h0=h0)


class Tank:
    """Meshes, fitted background, noise model and pixel grid of one ``[tank]`` config."""

    def __init__(self, cfg: dict):
        from dgm_eit.config import with_added_keys
        from dgm_eit.physics import ForwardModel, PixelGrid

        t = with_added_keys(cfg)["tank"]
        self.sim_h0, self.h0 = float(t["sim_h0"]), float(t["h0"])
        if not 0 < self.sim_h0 <= self.h0:
            raise InputError(f"need 0 < tank.sim_h0 <= tank.h0 (simulate on the finer mesh), got "
                             f"{self.sim_h0} and {self.h0}")
        for key in ("noise_relative", "noise_absolute", "noise_scale", "data_std"):
            if not float(t[key]) >= 0:
                raise InputError(f"tank.{key} must be >= 0, got {t[key]}")
        self.ref, self.fit = _fit(self.sim_h0)
        self.sigma_bg = float(self.fit.sigma)
        self.contact_impedance = float(self.fit.contact_impedance)
        protocol = ktc.tank_protocol(self.ref.injections, self.ref.pattern)

        def model(h0):
            return ForwardModel(ktc.tank_mesh(h0), protocol, electrode_model="cem",
                                contact_impedance=self.contact_impedance)

        self.fine, self.coarse = model(self.sim_h0), model(self.h0)
        self.grid = PixelGrid(self.coarse.mesh, size=int(cfg["data"]["image_size"]))
        u = self.ref.voltages
        rel, ab = float(t["noise_relative"]), float(t["noise_absolute"])
        std = float(t["noise_scale"]) * np.sqrt((rel * np.abs(u)) ** 2 + (ab * np.nanmax(np.abs(u))) ** 2)
        if not np.all(std > 0):
            raise InputError("the noise model gives a zero standard deviation; set tank.noise_absolute > 0")
        self.noise_std = std
        data_std = float(t["data_std"])
        self.data_std = np.full_like(std, data_std) if data_std > 0 else std
        self.u_water = self.fine.forward(np.full(self.fine.n_elements, self.sigma_bg))

    @functools.cached_property
    def pixel_basis(self) -> tuple[np.ndarray, sp.csc_matrix]:
        """The inside pixels' indices and ``A``: element values = ``A`` @ their values."""
        inside = np.flatnonzero(self.grid.inside.ravel())
        return inside, self.grid.element_matrix[:, inside].tocsc()

    @functools.cached_property
    def water_linearisation(self) -> tuple[np.ndarray, np.ndarray]:
        """Coarse-mesh voltages and element Jacobian of the water-filled tank (the image of ones
        in the pixel basis), computed once for every reconstructor of this tank: the prior
        search builds one per candidate."""
        inside, A = self.pixel_basis
        v_water = self.coarse.forward(np.full(self.coarse.n_elements, self.sigma_bg))
        return v_water, self.coarse.jacobian(self.sigma_bg * (A @ np.ones(len(inside))))[1]

    def __getstate__(self) -> dict:
        # the water-filled tank's element Jacobian (52 MB on the ktc mesh) is a cache every
        # reconstructor has already reduced to its pixel basis; a pool worker never needs it
        return {k: v for k, v in self.__dict__.items() if k != "water_linearisation"}

    @property
    def n_meas(self) -> int:
        return int(self.fine.n_meas)

    def describe(self) -> str:
        f = self.fit
        return (f"tank: background {self.sigma_bg:.4g} S/m and contact impedance {self.contact_impedance:.3g} Ohm m "
                f"fitted to ref.mat (relative residual {f.residual:.1%}{', z at its lower bound' if f.at_lower_bound else ''}); "
                f"simulation mesh {self.fine.mesh.n_nodes} nodes (h0 = {self.sim_h0:g} m), reconstruction mesh "
                f"{self.coarse.mesh.n_nodes} nodes (h0 = {self.h0:g} m), {self.grid.size} x {self.grid.size} pixels")


def level_masks(inj, mpat) -> dict[int, np.ndarray]:
    return {level: ktc.level_mask(level, inj, mpat) for level in ktc.LEVELS}


def row_levels(v, masks: dict[int, np.ndarray]) -> np.ndarray:
    """The level of each row of simulated difference voltages (a data set's ``v``: a level's
    dropped measurements are 0, its kept ones noisy, so never exactly 0), from how many it keeps:
    every level of ``masks`` keeps a different number."""
    by_count = {int(m.sum()): level for level, m in masks.items()}
    counts = (np.atleast_2d(v) != 0).sum(axis=1)
    unknown = sorted({int(c) for c in counts} - set(by_count))
    if unknown:
        raise InputError(f"rows with {unknown} nonzero measurements match no level's mask "
                         f"(the levels keep {sorted(by_count)})")
    return np.array([by_count[int(c)] for c in counts])


class DifferenceReconstructor:
    """Linearised (and iterated) difference reconstruction on the tank's coarse mesh."""

    def __init__(self, tank: Tank, prior_std: float, corr_length: float):
        if not (prior_std > 0 and corr_length > 0):
            raise InputError(f"the smoothness prior needs std > 0 and correlation length > 0, got {prior_std}, "
                             f"{corr_length}")
        self.tank, self.prior_std, self.corr_length = tank, float(prior_std), float(corr_length)
        grid = tank.grid
        self.inside, self.A = tank.pixel_basis
        self.v_water, J = tank.water_linearisation
        self.J0 = self._pixel_jacobian(J)
        xy = np.stack([grid.x.ravel()[self.inside], grid.y.ravel()[self.inside]], axis=1)
        d2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
        gamma = np.exp(-d2 / (2 * self.corr_length**2)) + NUGGET * np.eye(len(xy))
        self.prior_precision = la.cho_solve(la.cho_factor(gamma), np.eye(len(xy))) / self.prior_std**2
        self.weights = 1.0 / tank.data_std**2
        self._linear: dict[bytes, np.ndarray] = {}

    def _jacobian(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model voltages and d v / d x (relative conductivity per inside pixel) at image ``x``."""
        v, J = self.tank.coarse.jacobian(self.tank.sigma_bg * (self.A @ x))
        return v, self._pixel_jacobian(J)

    def _pixel_jacobian(self, J: np.ndarray) -> np.ndarray:
        """Element Jacobian (M, E) in S/m -> d v / d x over the inside pixels (M, P)."""
        return (self.A.T @ J.T).T * self.tank.sigma_bg

    def _step_matrix(self, J: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(J^T W J + G^-1)^-1 J^T W on the kept rows: maps a data residual to an image step."""
        Jm, w = J[mask], self.weights[mask]
        H = Jm.T @ (Jm * w[:, None]) + self.prior_precision
        B = Jm.T * w[None, :]
        try:
            return la.cho_solve(la.cho_factor(H), B)
        except la.LinAlgError:
            # rounding made a badly scaled H indefinite: solve on its eigenvalues, floored
            lam, U = la.eigh((H + H.T) / 2)
            return U @ ((U.T @ B) / np.maximum(lam, lam[-1] * 1e-12)[:, None])

    def _mask(self, dv: np.ndarray, mask) -> np.ndarray:
        keep = np.isfinite(dv).all(axis=0) if dv.ndim == 2 else np.isfinite(dv)
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != keep.shape:
                raise InputError(f"measurement mask has shape {mask.shape}, the voltages {keep.shape}")
            keep = keep & mask
        if keep.sum() < 10:
            raise InputError(f"only {int(keep.sum())} usable measurements: nothing to reconstruct from")
        return keep

    def _check(self, dv) -> np.ndarray:
        dv = np.asarray(dv, dtype=np.float64)
        if dv.ndim not in (1, 2) or dv.shape[-1] != self.tank.n_meas:
            raise InputError(f"difference voltages must have shape ({self.tank.n_meas},) or (N, "
                             f"{self.tank.n_meas}), got {dv.shape}")
        return dv

    def image(self, x: np.ndarray) -> np.ndarray:
        """Inside-pixel values (..., P) -> images (..., H, W), 0 outside the disk."""
        size = self.tank.grid.size
        out = np.zeros(x.shape[:-1] + (size * size,))
        out[..., self.inside] = x
        return out.reshape(x.shape[:-1] + (size, size))

    def linear(self, dv, mask=None) -> np.ndarray:
        """One linearised step from water: images (N, H, W) (or (H, W)) of ``dv`` = U - U_ref."""
        dv = self._check(dv)
        keep = self._mask(dv, mask)
        key = keep.tobytes()
        if key not in self._linear:
            self._linear[key] = self._step_matrix(self.J0, keep)
        x = 1.0 + np.nan_to_num(dv[..., keep]) @ self._linear[key].T
        return self.image(x)

    def gauss_newton(self, dv, mask=None, iterations: int = 3) -> np.ndarray:
        """``iterations`` Gauss-Newton steps on the same posterior (1 = :meth:`linear`)."""
        dv = self._check(dv)
        images = self.gauss_newton_path(np.atleast_2d(dv), None if mask is None else np.atleast_2d(mask),
                                        [int(iterations)])[int(iterations)]
        return images[0] if dv.ndim == 1 else images

    def gauss_newton_path(self, dv, masks, counts, workers: int | None = None) -> dict[int, np.ndarray]:
        """Images (N, H, W) after each iteration count in ``counts``, from one run to the largest;
        ``masks`` (N, M) bool or None (NaN in ``dv`` is always left out). The images are spread
        over ``workers`` processes (default: every core once there are enough images, see
        :data:`MIN_IMAGES_PER_WORKER`); one BLAS thread each, so any count gives the same bits."""
        dv = np.atleast_2d(self._check(dv))
        counts = sorted({int(k) for k in counts})
        if not counts or counts[0] < 1:
            raise InputError(f"Gauss-Newton iteration counts must be >= 1, got {counts}")
        # checked here, so that bad input fails before any worker starts
        keeps = [self._mask(row, None if masks is None else masks[i]) for i, row in enumerate(dv)]
        n = min(cpu_count(), len(dv) // MIN_IMAGES_PER_WORKER) if workers is None else min(workers, len(dv))
        if n <= 1:
            with blas_threads(1):
                paths = [self._path(row, keep, counts) for row, keep in zip(dv, keeps)]
        else:
            paths = _pool_paths(self, dv, keeps, counts, n)
        return {k: self.image(np.stack([p[j] for p in paths])) for j, k in enumerate(counts)}

    def _path(self, row: np.ndarray, keep: np.ndarray, counts: list[int]) -> np.ndarray:
        """(len(counts), P): one image's relative conductivity after each count in ``counts``."""
        bounds = np.log(X_MIN), np.log(X_MAX)
        out = []
        u = np.zeros(len(self.inside))
        v, J = self.v_water, self.J0
        for k in range(1, counts[-1] + 1):
            if k > 1:
                v, J = self._jacobian(np.exp(u))
            Ju = J * np.exp(u)[None, :]          # d v / d u = d v / d x * x
            # linearised residual around u; the step is taken from the prior mean (water, u = 0)
            r = row[keep] - (v - self.v_water)[keep] + Ju[keep] @ u
            u = np.clip(self._step_matrix(Ju, keep) @ r, *bounds)
            if k in counts:
                out.append(np.exp(u))
        return np.stack(out)


_WORKER_CALL: tuple = ()   # in a Gauss-Newton pool worker: (reconstructor, dv, keeps, counts)


def _gn_worker_init(parent_alive, *call) -> None:
    global _WORKER_CALL
    # Ctrl-C reaches the whole process group: the main process alone stops the pool (stop_pool)
    release_sigint(signal.SIG_IGN)
    exit_with_parent(parent_alive)
    # BLAS threads change the summation order: one per process keeps the images bit-identical
    # to the serial path's (and two processes on two cores would oversubscribe them)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    _WORKER_CALL = call


def _gn_worker_path(i: int) -> np.ndarray:
    recon, dv, keeps, counts = _WORKER_CALL
    return recon._path(dv[i], keeps[i], counts)


def _pool_paths(recon: DifferenceReconstructor, dv: np.ndarray, keeps: list, counts: list[int],
                workers: int) -> list[np.ndarray]:
    """:meth:`DifferenceReconstructor._path` of every image in ``workers`` processes, in order."""
    context = forkserver_context([__name__])
    alive_r, alive_w = context.Pipe(duplex=False)
    # the images travel once per worker, the tasks are their indices: a task queue of voltage rows
    # fills its pipe, and once stop_pool has ended the workers, the thread feeding it blocks
    # interpreter exit for good
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_gn_worker_init,
                               initargs=(alive_r, recon, dv, keeps, counts))
    try:
        # the workers start during map's submissions; a Ctrl-C meanwhile is raised after them
        with sigint_held_back():
            results = pool.map(_gn_worker_path, range(len(dv)))
        paths = list(results)
    except BaseException:
        # Ctrl-C or a failure: GN images are cheap to redo, so end the workers now
        stop_pool(pool)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        # after the shutdown: closing the write end ends the workers (exit_with_parent)
        alive_r.close()
        alive_w.close()
    return paths
