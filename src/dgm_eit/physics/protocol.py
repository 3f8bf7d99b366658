"""Stimulation and measurement protocols.

A protocol is an injection-current matrix ``injections`` (E, L) (row i: the current into
each electrode for excitation i; rows sum to zero), a measurement-pattern matrix
``measurements`` (M, L) (row k: weights of the electrode potentials whose sum is
measurement k) and ``meas_excitation`` (M,) (the excitation during which measurement k is
taken). Measurement k is ``measurements[k] @ U[meas_excitation[k]]`` with ``U[i]`` the
electrode potentials of excitation i.

``adjacent`` reproduces pyEIT's ``protocol.create(L, dist_exc=1, step_meas=1,
parser_meas="std")`` exactly: excitation i drives +1 into electrode i and -1 into i+1;
measurement pairs (m+1, m) for m = 0..L-1 give ``U[m+1] - U[m]``; pairs touching a current
electrode are dropped (16 x 13 = 208 for 16 electrodes). ``opposite`` drives i and i+L/2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dgm_eit.errors import InputError

PROTOCOLS = ("adjacent", "opposite")


@dataclass(frozen=True, eq=False)
class Protocol:
    injections: np.ndarray
    measurements: np.ndarray
    meas_excitation: np.ndarray
    name: str = "custom"

    def __post_init__(self):
        inj = np.array(self.injections, dtype=np.float64, ndmin=2)
        meas = np.array(self.measurements, dtype=np.float64, ndmin=2)
        exc = np.asarray(self.meas_excitation).reshape(-1)
        if inj.ndim != 2 or meas.ndim != 2:
            raise InputError("protocol injections and measurements must be 2-D matrices")
        if inj.shape[1] != meas.shape[1]:
            raise InputError(f"protocol injections have {inj.shape[1]} electrodes but measurements "
                             f"have {meas.shape[1]}")
        if len(exc) != len(meas):
            raise InputError(f"meas_excitation has {len(exc)} entries for {len(meas)} measurements")
        if not (np.all(np.isfinite(inj)) and np.all(np.isfinite(meas))):
            raise InputError("protocol matrices contain NaN or inf")
        if exc.size and (not np.issubdtype(exc.dtype, np.integer) or exc.min() < 0 or exc.max() >= len(inj)):
            raise InputError(f"meas_excitation must be integers in [0, {len(inj)})")
        scale = np.abs(inj).sum(axis=1).max(initial=0.0)
        if np.any(np.abs(inj.sum(axis=1)) > 1e-12 * max(scale, 1.0)):
            raise InputError("protocol injection currents must sum to zero for every excitation")
        for name, value in (("injections", inj), ("measurements", meas), ("meas_excitation", exc.astype(np.int64))):
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    @property
    def n_electrodes(self) -> int:
        return self.injections.shape[1]

    @property
    def n_exc(self) -> int:
        return self.injections.shape[0]

    @property
    def n_meas(self) -> int:
        return self.measurements.shape[0]


def _pair_protocol(n_electrodes: int, dist_exc: int, step_meas: int, name: str) -> Protocol:
    L = n_electrodes
    injections, measurements, excitation = [], [], []
    for i in range(L):
        a, b = i, (i + dist_exc) % L
        row = np.zeros(L)
        row[a], row[b] = 1.0, -1.0
        injections.append(row)
        for m in range(L):
            n = (m + step_meas) % L
            if m in (a, b) or n in (a, b):
                continue
            pattern = np.zeros(L)
            pattern[n], pattern[m] = 1.0, -1.0
            measurements.append(pattern)
            excitation.append(i)
    return Protocol(np.array(injections), np.array(measurements), np.array(excitation, dtype=np.int64), name)


def same_pattern_protocol(injections, pattern, *, columns: bool = False, name: str = "same-pattern") -> Protocol:
    """Every injection measured with the same patterns: ``E*K`` rows, injection-major.

    Row ``i*K + k`` is pattern ``k`` measured during injection ``i``, which is the order of
    KTC2023's ``Uel`` (the 31 differences of injection 1, then of injection 2, ...).

    ``columns=False``: ``injections`` (E, L) and ``pattern`` (K, L), one pattern per row,
    as in :class:`Protocol`. ``columns=True``: the files' orientation, one pattern per
    COLUMN: ``injections`` (L, E) (KTC's ``Inj``, 32 x 76) and ``pattern`` (L, K) (KTC's
    ``Mpat``, 32 x 31). The orientation must be said, not guessed: with 32 electrodes and
    31 or 76 patterns a guess could be wrong without any error. A mismatch is refused with
    a message that names the shapes and the other orientation when that one would fit.
    """
    try:
        inj = np.array(injections, dtype=np.float64)
        pat = np.array(pattern, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("injections and pattern must be numeric matrices") from None
    if inj.ndim != 2 or pat.ndim != 2:
        raise InputError(f"injections and pattern must be 2-D matrices, got shapes {inj.shape} and {pat.shape}")
    axis = 0 if columns else 1          # the electrode axis
    if inj.shape[axis] != pat.shape[axis]:
        other = 1 - axis
        hint = ""
        if inj.shape[other] == pat.shape[other]:
            hint = (f"; they agree on axis {other}: " +
                    ("pass columns=True for one pattern per column (KTC's Inj (32, 76), Mpat (32, 31))"
                     if not columns else "pass columns=False for one pattern per row"))
        layout = "(electrodes, patterns)" if columns else "(patterns, electrodes)"
        raise InputError(f"injections {inj.shape} and pattern {pat.shape} do not have the same number of "
                         f"electrodes on axis {axis} (expected {layout} for columns={columns}){hint}")
    if columns:
        inj, pat = inj.T, pat.T
    if not (np.all(np.isfinite(inj)) and np.all(np.isfinite(pat))):
        raise InputError("injections and pattern must be finite (NaN marks missing data in measured voltages, "
                         "never in the protocol)")
    n_exc, n_pat = len(inj), len(pat)
    if n_exc == 0 or n_pat == 0:
        raise InputError(f"a protocol needs at least one injection and one pattern, got {n_exc} and {n_pat}")
    measurements = np.tile(pat, (n_exc, 1))
    excitation = np.repeat(np.arange(n_exc, dtype=np.int64), n_pat)
    return Protocol(inj, measurements, excitation, name)


def make_protocol(name: str = "adjacent", n_electrodes: int = 16) -> Protocol:
    """Named protocol for ``n_electrodes`` electrodes: ``adjacent`` or ``opposite``."""
    n_electrodes = int(n_electrodes)
    if n_electrodes < 4:
        raise InputError(f"a protocol needs at least 4 electrodes, got {n_electrodes}")
    if name == "adjacent":
        return _pair_protocol(n_electrodes, 1, 1, name)
    if name == "opposite":
        if n_electrodes % 2:
            raise InputError(f"the opposite protocol needs an even number of electrodes, got {n_electrodes}")
        return _pair_protocol(n_electrodes, n_electrodes // 2, 1, name)
    raise InputError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
