"""P1 finite-element forward model and Jacobian for 2-D EIT.

Point electrodes (the paper's model, identical to pyEIT's): the electrode currents are
point sources at boundary nodes and one interior node (``mesh.ref_node``) is grounded.
Complete electrode model (CEM): the electrode potentials are extra unknowns coupled to
the boundary through the contact impedance ``z``::

    [ K(sigma) + M/z   -B/z      ] [u]   [0]
    [ -B^T/z           diag|e|/z ] [U] = [I]

with ``M`` the boundary mass matrix over the electrode arcs, ``B[i, l]`` the integral of
basis function i over electrode l and ``|e|`` the electrode lengths; one interior node is
grounded, so the system is symmetric positive definite.

Speed: ``K(sigma)`` is assembled as one sparse mat-vec ``S @ sigma`` into a fixed CSC
sparsity pattern (the pattern and the element -> nonzero scatter are built once). Each
conductivity costs ONE Cholesky factorisation ``A = U^T U`` of the grounded matrix in band
form (LAPACK ``pbtrf``; the reverse Cuthill-McKee ordering and the band scatter are computed
once; very large meshes fall back to a sparse LU), then one forward substitution
``Y = U^-T E`` for unit currents at all L electrodes: the electrode potentials are
``E^T A^-1 E = Y^T Y``, so ``forward`` needs nothing more. The Jacobian adds the back
substitution ``X = U^-1 Y`` (the L unit fields) and reuses the factorisation of the last
conductivity (a line search's accepted trial is not solved twice). Every excitation field
and every adjoint (measurement) field is a linear combination of those L fields, so
voltages and the Jacobian need no further solves; the Jacobian is formed per excitation
from the element gradients of the L fields (see ``ForwardModel._jacobian``). The public
calls run their BLAS work on one thread (see :func:`blas_threads`).

Jacobian sign: ``J = +dv/dsigma``; for an element e, ``J[k, e] = -area_e * grad(u_exc(k))
. grad(w_k)`` where ``w_k`` is the field of the measurement pattern k used as a current
pattern (reciprocity). pyEIT's ``compute_jac`` returns the negative of this.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from dgm_eit.errors import InputError
from dgm_eit.physics.mesh import Mesh
from dgm_eit.physics.protocol import Protocol


# LAPACK band Cholesky and triangular band solve (module level: a ForwardModel stays picklable)
_PBTRF, _TBTRS = sla.get_lapack_funcs(("pbtrf", "tbtrs"), dtype=np.float64)

_BLAS_LIBS = None


def _blas_libraries() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded now (numpy's and scipy's
    OpenBLAS are, once this module is imported); found once per process."""
    global _BLAS_LIBS
    if _BLAS_LIBS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS_LIBS = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        except Exception:  # pragma: no cover - threadpoolctl missing or unable to inspect
            _BLAS_LIBS = []
    return _BLAS_LIBS


@contextmanager
def blas_threads(n: int | None = 1):
    """At most ``n`` BLAS threads inside the block (``None``: leave the setting alone);
    the previous counts are restored on exit. A few microseconds when nothing changes.

    The FEM and Gauss-Newton work on small matrices (a band of width ~60, 16 right-hand
    sides, a 208 x 208 Gram matrix), where threads gain little, while OpenBLAS threads that
    share the cores with other work stall: measured on a 2-core machine running two other
    jobs, two BLAS threads made the 208 x 208 solve of a GN step 0.5 ms -> 67 ms, a band
    factorisation and solve 0.45 ms -> 30 ms, and a Gauss-Newton image (747 nodes) 44 ms ->
    0.9 s. Not thread-safe against another Python thread changing the BLAS thread count at
    the same time (that only costs speed)."""
    changed = []
    if n is not None:
        for lib in _blas_libraries():
            k = lib.get_num_threads()
            if k is not None and k > n:
                lib.set_num_threads(n)
                changed.append((lib, k))
    try:
        yield
    finally:
        for lib, k in changed:
            lib.set_num_threads(k)


def single_blas_thread(method):
    """Run a ForwardModel method with one BLAS thread (see :func:`blas_threads`)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with blas_threads(1):
            return method(*args, **kwargs)
    return wrapper


class _Solution:
    """One conductivity's factorisation and the solves made with it so far."""

    __slots__ = ("factor", "Y", "X")

    def __init__(self):
        self.factor = self.Y = self.X = None


def _as_slice(rows: np.ndarray):
    """``rows`` as a slice when they are consecutive (views instead of copies), else as is."""
    if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return slice(int(rows[0]), int(rows[0]) + len(rows))
    return rows


def element_gradients(mesh: Mesh) -> np.ndarray:
    """(m, 3, 2) gradients of the three barycentric basis functions on each element."""
    p = mesh.nodes[mesh.elements]
    x, y = p[..., 0], p[..., 1]
    b = np.stack([y[:, 1] - y[:, 2], y[:, 2] - y[:, 0], y[:, 0] - y[:, 1]], axis=1)
    c = np.stack([x[:, 2] - x[:, 1], x[:, 0] - x[:, 2], x[:, 1] - x[:, 0]], axis=1)
    two_area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    return np.stack([b, c], axis=2) / two_area[:, None, None]


class ForwardModel:
    """EIT forward map ``sigma (per element) -> measurements`` and its Jacobian."""

    def __init__(self, mesh: Mesh, protocol: Protocol, electrode_model: str | None = None,
                 contact_impedance: float | np.ndarray = 0.01):
        if not isinstance(mesh, Mesh):
            raise InputError(f"mesh must be a dgm_eit Mesh, got {type(mesh).__name__}")
        if not isinstance(protocol, Protocol):
            raise InputError(f"protocol must be a dgm_eit Protocol, got {type(protocol).__name__}")
        model = mesh.electrode_model if electrode_model is None else electrode_model
        if model not in ("point", "cem"):
            raise InputError(f"unknown electrode model {model!r}; choose point or cem")
        if model != mesh.electrode_model:
            raise InputError(f"electrode model {model!r} does not fit a mesh built for "
                             f"{mesh.electrode_model!r} electrodes; build the mesh with "
                             f"electrode_model={model!r}")
        if protocol.n_electrodes != mesh.n_electrodes:
            raise InputError(f"protocol uses {protocol.n_electrodes} electrodes but the mesh has "
                             f"{mesh.n_electrodes}")
        self.mesh = mesh
        self.protocol = protocol
        self.electrode_model = model
        L = mesh.n_electrodes
        try:
            z = np.broadcast_to(np.asarray(contact_impedance, dtype=np.float64), (L,)).copy()
        except (TypeError, ValueError):
            raise InputError(f"contact impedance must be one number or one per electrode ({L}), "
                             f"got {contact_impedance!r}") from None
        if model == "cem" and not (np.all(np.isfinite(z)) and np.all(z > 0)):
            raise InputError(f"contact impedance must be positive, got {contact_impedance!r}")
        self.contact_impedance = z
        self._grads = element_gradients(mesh)
        self._build_pattern()
        self._injections = protocol.injections
        self._measurements = protocol.measurements
        self._meas_exc = protocol.meas_excitation
        self._rows_by_excitation = [(i, _as_slice(np.flatnonzero(self._meas_exc == i)))
                                    for i in np.unique(self._meas_exc)]
        self._build_jacobian_operators()
        # (sigma, fields) of the last solve, replaced as one tuple so that threads sharing
        # this model never pair one conductivity with another's fields
        self._cache = None

    # ------------------------------------------------------------------ set-up
    @property
    def n_meas(self) -> int:
        return self.protocol.n_meas

    @property
    def n_elements(self) -> int:
        return self.mesh.n_elements

    @property
    def n_electrodes(self) -> int:
        return self.mesh.n_electrodes

    def _build_pattern(self) -> None:
        mesh = self.mesh
        n, m, L = mesh.n_nodes, mesh.n_elements, mesh.n_electrodes
        elements = mesh.elements
        local = mesh.areas[:, None, None] * np.einsum("eid,ejd->eij", self._grads, self._grads)
        rows = np.repeat(elements, 3, axis=1).ravel()
        cols = np.tile(elements, (1, 3)).ravel()
        owner = np.repeat(np.arange(m), 9)
        vals = local.ravel()
        const_rows = np.zeros(0, np.int64)
        const_cols = np.zeros(0, np.int64)
        const_vals = np.zeros(0)
        n_full = n
        if self.electrode_model == "cem":
            n_full = n + L
            cr, cc, cv = [], [], []
            for l, edges in enumerate(mesh.electrode_edges):
                zl = self.contact_impedance[l]
                i, j = edges[:, 0], edges[:, 1]
                h = np.hypot(*(mesh.nodes[i] - mesh.nodes[j]).T)
                # boundary mass matrix h/6 [[2,1],[1,2]] over each edge of the arc
                cr += [i, j, i, j]
                cc += [i, j, j, i]
                cv += [h / (3 * zl), h / (3 * zl), h / (6 * zl), h / (6 * zl)]
                e = np.full_like(i, n + l)
                cr += [i, j, e, e]
                cc += [e, e, i, j]
                cv += [-h / (2 * zl)] * 4
                cr.append(np.array([n + l]))
                cc.append(np.array([n + l]))
                cv.append(np.array([h.sum() / zl]))
            const_rows = np.concatenate(cr)
            const_cols = np.concatenate(cc)
            const_vals = np.concatenate(cv)
        ref = mesh.ref_node
        reduced = np.full(n_full, -1, dtype=np.int64)
        keep = np.arange(n_full) != ref
        reduced[keep] = np.arange(n_full - 1)
        self._n_full = n_full
        self._reduced = reduced
        N = n_full - 1
        all_rows = reduced[np.concatenate([rows, const_rows])]
        all_cols = reduced[np.concatenate([cols, const_cols])]
        ok = (all_rows >= 0) & (all_cols >= 0)
        # column-major key so that the unique order is CSC order
        key = all_cols * N + all_rows
        uniq, position = np.unique(key[ok], return_inverse=True)
        nnz = len(uniq)
        self._indices = (uniq % N).astype(np.int32)
        self._indptr = np.searchsorted(uniq // N, np.arange(N + 1)).astype(np.int32)
        n_var = len(rows)
        ok_var, ok_const = ok[:n_var], ok[n_var:]
        pos_var = position[: ok_var.sum()]
        pos_const = position[ok_var.sum():]
        self._scatter = sp.csr_matrix((vals[ok_var], (pos_var, owner[ok_var])), shape=(nnz, m))
        self._const = np.bincount(pos_const, weights=const_vals[ok_const], minlength=nnz)
        self._N = N
        # right-hand sides: a unit current into each electrode
        rhs = np.zeros((N, L))
        if self.electrode_model == "point":
            targets = np.array([e[0] for e in mesh.electrode_nodes])
        else:
            targets = n + np.arange(L)
        rhs[reduced[targets], np.arange(L)] = 1.0
        self._rhs = rhs
        self._electrode_rows = reduced[targets]
        self._build_band(uniq % N, uniq // N)

    def _build_band(self, rows: np.ndarray, cols: np.ndarray) -> None:
        """Precompute a reverse Cuthill-McKee ordering and the scatter of the matrix's upper
        triangle into LAPACK band storage, so each conductivity costs one band Cholesky.

        The mesh graph of a 2-D disk has a narrow RCM band (about 50 for 1500 nodes), so
        the band factorisation beats a general sparse LU several times over."""
        from scipy.sparse.csgraph import reverse_cuthill_mckee

        N = self._N
        pattern = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(N, N))
        perm = np.asarray(reverse_cuthill_mckee(pattern, symmetric_mode=True), dtype=np.int64)
        iperm = np.empty_like(perm)
        iperm[perm] = np.arange(N)
        pr, pc = iperm[rows], iperm[cols]
        upper = pr <= pc
        bw = int(np.max(pc[upper] - pr[upper])) if upper.any() else 0
        self._bandwidth = bw
        # band Cholesky costs N*bw^2; a general sparse LU wins for large, wide meshes
        self._use_band = N * bw * bw <= 2e8
        self._band_nz = np.flatnonzero(upper)
        # flat index into LAPACK's (bw + 1, N) upper band storage, column-major (Fortran)
        self._band_flat = (bw + pr[upper] - pc[upper]) + pc[upper] * (bw + 1)
        self._band_perm = perm
        self._band_iperm = iperm
        self._band_rhs = np.asfortranarray(self._rhs[perm])

    def _build_jacobian_operators(self) -> None:
        """The sparse map from grounded fields to element gradients, and the protocol's
        patterns arranged for the Jacobian (see :meth:`jacobian`)."""
        mesh = self.mesh
        m = mesh.n_elements
        # row d*m + e of D gives component d of the gradient on element e of a field given
        # by its grounded unknowns (the grounded node's value is 0 and drops out)
        cols = self._reduced[mesh.elements]                                   # (m, 3)
        vals = self._grads.transpose(2, 0, 1)                                 # (2, m, 3)
        rows = np.broadcast_to(np.arange(2 * m).reshape(2, m, 1), vals.shape)
        keep = np.broadcast_to(cols >= 0, vals.shape)
        colsb = np.broadcast_to(cols, vals.shape)
        self._grad_op = sp.csr_matrix((vals[keep], (rows[keep], colsb[keep])), shape=(2 * m, self._N))
        self._neg_area = -mesh.areas
        # (excitation, its measurement rows, their patterns as one contiguous block)
        self._jacobian_blocks = [(i, rows, np.ascontiguousarray(self._measurements[rows]))
                                 for i, rows in self._rows_by_excitation]

    # ------------------------------------------------------------ validation
    def check_sigma(self, sigma, name: str = "sigma") -> np.ndarray:
        """``sigma`` as float64 (m,) or (B, m); InputError when it is not positive and finite."""
        try:
            s = np.asarray(sigma, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be an array of numbers") from None
        m = self.n_elements
        if s.ndim == 0:
            s = np.full(m, float(s))
        if s.ndim not in (1, 2) or s.shape[-1] != m:
            raise InputError(f"{name} must have shape ({m},) or (B, {m}) for this mesh, got {s.shape}")
        if not np.all(np.isfinite(s)):
            raise InputError(f"{name} contains NaN or inf")
        if np.any(s <= 0):
            raise InputError(f"{name} must be positive (min {s.min():.3g})")
        return s

    def check_voltages(self, v, name: str = "v") -> np.ndarray:
        try:
            v = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"{name} must be an array of numbers") from None
        if v.ndim not in (1, 2) or v.shape[-1] != self.n_meas:
            raise InputError(f"{name} must have shape ({self.n_meas},) or (B, {self.n_meas}), got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise InputError(f"{name} contains NaN or inf")
        return v

    # ------------------------------------------------------------------ solves
    def system_matrix(self, sigma: np.ndarray) -> sp.csc_matrix:
        """The grounded FEM system matrix for one conductivity (no validation)."""
        data = self._scatter @ sigma + self._const
        return sp.csc_matrix((data, self._indices, self._indptr), shape=(self._N, self._N))

    def _factorise(self, sigma: np.ndarray) -> "_Solution":
        """Factorise the system for ``sigma`` (no validation); cached for the last sigma.

        Band path: ``A = U^T U`` (LAPACK ``pbtrf``) in the RCM order, then the forward
        substitution ``Y = U^-T E`` for the L unit currents ``E``. The electrode potentials
        need nothing more (``R = E^T A^-1 E = Y^T Y``); the fields ``X = U^-1 Y`` (one more
        triangular solve) are only formed when asked for (Jacobian, node fields)."""
        cache = self._cache
        if cache is not None and np.array_equal(sigma, cache[0]):
            return cache[1]
        data = self._scatter @ sigma + self._const
        sol = _Solution()
        if self._use_band:
            N, bw = self._N, self._bandwidth
            ab = np.zeros((bw + 1) * N)
            ab[self._band_flat] = data[self._band_nz]
            factor, info = _PBTRF(ab.reshape((bw + 1, N), order="F"), lower=0, overwrite_ab=1)
            if info != 0:
                raise InputError("the FEM system is not positive definite; is sigma positive?")
            sol.factor = factor
            sol.Y = _TBTRS(factor, self._band_rhs, uplo="U", trans="T")[0]
        else:
            A = sp.csc_matrix((data, self._indices, self._indptr), shape=(self._N, self._N))
            lu = spla.splu(A, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                           options={"SymmetricMode": True})
            sol.X = lu.solve(self._rhs)
        self._cache = (sigma.copy(), sol)
        return sol

    def _fields(self, sol: "_Solution") -> np.ndarray:
        """(N, L) grounded solution for a unit current into each electrode."""
        X = sol.X
        if X is None:
            X = _TBTRS(sol.factor, sol.Y, uplo="U", trans="N")[0][self._band_iperm]
            sol.X = X
        return X

    def _transfer(self, sol: "_Solution") -> np.ndarray:
        """(L, L) grounded electrode potentials for a unit current into each electrode."""
        if sol.Y is not None:
            return sol.Y.T @ sol.Y
        return sol.X[self._electrode_rows]

    def _solve_fields(self, sigma: np.ndarray) -> np.ndarray:
        """(N, L) grounded solution for a unit current into each electrode."""
        return self._fields(self._factorise(sigma))

    def clear_cache(self) -> None:
        """Forget the fields of the last conductivity (the next call solves again)."""
        self._cache = None

    @single_blas_thread
    def transfer_matrix(self, sigma) -> np.ndarray:
        """(L, L) electrode potentials for a unit current into each electrode (grounded).

        Voltages of any protocol are ``meas @ R @ inj``; R is symmetric (reciprocity)."""
        s = self.check_sigma(sigma)
        if s.ndim != 1:
            raise InputError("transfer_matrix takes one conductivity, shape (m,)")
        return self._transfer(self._factorise(s))

    @single_blas_thread
    def node_fields(self, sigma) -> np.ndarray:
        """(n_nodes, L) nodal potentials for a unit current into each electrode."""
        s = self.check_sigma(sigma)
        X = self._solve_fields(s)
        return self._node_part(X)

    def _node_part(self, X: np.ndarray) -> np.ndarray:
        n = self.mesh.n_nodes
        red = self._reduced[:n]
        phi = np.zeros((n, X.shape[1]))
        inside = red >= 0
        phi[inside] = X[red[inside]]
        return phi

    def _voltages(self, R: np.ndarray) -> np.ndarray:
        U = self._injections @ R  # (E, L): R symmetric, so row i = electrode potentials of excitation i
        return np.einsum("kl,kl->k", self._measurements, U[self._meas_exc])

    # ----------------------------------------------------------------- public
    @single_blas_thread
    def forward(self, sigma) -> np.ndarray:
        """Measurements for conductivity ``sigma`` (m,) -> (M,) or (B, m) -> (B, M)."""
        s = self.check_sigma(sigma)
        if s.ndim == 1:
            return self._voltages(self._transfer(self._factorise(s)))
        out = np.empty((len(s), self.n_meas))
        for i, row in enumerate(s):
            out[i] = self._voltages(self._transfer(self._factorise(row)))
        return out

    @single_blas_thread
    def jacobian(self, sigma):
        """``(v, J)`` with ``J = dv/dsigma`` of shape (M, m) for one conductivity (m,)."""
        s = self.check_sigma(sigma)
        if s.ndim != 1:
            raise InputError(f"jacobian takes one conductivity of shape ({self.n_elements},), got {s.shape}")
        sol = self._factorise(s)
        v = self._voltages(self._transfer(sol))
        return v, self._jacobian(self._fields(sol))

    def _jacobian(self, X: np.ndarray) -> np.ndarray:
        """J (M, m) from the (N, L) unit-current fields ``X``.

        ``J[k, e] = -area_e * grad u_i . grad w_k`` on element e, with ``u_i = sum_l
        inj[i, l] phi_l`` the field of excitation ``i = exc(k)`` and ``w_k = sum_l meas[k, l]
        phi_l`` the (adjoint) field of measurement pattern k. With ``g_l`` the element
        gradients of the unit fields ``phi_l``, this is ``J[k] = sum_l meas[k, l] S_i[l]``
        where ``S_i[l] = -area * g_l . grad u_i``: per excitation one (L, m) product and a
        (rows, L) x (L, m) matrix product written straight into J's rows (no (E, L, m)
        tensor; the work stays in cache)."""
        m, L = self.n_elements, self.n_electrodes
        # (2, L, m): gradient component d of unit field l on element e
        g = np.ascontiguousarray((self._grad_op @ X).reshape(2, m, L).transpose(0, 2, 1))
        gu = np.matmul(self._injections, g)          # (2, E, m) excitation field gradients
        gu *= self._neg_area
        J = np.empty((self.n_meas, m))
        S = np.empty((L, m))
        for i, rows, meas in self._jacobian_blocks:
            np.einsum("dle,de->le", g, gu[:, i], out=S)
            if isinstance(rows, slice):
                np.matmul(meas, S, out=J[rows])
            else:
                J[rows] = meas @ S
        return J

    def __repr__(self) -> str:
        return (f"ForwardModel({self.mesh!r}, protocol={self.protocol.name} ({self.n_meas} meas), "
                f"electrodes={self.electrode_model})")


def mesh_placement(cfg: dict) -> tuple[float, float]:
    """``(radius, first_electrode_angle)`` of a config's ``[mesh]``, checked (a config written
    before they were keys reads as the unit disk with electrode 0 at angle 0)."""
    from dgm_eit.config import with_added_keys

    if "mesh" not in cfg:
        raise InputError("the config has no [mesh] section")
    mesh = with_added_keys(cfg)["mesh"]
    radius, angle = mesh["radius"], mesh["first_electrode_angle"]
    if not (isinstance(radius, (int, float)) and np.isfinite(radius) and radius > 0):
        raise InputError(f"mesh.radius must be a positive length, got {radius!r}")
    if not (isinstance(angle, (int, float)) and np.isfinite(angle)):
        raise InputError(f"mesh.first_electrode_angle must be a finite angle in radians, got {angle!r}")
    return float(radius), float(angle)


def forward_model_from_config(cfg: dict, section: str = "mesh") -> ForwardModel:
    """The forward model of a resolved config: ``[mesh]`` keys, overridden by those present
    in ``[section]`` (``section="simulation"`` gives the finer data mesh on the same disk)."""
    from dgm_eit.physics.mesh import disk_mesh
    from dgm_eit.physics.protocol import make_protocol

    radius, angle = mesh_placement(cfg)
    keys = dict(cfg["mesh"])
    if section != "mesh":
        if section not in cfg:
            raise InputError(f"the config has no [{section}] section")
        keys.update(cfg[section])
    model = str(keys["electrode_model"])
    mesh = disk_mesh(n_electrodes=int(keys["n_electrodes"]), h0=float(keys["h0"]), electrode_model=model,
                     electrode_width=float(keys["electrode_width"]), radius=radius,
                     first_electrode_angle=angle)
    protocol = make_protocol(str(keys["protocol"]), n_electrodes=int(keys["n_electrodes"]))
    return ForwardModel(mesh, protocol, electrode_model=model, contact_impedance=float(keys["contact_impedance"]))
