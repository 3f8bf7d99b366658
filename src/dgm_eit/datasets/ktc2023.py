"""The Kuopio Tomography Challenge 2023 (KTC2023) water tank: files, levels, tank model, score.

What this module gives (the foundation for real-data experiments; no trained KTC model yet):

- **Files** (``scipy.io.loadmat``): :func:`load_measurement` (``data<n>.mat``: ``Uel``,
  ``Inj``, ``Mpat``), :func:`load_reference` (``ref.mat``: ``Uelref``, ``Injref``, ``Mpat``),
  :func:`load_truth` (``true<n>.mat``: ``truth``), :func:`load_reconstruction` (a
  submission's ``<n>.mat``: ``reconstruction``). Voltages come back as (2356,) float64
  whatever the stored shape ((2356, 1) column vectors, as the organisers save them); NaN
  marks data of missing electrodes (the challenge's evaluation files) and is kept, so
  :meth:`Measurement.mask` can drop it. Every problem (missing file, not a .mat file, a
  variable missing, a wrong size or orientation) is one :class:`InputError` naming the file.
- **Levels**: :func:`level_mask` -- level L (1..7) drops electrodes 1..2(L-1) (1-based),
  every measurement pattern that uses one of them and every injection that drives one.
- **Tank model**: :func:`tank_mesh`, :func:`tank_protocol`, :func:`tank_setup` build the
  2-D tank (radius 0.115 m, 32 CEM electrodes of arc pi/32 rad, electrode 1 at 90 degrees,
  numbered counter-clockwise) with KTC's own injection and measurement matrices, in SI
  units, so fitted conductivities are in S/m and need no rescaling.
  :func:`fit_reference` fits the background conductivity and one contact impedance to the
  empty-tank frame and reports the relative residual.
- **Score**: :func:`score` / :func:`score_parts` -- the challenge's score of one target:
  the mean of the SSIMs of the conductive (class 2) and resistive (class 1) binary maps,
  with the organisers' Gaussian window (sigma 80 px, truncated at 2 sigma = 160 px, zero
  padding, normalised by the window mass inside the image) and c1 = 1e-4, c2 = 9e-4.

Facts (tank, electrodes, score, levels) are from the organisers' published description and
code (Zenodo 8252370; Rasanen et al., "Kuopio Tomography Challenge 2023"); the code here is
our own.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dgm_eit.errors import InputError

TANK_RADIUS = 0.115                      # m; the images cover [-R, R]^2
N_ELECTRODES = 32
ELECTRODE_ARC = np.pi / 32               # rad: half the pitch (read from the organisers' mesh)
ELECTRODE_WIDTH = TANK_RADIUS * ELECTRODE_ARC   # m, 11.3 mm arc length
FIRST_ELECTRODE_ANGLE = np.pi / 2        # electrode 1 at 90 degrees, then counter-clockwise
N_INJECTIONS = 76
N_PATTERNS = 31
N_MEAS = N_INJECTIONS * N_PATTERNS       # 2356, injection-major
IMAGE_SIZE = 256
LEVELS = tuple(range(1, 8))
DEFAULT_H0 = 0.004                       # m: boundary edge length of the default tank mesh

# score constants (the organisers' definition)
SCORE_SIGMA_PX = 80.0
SCORE_C1 = 1e-4
SCORE_C2 = 9e-4


# ---------------------------------------------------------------------------------
# files

@dataclass(frozen=True, eq=False)
class Measurement:
    """One KTC frame: ``voltages`` (2356,) float64 (NaN = missing), ``injections`` (32, 76)
    one current pattern per column (KTC's ``Inj``), ``pattern`` (32, 31) one measurement
    pattern per column (``Mpat``), and the ``path`` it came from."""

    voltages: np.ndarray
    injections: np.ndarray
    pattern: np.ndarray
    path: str = ""

    @property
    def available(self) -> np.ndarray:
        """(2356,) bool: the voltages present in the file (not NaN)."""
        return np.isfinite(self.voltages)

    def mask(self, level: int = 1) -> np.ndarray:
        """(2356,) bool: the measurements a method may use at ``level`` -- present in the
        file AND kept by :func:`level_mask` (the level's rule, from this frame's matrices)."""
        return self.available & level_mask(level, self.injections, self.pattern)

    def protocol(self):
        """The frame's protocol (:func:`tank_protocol`)."""
        return tank_protocol(self.injections, self.pattern)


def _loadmat(path, what: str) -> tuple[Path, dict]:
    from dgm_eit.files import require_file

    path = require_file(path, what)
    import scipy.io

    try:
        data = scipy.io.loadmat(path)
    except NotImplementedError:
        raise InputError(f"{what} {path} is a MATLAB v7.3 (HDF5) file; save it with -v7 (scipy reads v4-v7)") from None
    except Exception as err:  # scipy raises ValueError, TypeError, struct errors ... for non-.mat bytes
        raise InputError(f"{what} {path} is not a readable MATLAB .mat file ({type(err).__name__}: {err})") from None
    return path, data


def _variable(data: dict, name: str, path: Path, what: str, hint: str = "") -> np.ndarray:
    if name not in data:
        held = sorted(k for k in data if not k.startswith("__"))
        raise InputError(f"{what} {path} has no variable {name!r} (it holds: {', '.join(held) or 'nothing'})"
                         + (f"; {hint}" if hint else ""))
    # a cast to float64 would drop an imaginary part with only numpy's warning
    if np.iscomplexobj(data[name]):
        raise InputError(f"{what} {path}: variable {name!r} holds complex values; the KTC files hold real numbers")
    try:
        return np.asarray(data[name], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{what} {path}: variable {name!r} is not a numeric array") from None


def _as_vector(x: np.ndarray, n: int, name: str, path: Path) -> np.ndarray:
    """(n,), (n, 1) or (1, n) -> (n,): MATLAB saves vectors as 2-D columns."""
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.shape != (n,):
        raise InputError(f"{path}: {name} must hold {n} voltages ((n,) or an (n, 1) column), got shape {x.shape}")
    return x


def _as_matrix(x: np.ndarray, shape: tuple, name: str, path: Path) -> np.ndarray:
    if x.shape != shape:
        hint = " (it looks transposed)" if x.shape == shape[::-1] else ""
        raise InputError(f"{path}: {name} must have shape {shape} (electrodes x patterns, one pattern per "
                         f"column, as in the KTC files), got {x.shape}{hint}")
    return x


def _frame(path, what: str, u_name: str, inj_name: str, other: tuple[str, str]) -> Measurement:
    path, data = _loadmat(path, what)
    hint = ""
    if u_name not in data and other[0] in data:
        hint = f"it has {other[0]!r}, so it looks like a {other[1]}"
    u = _variable(data, u_name, path, what, hint)
    inj = _variable(data, inj_name, path, what, hint)
    mpat = _variable(data, "Mpat", path, what)
    u = _as_vector(u, N_MEAS, u_name, path)
    inj = _as_matrix(inj, (N_ELECTRODES, N_INJECTIONS), inj_name, path)
    mpat = _as_matrix(mpat, (N_ELECTRODES, N_PATTERNS), "Mpat", path)
    if np.isinf(u).any():
        raise InputError(f"{path}: {u_name} contains infinite values (missing data must be NaN)")
    if np.isnan(u).all():
        raise InputError(f"{path}: {u_name} holds no voltages (all NaN)")
    if not np.isfinite(mpat).all():
        raise InputError(f"{path}: Mpat contains NaN or inf")
    if np.isnan(inj).all():
        raise InputError(f"{path}: {inj_name} holds no currents (all NaN)")
    for a in (u, inj, mpat):
        a.setflags(write=False)
    return Measurement(u, inj, mpat, str(path))


def load_measurement(path) -> Measurement:
    """A measurement frame ``data<n>.mat`` (``Uel`` (2356, 1), ``Inj`` (32, 76), ``Mpat``
    (32, 31)). NaN voltages (electrodes missing in the evaluation sets) are kept: use
    :meth:`Measurement.mask` to select what a method may use."""
    return _frame(path, "measurement file", "Uel", "Inj", ("Uelref", "reference frame (ref.mat), not a data<n>.mat"))


def load_reference(path) -> Measurement:
    """The empty-tank frame ``ref.mat`` (``Uelref`` (2356, 1), ``Injref`` (32, 76), ``Mpat``)."""
    return _frame(path, "reference file", "Uelref", "Injref", ("Uel", "measurement frame (data<n>.mat), not ref.mat"))


def _class_map(data: dict, name: str, path: Path, what: str) -> np.ndarray:
    x = _variable(data, name, path, what)
    if x.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"{what} {path}: {name} must be a {IMAGE_SIZE} x {IMAGE_SIZE} image, got shape {x.shape}")
    return x


def _check_classes(x: np.ndarray, name: str, path: Path, what: str) -> None:
    """Only the classes 0, 1, 2: the score compares class maps, so any other value (NaN, a
    raw conductivity, a negated map) would silently count as water."""
    if np.isnan(x).any():
        raise InputError(f"{what} {path}: {name} holds NaN values ({int(np.isnan(x).sum())} pixels); "
                         "it must hold the classes 0, 1, 2 only")
    if np.isinf(x).any():
        raise InputError(f"{what} {path}: {name} holds infinite values ({int(np.isinf(x).sum())} pixels); "
                         "it must hold the classes 0, 1, 2 only")
    if not np.isin(x, (0, 1, 2)).all():
        bad = np.unique(x[~np.isin(x, (0, 1, 2))])[:5]
        raise InputError(f"{what} {path}: {name} must hold the classes 0, 1, 2 only, found {bad.tolist()}")


def load_truth(path) -> np.ndarray:
    """A ground truth ``true<n>.mat``: ``truth`` (256, 256) uint8, 0 water, 1 resistive, 2
    conductive. Other values are refused."""
    path, data = _loadmat(path, "truth file")
    x = _class_map(data, "truth", path, "truth file")
    _check_classes(x, "truth", path, "truth file")
    return x.astype(np.uint8)


def load_reconstruction(path, *, any_shape: bool = False) -> np.ndarray:
    """A submission's ``<n>.mat``: ``reconstruction`` (256, 256) of the classes 0, 1, 2 (any
    numeric type), returned as float64. Other values (NaN, infinite, complex, a raw image)
    are refused as in a truth file. ``any_shape``: return an array of another shape too (the
    challenge scores it 0; :func:`score_parts` warns)."""
    path, data = _loadmat(path, "reconstruction file")
    if any_shape:
        x = _variable(data, "reconstruction", path, "reconstruction file")
    else:
        x = _class_map(data, "reconstruction", path, "reconstruction file")
    _check_classes(x, "reconstruction", path, "reconstruction file")
    return x


# a fixed description in the .mat header instead of scipy's creation time, so that the same
# classes always give the same bytes
MAT_HEADER = b"MATLAB 5.0 MAT-file, written by dgm-eit (no creation time, so the same image gives the same file)"


def write_reconstruction(path, classes) -> Path:
    """Write a submission ``<n>.mat`` (``reconstruction``, 256 x 256 uint8) atomically, with a
    fixed header: the bytes depend on the classes only."""
    import io

    import scipy.io

    from dgm_eit.files import write_bytes

    image = np.asarray(classes)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"a reconstruction must be {IMAGE_SIZE} x {IMAGE_SIZE}, got shape {image.shape}")
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"reconstruction": image.astype(np.uint8)})
    raw = buf.getvalue()
    # the first 116 bytes are the header's free text; the version and byte order follow
    write_bytes(path, MAT_HEADER.ljust(116, b" ") + raw[116:])
    return Path(path)


def is_reconstruction_file(path) -> bool:
    """A ``.mat`` file holding one variable, ``reconstruction``: what the entry point writes."""
    import scipy.io

    try:
        held = scipy.io.whosmat(str(path))
    except Exception:   # scipy raises many kinds for bytes that are not a .mat file: not ours
        return False
    return [name for name, _, _ in held] == ["reconstruction"]


# ---------------------------------------------------------------------------------
# a directory of targets

def numbered_files(directory, prefix: str, option: str) -> dict[int, Path]:
    """``{n: path}`` of the files ``<prefix><n>.mat`` in ``directory``, ``n`` in ASCII digits
    (``data01.mat`` is target 1, read as itself).

    Two files of one number (``data1.mat`` and ``data01.mat``) are refused, naming both: which
    one was meant cannot be guessed. A number in other digits (``data².mat``, ``data٣.mat``)
    is no target: it is ignored with one warning naming it, so it never blocks the valid
    files. Other files (``data_old.mat``, ``notes.mat``) are ignored silently."""
    import re

    directory = Path(directory)
    found: dict[int, Path] = {}
    for p in sorted(directory.iterdir()):
        if not (p.name.startswith(prefix) and p.suffix == ".mat" and p.is_file()):
            continue
        middle = p.name[len(prefix):-len(".mat")]
        if re.fullmatch(r"[0-9]+", middle):
            n = int(middle)
            if n in found:
                raise InputError(f"{option} {directory} holds {found[n].name} and {p.name}, both target {n}; "
                                 "remove or rename one")
            found[n] = p
        elif middle and all(c.isnumeric() for c in middle):
            warnings.warn(f"{p} ignored: not {prefix}<n>.mat with n in the digits 0-9", stacklevel=2)
    return dict(sorted(found.items()))


def check_frame(frame: Measurement, ref: Measurement) -> list[str]:
    """Refuse a measurement frame that cannot be a frame of the tank ``ref.mat`` describes;
    return a warning for one whose size is far from the reference's.

    The objects of a target change the voltages by some percent (the public targets: 7-13 %
    of ``Uelref``, in norm 0.93-1.01 x), so: all zeros, a sign flip, and other injection or
    measurement patterns are refused; a norm outside [1/2, 2] x the reference's, or a
    difference larger than the reference itself, is warned about, naming the factor (the
    voltage check of ``dgm-eit reconstruct``, with ``ref.mat`` as the yardstick)."""
    path = frame.path
    if not np.array_equal(frame.pattern, ref.pattern):
        raise InputError(f"{path}: Mpat differs from ref.mat's ({ref.path}); the frames must use the same "
                         "measurement patterns")
    both = np.isfinite(frame.injections) & np.isfinite(ref.injections)
    scale = np.abs(ref.injections[np.isfinite(ref.injections)]).max(initial=0.0)
    if not np.allclose(frame.injections[both], ref.injections[both], rtol=1e-6, atol=1e-9 * scale):
        raise InputError(f"{path}: Inj differs from ref.mat's Injref ({ref.path}); the frames must use the same "
                         "injections")
    present = frame.available & ref.available
    if not present.any():
        raise InputError(f"{path}: no voltage of Uel is present where ref.mat's Uelref is ({ref.path})")
    u, u_ref = frame.voltages[present], ref.voltages[present]
    norm, norm_ref = float(np.linalg.norm(u)), float(np.linalg.norm(u_ref))
    if norm <= 1e-12 * norm_ref:
        raise InputError(f"{path}: Uel is all zeros; nothing was measured")
    if float(u @ u_ref) < -0.5 * norm * norm_ref:
        raise InputError(f"{path}: Uel looks sign-flipped (its negative matches ref.mat's Uelref); check the "
                         "electrode order or polarity")
    factor = norm / norm_ref
    if not 0.5 <= factor <= 2.0:
        return [f"{path}: Uel is {factor:.3g} x the size of ref.mat's Uelref (a target changes it by some "
                "percent); the image will not be meaningful"]
    change = float(np.linalg.norm(u - u_ref)) / norm_ref
    if change > 1.0:
        return [f"{path}: Uel differs from ref.mat's Uelref by {change:.3g} x its size (a target changes it by "
                "some percent); the image will not be meaningful"]
    return []


def read_targets(directory, option: str = "INPUT_DIR") -> tuple[Measurement, dict[int, Measurement]]:
    """``ref.mat`` and the frames ``data<n>.mat`` of ``directory`` (:func:`numbered_files`),
    each checked against the reference (:func:`check_frame`; its warnings are issued)."""
    from dgm_eit.files import require_dir

    directory = require_dir(directory, option)
    ref = load_reference(directory / "ref.mat")
    if not np.any(ref.voltages[ref.available]):
        raise InputError(f"{ref.path}: Uelref is all zeros; nothing was measured")
    paths = numbered_files(directory, "data", option)
    if not paths:
        raise InputError(f"{option} {directory} holds no data<n>.mat files")
    frames = {n: load_measurement(p) for n, p in paths.items()}
    for frame in frames.values():
        for message in check_frame(frame, ref):
            warnings.warn(message, stacklevel=2)
    return ref, frames


# ---------------------------------------------------------------------------------
# levels

def removed_electrodes(level: int) -> np.ndarray:
    """0-based indices of the electrodes whose data level ``level`` drops: 0 .. 2(level-1)-1."""
    try:
        lv = int(level)
    except (TypeError, ValueError):
        raise InputError(f"level must be an integer 1..7, got {level!r}") from None
    if lv != level or lv not in LEVELS:
        raise InputError(f"level must be an integer 1..7, got {level!r}")
    return np.arange(2 * (lv - 1))


def level_mask(level: int, inj, mpat) -> np.ndarray:
    """(E*K,) bool, injection-major like ``Uel``: the measurements kept at ``level``.

    Level L drops electrodes 1..2(L-1) (1-based): every measurement pattern (column of
    ``mpat``) with a nonzero weight on one of them, and every injection (column of ``inj``)
    that drives one (a NaN current counts as driving). For KTC's matrices this is exactly
    the organisers' rule (their loop over injections skips the last one, which never drives
    a removed electrode, so the quirk changes nothing). ``inj`` (L, E), ``mpat`` (L, K) in
    the files' orientation."""
    removed = removed_electrodes(level)
    inj = np.asarray(inj, dtype=np.float64)
    mpat = np.asarray(mpat, dtype=np.float64)
    if inj.ndim != 2 or mpat.ndim != 2 or inj.shape[0] != mpat.shape[0]:
        raise InputError(f"level_mask takes inj (electrodes, injections) and mpat (electrodes, patterns) with "
                         f"the same number of rows, got {inj.shape} and {mpat.shape}")
    if removed.size and removed[-1] >= inj.shape[0]:
        raise InputError(f"level {level} drops electrodes 1..{removed.size} but there are {inj.shape[0]}")
    drops_inj = (inj[removed] != 0).any(axis=0)          # NaN != 0 is True
    drops_pat = (mpat[removed] != 0).any(axis=0)
    return (~drops_inj[:, None] & ~drops_pat[None, :]).reshape(-1)


# ---------------------------------------------------------------------------------
# the tank as a physics setup

def tank_mesh(h0: float = DEFAULT_H0):
    """The tank's CEM mesh: disk of radius 0.115 m, 32 electrodes of arc pi/32 rad, electrode
    1 (index 0) at 90 degrees, counter-clockwise. ``h0`` is the boundary edge length in
    metres (0.004 m: about 1100 nodes; the mesher needs h0 >= 0.005 * radius)."""
    from dgm_eit.physics.mesh import disk_mesh

    return disk_mesh(n_electrodes=N_ELECTRODES, h0=h0, electrode_model="cem", electrode_width=ELECTRODE_WIDTH,
                     radius=TANK_RADIUS, first_electrode_angle=FIRST_ELECTRODE_ANGLE)


def tank_protocol(inj, mpat):
    """The KTC protocol from the files' ``Inj`` (32, 76) and ``Mpat`` (32, 31): 2356 rows,
    the 31 patterns of injection 1, then of injection 2, ... (the order of ``Uel``). The
    currents are the measured ones in the file (they differ by a few percent between
    injections), not nominal values."""
    from dgm_eit.physics.protocol import same_pattern_protocol

    inj = np.asarray(inj, dtype=np.float64)
    if inj.ndim == 2 and not np.isfinite(inj).all():
        raise InputError("the injection matrix has NaN entries; build the protocol from ref.mat's Injref "
                         "(the organisers do the same) and drop the missing rows with a mask")
    return same_pattern_protocol(inj, mpat, columns=True, name="ktc2023")


def tank_setup(inj, mpat, *, h0: float = DEFAULT_H0, contact_impedance: float = 1e-6):
    """A :class:`ForwardModel` of the KTC tank (CEM) with the files' protocol.

    ``contact_impedance`` (Ohm m, 2-D) must be positive (the CEM solver divides by it); the
    organisers use 1e-6 and our fit to ``ref.mat`` also runs to its lower bound (see
    :func:`fit_reference`). Voltages are ``fm.forward(sigma)`` with ``sigma`` in S/m per
    element, directly comparable with ``Uel``."""
    from dgm_eit.physics.fem import ForwardModel

    return ForwardModel(tank_mesh(h0), tank_protocol(inj, mpat), electrode_model="cem",
                        contact_impedance=contact_impedance)


@dataclass(frozen=True)
class ReferenceFit:
    """Result of :func:`fit_reference`: background conductivity (S/m), contact impedance
    (Ohm m), relative residual ||U_model - U_ref|| / ||U_ref|| over the used measurements,
    whether the contact impedance sits at the search's lower bound, and the cost."""

    sigma: float
    contact_impedance: float
    residual: float
    at_lower_bound: bool
    n_evaluations: int
    seconds: float
    h0: float
    n_nodes: int
    n_elements: int
    n_used: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def fit_reference(ref: Measurement, *, h0: float = DEFAULT_H0, level: int = 1,
                  zs_bounds: tuple[float, float] = (1e-7, 1e-1), xatol: float = 0.02) -> ReferenceFit:
    """Fit a homogeneous conductivity ``sigma`` and one contact impedance ``z`` to the
    empty-tank frame by least squares, and report the relative residual.

    Why a 1-D search: the CEM voltages of a homogeneous disk scale as
    ``U(sigma, z) = U(1, sigma*z) / sigma`` (the stiffness scales with sigma, the contact term
    with 1/z). So for each product ``zs = sigma*z`` one solve at sigma = 1 gives the
    voltages' shape and the best ``sigma`` in closed form (a scalar least-squares fit); only
    ``zs`` needs a search (bounded, on log10 ``zs`` in ``zs_bounds``). ``z = zs / sigma``.
    On ``ref.mat`` the fit drives ``z`` to the lower bound (the data want no contact
    impedance; the organisers fix z = 1e-6): ``at_lower_bound`` says so, and the fitted
    ``z`` is then "as small as the bound allows", not a measurement of z.
    Only measurements present in the frame and kept at ``level`` are used.
    """
    from scipy.optimize import minimize_scalar

    from dgm_eit.physics.fem import ForwardModel

    lo, hi = (float(b) for b in zs_bounds)
    if not (0 < lo < hi):
        raise InputError(f"zs_bounds must satisfy 0 < low < high, got {zs_bounds}")
    t0 = time.perf_counter()
    mask = ref.mask(level)
    u_ref = ref.voltages[mask]
    if not u_ref.size or not np.any(u_ref):
        raise InputError(f"{ref.path or 'the reference'} has no usable nonzero voltages at level {level}")
    mesh = tank_mesh(h0)
    protocol = tank_protocol(ref.injections, ref.pattern)
    ones = np.ones(mesh.n_elements)
    evals = []

    def shape_and_scale(log_zs: float):
        fm = ForwardModel(mesh, protocol, electrode_model="cem", contact_impedance=10.0**log_zs)
        u1 = fm.forward(ones)[mask]               # voltages at sigma = 1, z = zs
        inv_sigma = float(u1 @ u_ref / (u1 @ u1))  # U_ref ~ u1 / sigma
        r = np.linalg.norm(u1 * inv_sigma - u_ref) / np.linalg.norm(u_ref)
        evals.append(r)
        return r, inv_sigma

    res = minimize_scalar(lambda t: shape_and_scale(t)[0], bounds=(np.log10(lo), np.log10(hi)),
                          method="bounded", options={"xatol": xatol})
    # the bounded search never evaluates the end points: compare with the lower bound, where
    # real tank data put the optimum
    best_t = float(res.x)
    r_lo, _ = shape_and_scale(np.log10(lo))
    if r_lo <= shape_and_scale(best_t)[0]:
        best_t = np.log10(lo)
    r, inv_sigma = shape_and_scale(best_t)
    if inv_sigma <= 0:
        raise InputError("the reference voltages have the opposite sign of the model's; are Inj/Mpat those "
                         "of this frame?")
    sigma = 1.0 / inv_sigma
    return ReferenceFit(sigma=sigma, contact_impedance=float(10.0**best_t / sigma), residual=float(r),
                        at_lower_bound=bool(best_t - np.log10(lo) <= 2 * xatol), n_evaluations=len(evals),
                        seconds=time.perf_counter() - t0, h0=float(h0), n_nodes=mesh.n_nodes,
                        n_elements=mesh.n_elements, n_used=int(mask.sum()))


# ---------------------------------------------------------------------------------
# the challenge's score

@functools.lru_cache(maxsize=4)
def _window(n: int, r: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, n) matrix W with W[i, k] = exp(-(i-k)^2 / (2 r^2)) for |i-k| <= ceil(2r), else 0.

    The organisers' 2-D kernel exp(-(x^2+y^2)/(2r^2)) on the square [-ceil(2r), ceil(2r)]^2
    is separable, so their zero-padded 'same' convolution of an image X is W @ X @ W.T
    exactly -- two small matrix products instead of a 321 x 321 convolution (which takes
    about a minute per map done directly). Kernel constants cancel in the normalisation
    by the window mass inside the image (``mass``)."""
    ws = int(np.ceil(2 * r))
    d = np.subtract.outer(np.arange(n), np.arange(n)).astype(np.float64)
    w = np.exp(-0.5 * (d / r) ** 2)
    w[np.abs(d) > ws] = 0.0
    w.setflags(write=False)
    mass = np.outer(w.sum(axis=1), w.sum(axis=1))
    mass.setflags(write=False)
    return w, mass


def ktc_ssim(a, b, r: float = SCORE_SIGMA_PX) -> float:
    """Mean SSIM of two images with the organisers' window (Gaussian, sigma ``r`` px,
    truncated at ceil(2r), zero padding normalised by the window mass inside the image) and
    constants c1 = 1e-4, c2 = 9e-4 (for maps in {0, 1}). Symmetric in ``a`` and ``b``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] != a.shape[1]:
        raise InputError(f"ktc_ssim needs two square images of one shape, got {a.shape} and {b.shape}")
    w, mass = _window(a.shape[0], float(r))

    def mean(x):
        return (w @ x @ w.T) / mass

    mu_a, mu_b = mean(a), mean(b)
    var_a = mean(a * a) - mu_a**2
    var_b = mean(b * b) - mu_b**2
    cov = mean(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SCORE_C1) * (2 * cov + SCORE_C2)
    den = (mu_a**2 + mu_b**2 + SCORE_C1) * (var_a + var_b + SCORE_C2)
    return float(np.mean(num / den))


def _class(x: np.ndarray, c: int) -> np.ndarray:
    return (np.abs(x - c) < 0.1).astype(np.float64)


def score_parts(pred, truth) -> tuple[float, float]:
    """(SSIM of the conductive maps (class 2), SSIM of the resistive maps (class 1)).

    A ``pred`` that is not 256 x 256 scores (0, 0) with a warning, as in the challenge (no
    points for a wrong shape); a ``truth`` that is not 256 x 256 is an error."""
    truth = np.asarray(truth, dtype=np.float64)
    if truth.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"the ground truth must be {IMAGE_SIZE} x {IMAGE_SIZE}, got shape {truth.shape}")
    try:
        pred = np.asarray(pred, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("the reconstruction must be a numeric array") from None
    if pred.shape != (IMAGE_SIZE, IMAGE_SIZE):
        warnings.warn(f"the reconstruction is {pred.shape}, not {IMAGE_SIZE} x {IMAGE_SIZE}: it scores 0, "
                      "as in the challenge", stacklevel=2)
        return 0.0, 0.0
    return ktc_ssim(_class(truth, 2), _class(pred, 2)), ktc_ssim(_class(truth, 1), _class(pred, 1))


def score(pred, truth) -> float:
    """The challenge's score of one target (at most 1): mean of :func:`score_parts`."""
    c, r = score_parts(pred, truth)
    return 0.5 * (c + r)
