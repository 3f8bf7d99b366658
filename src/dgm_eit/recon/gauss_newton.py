"""Classical reconstructions: absolute Gauss-Newton and one-step linearised difference.

Gauss-Newton (absolute, from ``sigma0``) iterates, in the log-conductivity ``x = log sigma``
(so sigma stays positive)::

    dx = argmin ||r - Jx dx||^2 + lam * dx^T R dx,   Jx = J diag(sigma),  r = v - F(sigma)

with the prior R chosen by ``method``:
- ``lm``: Levenberg-Marquardt, R = diag(Jx^T Jx)
- ``kotre``: R = diag(Jx^T Jx)^p (p = 1 is lm, p = 0 is Tikhonov)
- ``tikhonov``: R = I
- ``smooth``: R = graph Laplacian of edge-sharing elements (+ 1e-3 of its mean diagonal
  times I, so it is invertible; factorised once per reconstruction)
R is rescaled to the mean diagonal of Jx^T Jx, so ``lam`` is dimensionless and comparable
between methods and meshes. Every prior is solved in data space,
``dx = R^-1 Jx^T (Jx R^-1 Jx^T + lam I)^-1 r`` (an M x M system, M << m), except a
diagonal R with more measurements than elements (element space, same answer).

A step is first shortened as a whole so that no log-conductivity moves by more than
``max_step``; a backtracking line search on ``||r||`` then halves it (up to
``max_halvings`` times) until the residual decreases. Iterations stop at ``max_iter``,
when the relative decrease of ``||r||`` falls below ``tol``, or when no step decreases it.
``lam_decay`` < 1 shrinks lam after every iteration (not below ``lam_min``).

Speed (one BLAS thread, see ``dgm_eit.physics.fem.blas_threads``): ``Jx = J diag(sigma)``
is never formed (the step scales J's columns once, in place, by ``sigma / sqrt(d)``); the
data-space Gram matrix is one symmetric product (BLAS syrk) and is solved by Cholesky; the
forward solve of an accepted line-search trial is reused by the next Jacobian; and the
start of GN (the Jacobian at ``sigma0`` and the first step's factorisation), which does
not depend on the data, is kept per forward model for the next image (a few settings per
model; :func:`clear_start_cache` forgets it).

Config defaults (``[gn]``: kotre, p = 0.5, lam = 3 at 40 dB scaled with the noise level,
6 iterations) come from scans with ``benchmarks/tune_gn.py`` on the paper's 2-anomaly
phantoms, data simulated on a finer mesh than the inversion mesh: image MSE was flat for
lam in 2..5 at 40 dB, the best lam grew about in proportion to the noise level (about 17-20
at 25 dB), and iterations beyond 6-7 fitted noise rather than improving the image.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from dgm_eit.errors import InputError
from dgm_eit.physics.fem import ForwardModel, single_blas_thread

METHODS = ("lm", "kotre", "tikhonov", "smooth")


@dataclass
class GNResult:
    sigma: np.ndarray                     # (m,) element conductivities
    history: list = field(default_factory=list)   # ||v - F(sigma)|| after 0, 1, ... iterations
    n_iter: int = 0
    image: np.ndarray | None = None       # (H, W) when a grid was given
    converged: bool = False
    steps: list = field(default_factory=list)     # accepted line-search step lengths


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise InputError(f"unknown Gauss-Newton method {method!r}; choose one of {', '.join(METHODS)}")


def _initial_sigma(fm, sigma0) -> np.ndarray:
    s = np.asarray(sigma0, dtype=np.float64)
    if s.ndim == 0:
        s = np.full(fm.n_elements, float(s))
    return fm.check_sigma(s, "sigma0").copy()


def smoothness_matrix(mesh) -> sp.csr_matrix:
    """Graph Laplacian of elements sharing an edge (m x m, sparse)."""
    pairs = mesh.element_neighbours
    m = mesh.n_elements
    A = sp.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(m, m))
    A = (A + A.T).tocsr()
    return (sp.diags(np.asarray(A.sum(axis=1)).ravel()) - A).tocsr()


class SmoothPrior:
    """``R0 = Lap / mean(diag Lap) + 1e-3 I`` for an element graph Laplacian, factorised once.

    The small identity term makes R0 invertible (the Laplacian alone does not see the
    constant), so the data-space form ``R^-1 J^T (J R^-1 J^T + lam I)^-1 r`` applies."""

    def __init__(self, laplacian):
        import scipy.sparse.linalg as spla

        Lap = sp.csc_matrix(laplacian, dtype=np.float64)
        m = Lap.shape[0]
        self.matrix = (Lap / Lap.diagonal().mean() + 1e-3 * sp.identity(m, format="csc")).tocsc()
        self._lu = spla.splu(self.matrix)

    def solve(self, X: np.ndarray) -> np.ndarray:
        return self._lu.solve(np.asarray(X, dtype=np.float64))


class _Step:
    """The regularised step of one Jacobian as a linear map ``r -> dx`` (see
    :func:`regularised_step`); the factorisation is done once, each ``r`` then costs two
    matrix-vector products and a triangular solve pair."""

    def __init__(self, J: np.ndarray, method: str, lam: float, p: float = 0.5, laplacian=None,
                 col_scale: np.ndarray | None = None, overwrite_j: bool = False):
        _check_method(method)
        J = np.asarray(J, dtype=np.float64)
        overwrite_j = overwrite_j and J.flags.writeable
        jtj_diag = np.einsum("ke,ke->e", J, J)
        if col_scale is not None:
            col_scale = np.asarray(col_scale, dtype=np.float64)
            jtj_diag *= col_scale * col_scale
        scale = jtj_diag.mean()
        if not np.isfinite(scale) or scale <= 0:
            raise InputError("the Jacobian is zero; the measurements do not see the conductivity")
        M, m = J.shape
        self.kind = "data"
        if method == "smooth":
            if laplacian is None:
                raise InputError("method 'smooth' needs the mesh's element Laplacian")
            if col_scale is not None:
                J = np.multiply(J, col_scale, out=J if overwrite_j else None)
            prior = laplacian if isinstance(laplacian, SmoothPrior) else SmoothPrior(laplacian)
            # R = scale * R0 / mean(diag R0)
            r0_scale = prior.matrix.diagonal().mean()
            self.left = prior.solve(J.T) * (r0_scale / scale)       # R^-1 Jc^T (m, M)
            G = J @ self.left
            G[np.diag_indices_from(G)] += lam
            self.factor, self.col = _cho_factor(G), None
            return
        floor = 1e-12 * jtj_diag.max()
        if method == "lm":
            d = np.maximum(jtj_diag, floor)
        elif method == "kotre":
            d = np.maximum(jtj_diag, floor) ** p
        else:
            d = np.ones(m)
        d = d * (scale / d.mean())
        if M <= m:
            # data space: G = Js Js^T with Js = Jc R^-1/2, one symmetric product (numpy
            # hands ``A @ A.T`` to BLAS syrk) and a Cholesky factorisation of the M x M G
            inv_sqrt_d = 1.0 / np.sqrt(d)
            w = inv_sqrt_d if col_scale is None else inv_sqrt_d * col_scale
            Js = np.multiply(J, w, out=J if overwrite_j else None)
            G = Js @ Js.T
            G[np.diag_indices_from(G)] += lam
            self.left, self.col, self.factor = Js.T, inv_sqrt_d, _cho_factor(G)
            return
        # element space (more measurements than elements)
        if col_scale is not None:
            J = np.multiply(J, col_scale, out=J if overwrite_j else None)
        H = J.T @ J
        H[np.diag_indices_from(H)] += lam * d
        self.kind, self.jt, self.factor = "element", J.T, _cho_factor(H)

    def __call__(self, r: np.ndarray) -> np.ndarray:
        if self.kind == "element":
            return _cho_solve(self.factor, self.jt @ r)
        dx = self.left @ _cho_solve(self.factor, r)
        if self.col is not None:
            dx *= self.col if dx.ndim == 1 else self.col[:, None]
        return dx


_POTRF, _POTRS = sla.get_lapack_funcs(("potrf", "potrs"), dtype=np.float64)


def _cho_factor(G: np.ndarray) -> np.ndarray:
    """Cholesky factor (LAPACK ``potrf``, lower) of a symmetric positive definite C-ordered
    ``G``, computed in its memory (``G.T`` is the same matrix in Fortran order)."""
    factor, info = _POTRF(G.T, lower=1, overwrite_a=1, clean=0)
    if info != 0:
        raise InputError("the regularised Gauss-Newton system is not positive definite "
                         "(lam = 0 with fewer independent measurements than unknowns?)")
    return factor


def _cho_solve(factor: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _POTRS(factor, r, lower=1)[0]


def regularised_step(J: np.ndarray, r: np.ndarray, method: str, lam: float, p: float = 0.5,
                     laplacian=None, *, col_scale: np.ndarray | None = None,
                     overwrite_j: bool = False) -> np.ndarray:
    """``argmin ||r - Jc d||^2 + lam d^T R d`` for the prior named by ``method`` (see module doc),
    with ``Jc = J diag(col_scale)`` (``J`` itself when ``col_scale`` is None).

    ``laplacian`` (method ``smooth``): the element Laplacian or a :class:`SmoothPrior`.
    ``col_scale`` lets Gauss-Newton pass ``J`` and ``sigma`` for the log-parameter Jacobian
    without forming ``J diag(sigma)``; ``overwrite_j=True`` lets the step use J's memory.
    ``r`` may be (M,) or (M, B) (B right-hand sides, one factorisation)."""
    return _Step(J, method, lam, p, laplacian, col_scale, overwrite_j)(r)


# Per forward model: the start of Gauss-Newton from a given sigma0 does not depend on the
# data (v_model, J and the first step's factorisation at sigma0), so a run over many images
# computes it once. A few settings (sigma0, method, lam, p, log_param) are kept per model.
_FIRST_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_FIRST_STEPS_KEPT = 4


def _owns_jacobian(fm) -> bool:
    """Our ForwardModel returns a new J on every call, so a step may overwrite it; a
    model of another kind might keep and reuse its J."""
    return isinstance(fm, ForwardModel)


def clear_start_cache(fm=None) -> None:
    """Forget the cached start of Gauss-Newton (see ``_first_step``): ``fm``'s, or every model's."""
    if fm is None:
        _FIRST_STEPS.clear()
    else:
        _FIRST_STEPS.pop(fm, None)


def _first_step(fm, sigma: np.ndarray, method: str, lam: float, p: float, log_param: bool, need_step: bool):
    """``(v_model, step or None, laplacian)`` at the initial ``sigma``, cached per model."""
    # only our ForwardModel is known to be a fixed map (another kind of model: no cache)
    entries = _FIRST_STEPS.setdefault(fm, {}) if _owns_jacobian(fm) else {}
    key = (sigma.tobytes(), method, float(lam), float(p), bool(log_param))
    hit = entries.get(key)
    if hit is not None and (hit[1] is not None or not need_step):
        return hit
    laplacian = None
    if method == "smooth":
        laplacian = next((e[2] for e in entries.values() if e[2] is not None), None)
        if laplacian is None:
            laplacian = SmoothPrior(smoothness_matrix(fm.mesh))
    v_model, J = fm.jacobian(sigma)
    step = (_Step(J, method, lam, p, laplacian, sigma if log_param else None, overwrite_j=_owns_jacobian(fm))
            if need_step else None)
    entries.pop(key, None)
    entries[key] = (v_model, step, laplacian)
    while len(entries) > _FIRST_STEPS_KEPT:
        entries.pop(next(iter(entries)))
    return entries[key]


@single_blas_thread
def gauss_newton(fm, v, sigma0=1.0, method: str = "kotre", lam: float = 3.0, p: float = 0.5,
                 max_iter: int = 6, tol: float = 1e-4, log_param: bool = True,
                 line_search: bool = True, max_halvings: int = 6, max_step: float = 2.0, min_sigma: float = 1e-4,
                 lam_decay: float = 1.0, lam_min: float = 0.0, grid=None, verbose: bool = False,
                 iterates=None) -> GNResult:
    """Absolute Gauss-Newton reconstruction of element conductivities from voltages ``v`` (M,).

    ``iterates(k, sigma)``, when given, is called after each accepted iteration k = 1, 2, ...
    (how tuning scores every iteration count in one run)."""
    _check_method(method)
    v = fm.check_voltages(v)
    if v.ndim != 1:
        raise InputError(f"gauss_newton takes one measurement vector ({fm.n_meas},), got {v.shape}")
    if not (np.isfinite(lam) and lam >= 0):
        raise InputError(f"lam must be a non-negative number, got {lam}")
    if int(max_iter) < 0:
        raise InputError(f"max_iter must be >= 0, got {max_iter}")
    sigma = _initial_sigma(fm, sigma0)
    # the first step's operator depends on sigma0 and the settings only: cached per model
    v_model, step, laplacian = _first_step(fm, sigma, method, float(lam), p, log_param, int(max_iter) > 0)
    res_norm = float(np.linalg.norm(v - v_model))
    result = GNResult(sigma=sigma, history=[res_norm])
    for it in range(int(max_iter)):
        r = v - v_model
        if it > 0:
            # the log-parameter Jacobian J diag(sigma) is applied inside the step; J is
            # not needed afterwards, so the step may scale it in place
            step = _Step(J, method, lam, p, laplacian, sigma if log_param else None, overwrite_j=_owns_jacobian(fm))
        dx = step(r)
        # a step that changes some conductivity by more than a factor e^max_step is
        # shortened as a whole (its direction kept): the linearisation is not trusted there
        biggest = float(np.max(np.abs(dx))) if dx.size else 0.0
        t, accepted = (min(1.0, max_step / biggest) if biggest > 0 and max_step > 0 else 1.0), False
        for _ in range(max_halvings + 1 if line_search else 1):
            if log_param:
                trial = sigma * np.exp(np.clip(t * dx, -30, 30))
            else:
                trial = np.maximum(sigma + t * dx, min_sigma)
            trial = np.maximum(trial, min_sigma)
            v_trial = fm.forward(trial)
            trial_norm = float(np.linalg.norm(v - v_trial))
            if not line_search or trial_norm < res_norm:
                accepted = True
                break
            t *= 0.5
        if not accepted:
            result.converged = True
            break
        change = (res_norm - trial_norm) / max(res_norm, 1e-300)
        sigma, res_norm = trial, trial_norm
        result.history.append(res_norm)
        result.steps.append(t)
        result.n_iter = it + 1
        if iterates is not None:
            iterates(it + 1, sigma)
        if verbose:
            print(f"gn iter {it + 1}: |r| = {res_norm:.4e}, step {t:g}, lam {lam:.3g}")
        lam = max(lam * lam_decay, lam_min)
        if abs(change) < tol:
            result.converged = True
            break
        if it + 1 < max_iter:
            v_model, J = fm.jacobian(sigma)
    result.sigma = sigma
    if grid is not None:
        result.image = grid.to_image(sigma)
    return result


def linear_difference(fm, v, v_ref, lam: float = 0.5, method: str = "kotre", p: float = 0.5,
                      sigma_ref=1.0) -> np.ndarray:
    """One-step linearised reconstruction: ``sigma_ref + (J^T J + lam R)^-1 J^T (v - v_ref)``.

    ``J`` is the Jacobian at ``sigma_ref``; returns absolute element conductivities (m,),
    or (B, m) for a batch of voltages (v of shape (B, M) with v_ref (M,) or (B, M)).
    """
    _check_method(method)
    v = fm.check_voltages(v)
    v_ref = fm.check_voltages(v_ref, "v_ref")
    sigma = _initial_sigma(fm, sigma_ref)
    _, J = fm.jacobian(sigma)
    laplacian = SmoothPrior(smoothness_matrix(fm.mesh)) if method == "smooth" else None
    dv = v - v_ref
    if dv.ndim == 1:
        return sigma + regularised_step(J, dv, method, lam, p, laplacian)
    # the step is linear in dv: solve all columns at once
    return sigma[None, :] + regularised_step(J, dv.T, method, lam, p, laplacian).T


def gn_config(cfg: dict) -> dict:
    """Keyword arguments for :func:`gauss_newton` from a resolved config (its ``[gn]`` table).

    ``gn.lam`` is the weight at ``gn.lam_snr_ref_db``; when that is > 0 and the config has
    ``data.snr_db``, lam is scaled by the noise ratio ``10^((ref - snr_db) / 20)``.
    Keys missing from an older config (e.g. one stored in a data set) take the defaults of
    :func:`gauss_newton`."""
    import inspect

    g = cfg["gn"] if "gn" in cfg else cfg
    defaults = {name: param.default for name, param in inspect.signature(gauss_newton).parameters.items()}
    types = {"method": str, "lam": float, "p": float, "max_iter": int, "tol": float, "log_param": bool,
             "line_search": bool, "max_halvings": int, "max_step": float, "lam_decay": float, "lam_min": float}
    kwargs = {}
    for key, kind in types.items():
        value = g.get(key, defaults[key])
        try:
            kwargs[key] = kind(value) if kind is not bool else bool(value)
        except (TypeError, ValueError):
            raise InputError(f"gn.{key} must be {kind.__name__}, got {value!r}") from None
    _check_method(kwargs["method"])
    # lam is tuned at one noise level; the best weight grew in proportion to the noise
    # standard deviation in our scans (40 dB: 3, 25 dB: ~20), so follow the data's SNR
    ref_db = float(g.get("lam_snr_ref_db", 0.0))
    snr_db = cfg.get("data", {}).get("snr_db") if isinstance(cfg.get("data"), dict) else None
    if ref_db > 0 and snr_db is not None:
        kwargs["lam"] *= 10.0 ** ((ref_db - float(snr_db)) / 20.0)
    return kwargs
