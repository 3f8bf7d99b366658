"""What a run found: the result records and the reconstruction files they are scored from.

Data flows one way: ``experiments`` (the runner) fills these records, ``report`` renders
them; neither the records nor the file functions know who made them.

Reconstruction file (HDF5, docs/DESIGN.md): ``recon`` (N,H,W) float32, optional
``recon_std`` (N,H,W); attributes ``method``, ``seconds_per_image``, ``nfe``, ``split``,
``data`` and ``run`` (paths), ``seed``, the options that made it (``n_samples``, ``sampler``,
``weights``, ``batch_size``, ``threads``, ``device``, ``limit``) and the sampler settings
(``t0``, ``n_steps`` ...): :func:`dgm_eit.reconstruct.reconstruct_command` remakes it from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from dgm_eit.data.storage import read_split
from dgm_eit.errors import InputError
from dgm_eit.files import atomic_path
from dgm_eit.metrics import METRICS, Summary, per_sample, summarize
from dgm_eit.stats import LEVEL, Interval, ranks, relative_change, win_rate


@dataclass(frozen=True)
class DataSpec:
    """One simulated data set: its anomaly count and noise level."""

    anomalies: int
    snr_db: float

    @property
    def label(self) -> str:
        return f"{self.anomalies}a_{self.snr_db:g}dB"

    @property
    def title(self) -> str:
        return f"{self.anomalies} anomalies, {self.snr_db:g} dB"


@dataclass(frozen=True)
class Setting:
    """One results table: models trained on ``train``, tested on the test split of ``data``."""

    test: str
    train: DataSpec
    data: DataSpec
    paper_table: int

    @property
    def key(self) -> str:
        return f"{self.test}_{self.train.label}_on_{self.data.label}"

    @property
    def title(self) -> str:
        if self.train == self.data:
            return f"{self.test}: {self.data.title}"
        return f"{self.test}: trained on {self.train.title}, tested on {self.data.title}"


def pool_seeds(per_seed: list[dict[str, Summary]]) -> dict[str, Summary]:
    """Per figure of the seeds' summaries: the mean over seeds of their means, the std over seeds
    of those means (ddof = 1; NaN with one seed) and ``n`` = the number of seeds."""
    out = {}
    for name in per_seed[0]:
        means = np.array([summaries[name].mean for summaries in per_seed])
        with np.errstate(invalid="ignore"):   # PSNR = inf for an exact image
            std = float(np.std(means, ddof=1)) if len(means) > 1 else math.nan
        out[name] = Summary(float(np.mean(means)), std, len(means))
    return out


@dataclass
class MethodResult:
    """One method's scores on one table's test set.

    ``per_seed`` holds the per-image metrics of each training seed of the method's model, in
    seed order; GN (no training) and a seed ensemble (all seeds pooled into one model) have
    one entry and ``seeded`` False. ``calibration`` holds, in the same order, the calibration
    of each seed's std maps (:func:`dgm_eit.metrics.evaluate_calibration`); it is empty for a
    method without std maps."""

    method: str                      # the method's registry key
    name: str                        # as tables show it
    train_set: DataSpec | None
    per_seed: list[dict[str, np.ndarray]]
    seeded: bool = False
    sampling: list[dict] = field(default_factory=list)   # per seed: sampler settings chosen on validation
    # per seed: the dgm-eit reconstruct command that remakes its reconstruction file, run in
    # the output directory (none for GN and the ensembles)
    commands: list[str] = field(default_factory=list)
    pooled_from: list[str] = field(default_factory=list)  # an ensemble: the seed files it pools, as commands name them
    calibration: list[dict[str, Summary]] = field(default_factory=list)
    posterior_samples: int | None = None   # samples behind each image's mean and std map
    # the paper's row (dgm_eit.paper.PAPER_RESULTS) that ran the same algorithm; None: no row of
    # the paper is comparable with this one (another input, sampler or an ensemble)
    paper_row: str | None = None

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    def errors(self, metric: str = "MSE") -> np.ndarray:
        """(seeds, images) per-image values of ``metric``."""
        return np.stack([values[metric] for values in self.per_seed])

    def per_seed_summaries(self) -> list[dict[str, Summary]]:
        """Per seed: mean and std over the test images of every metric, then the calibration
        figures of the seed's std maps, if any."""
        calibration = self.calibration or [{}] * self.n_seeds
        return [{**summarize(values), **figures} for values, figures in zip(self.per_seed, calibration)]

    def pooled(self) -> dict[str, Summary]:
        """Per metric and calibration figure: the mean over seeds of the per-seed values, the std
        over seeds (ddof = 1; NaN with one seed) and ``n`` = the number of seeds."""
        return pool_seeds(self.per_seed_summaries())


@dataclass(frozen=True)
class Comparison:
    """A method against GN on one test set: its relative MSE change with a paired bootstrap
    interval (:func:`dgm_eit.stats.relative_change`), its per-image win rate, and its rank
    among the table's methods (overlapping intervals tied)."""

    interval: Interval
    win_rate: float | None           # None for GN itself
    rank: int
    tied_with: tuple[str, ...]       # names of the methods whose intervals overlap this one's


@dataclass
class SettingResult:
    setting: Setting
    methods: list[MethodResult] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)   # method key -> why
    figure: Path | None = None
    gn_settings: dict = field(default_factory=dict)   # how the test set's GN images were made
    comparisons: dict[str, Comparison] = field(default_factory=dict)   # method key -> against GN

    def get(self, method: str) -> MethodResult | None:
        return next((m for m in self.methods if m.method == method), None)

    def compare_with(self, reference: str, *, resamples: int, seed: int) -> None:
        """Fill :attr:`comparisons` against the method ``reference`` (GN), every method with the
        same bootstrap draws of the test images (``seed``), so their intervals are comparable."""
        ref = self.get(reference)
        if ref is None or ref.seeded:
            return
        base = ref.errors("MSE")[0]
        intervals = {mr.method: relative_change(mr.errors("MSE"), base, resamples=resamples, seed=seed)
                     for mr in self.methods}
        names = {mr.method: mr.name for mr in self.methods}
        for key, (rank, tied) in ranks(intervals).items():
            rate = None if key == reference else win_rate(self.get(key).errors("MSE"), base)
            self.comparisons[key] = Comparison(intervals[key], rate, rank, tuple(names[t] for t in tied))


@dataclass
class EfficiencyRow:
    method: str
    name: str
    model: str | None                # the trained model behind the method
    train_set: DataSpec | None
    parameters: int | None
    train_seconds: float | None
    train_steps: int | None
    seconds_per_image: float | None
    nfe: float | None
    device: str
    models: int = 1                  # trained models behind one reconstruction (an ensemble's K seeds)


@dataclass
class RunResult:
    cfg: dict
    seed: int
    out: Path
    settings: list[SettingResult]
    efficiency: list[EfficiencyRow]
    stages: dict[str, dict]
    wall_seconds: float
    training_seeds: dict[str, list[int]] = field(default_factory=dict)   # training run -> seed per replica
    # training run -> per replica, its best-of selection (dgm_eit.best_of.read_selection; None: trained once)
    selections: dict[str, list[dict | None]] = field(default_factory=dict)

    @property
    def failures(self) -> dict[str, dict]:
        return {k: v for k, v in self.stages.items() if v.get("status") != "done"}

    def _rows(self):
        for sr in self.settings:
            for mr in sr.methods:
                yield sr, mr, {"test": sr.setting.test, "train_set": mr.train_set.label if mr.train_set else "none",
                               "test_set": sr.setting.data.label, "method": mr.name}

    def records(self) -> list[dict]:
        """Rows of ``metrics.csv``, one per metric and, for a method with std maps, one per
        calibration figure: per seed (mean and std over the test images; ``seed`` = the seed's
        index, ``-`` for GN and ensembles) and, for trained methods, the pooled row (``seed`` =
        ``all``: mean over seeds, std over seeds, ``n`` = seeds)."""
        rows = []
        for _, mr, key in self._rows():
            blocks = [(k if mr.seeded else "-", s) for k, s in enumerate(mr.per_seed_summaries())]
            if mr.seeded:
                blocks.append(("all", mr.pooled()))
            for seed, summaries in blocks:
                for metric, s in summaries.items():
                    rows.append({**key, "seed": seed, "metric": metric, "mean": repr(s.mean), "std": repr(s.std),
                                 "n": s.n})
        return rows

    def per_sample_records(self) -> list[dict]:
        """Rows of ``metrics_per_sample.csv``: one per test image, seed and method."""
        rows = []
        for _, mr, key in self._rows():
            for k, values in enumerate(mr.per_seed):
                for i in range(len(values["MSE"])):
                    row = {**key, "seed": k if mr.seeded else "-", "index": i}
                    row.update({m: repr(float(values[m][i])) for m in METRICS})
                    rows.append(row)
        return rows

    def interval_records(self) -> list[dict]:
        """Rows of ``intervals.csv``: every method's MSE change against GN per table."""
        run = self.cfg["run"]
        rows = []
        for sr, mr, key in self._rows():
            c = sr.comparisons.get(mr.method)
            if c is None:
                continue
            rows.append({**key, "mse_vs_gn_percent": repr(c.interval.change), "ci_low": repr(c.interval.low),
                         "ci_high": repr(c.interval.high),
                         "verdict": "reference" if c.win_rate is None else c.interval.verdict,
                         "win_rate": "" if c.win_rate is None else repr(c.win_rate), "rank": c.rank,
                         "tied_with": "; ".join(c.tied_with), "images": mr.per_seed[0]["MSE"].shape[0],
                         "seeds": mr.n_seeds, "resamples": int(run["bootstrap_resamples"]),
                         "bootstrap_seed": self.seed, "level": LEVEL})
        return rows


# ---------------------------------------------------------------------------------------
# reconstruction files


def write_recon_file(path, result: dict, attrs: dict) -> Path:
    """Write ``result`` (``recon``, optional ``recon_std``, ``seconds_per_image``, ``nfe``) and
    ``attrs`` to ``PATH.tmp``, then rename it into place."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("recon", data=result["recon"])
        if "recon_std" in result:
            f.create_dataset("recon_std", data=result["recon_std"])
        f.attrs["seconds_per_image"] = float(result["seconds_per_image"])
        f.attrs["nfe"] = int(result["nfe"])
        for key, value in attrs.items():
            f.attrs[key] = value
    return path


def _unreadable(path, err: Exception) -> InputError:
    # h5py's message for a truncated file does not name it
    return InputError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {err}")


def read_recon(path) -> tuple[np.ndarray, np.ndarray | None]:
    """``(recon, recon_std or None)`` of a reconstruction file."""
    try:
        with h5py.File(path, "r") as f:
            if "recon" not in f:
                raise InputError(f"{path}: no 'recon' array")
            recon = f["recon"][...]
            std = f["recon_std"][...] if "recon_std" in f else None
    except OSError as err:
        raise _unreadable(path, err) from None
    return recon, std


def recon_attrs(path) -> dict:
    """The attributes of a reconstruction file (``nfe``, ``seconds_per_image``, sampler settings ...)."""
    try:
        with h5py.File(path, "r") as f:
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except OSError as err:
        raise _unreadable(path, err) from None


def recon_file_problem(path) -> str | None:
    """None when ``path`` is a readable reconstruction file (a ``recon`` array (N,H,W) whose
    data can be read), else what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        return "it does not exist" if not path.exists() else "it is not a file"
    try:
        with h5py.File(path, "r") as f:
            if "recon" not in f or not isinstance(f["recon"], h5py.Dataset):
                return "it has no 'recon' array"
            recon = f["recon"]
            if recon.ndim != 3:
                return f"its 'recon' array has shape {recon.shape}, expected (N, H, W)"
            if recon.shape[0]:
                recon[-1]   # the last image: a truncated file fails here
            for key in ("recon_std",):
                if key in f and f[key].shape[0]:
                    f[key][-1]
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        return f"it is not a readable HDF5 file (truncated or corrupt?): {err}"
    return None


def is_recon_file(path) -> bool:
    """A reconstruction file (has a ``recon`` array and is no data set), as ``reconstruct --data`` writes."""
    try:
        with h5py.File(path, "r") as f:
            return "recon" in f and "format_version" not in f.attrs
    except (OSError, ValueError):
        return False


def load_prediction(path) -> np.ndarray:
    """Reconstructions from a ``.npy`` file or a reconstruction file's ``recon`` array."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"prediction file {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise InputError(f"prediction file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        try:
            pred = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:   # an empty file: EOFError
            raise InputError(f"{path}: not a plain .npy array ({err or 'empty file'})") from None
        if not isinstance(pred, np.ndarray):
            raise InputError(f"{path} is an .npz archive; give one .npy array (N,H,W)")
        return pred
    if not h5py.is_hdf5(path):
        raise InputError(f"{path}: expected a .npy file or an HDF5 file with a 'recon' array")
    try:
        with h5py.File(path, "r") as f:
            if "recon" not in f:
                raise InputError(f"{path}: no 'recon' array (found: {', '.join(sorted(f)) or 'nothing'})")
            return f["recon"][...]
    except OSError as err:
        raise _unreadable(path, err) from None


def evaluate_file(pred_path, data_path, split: str = "test") -> tuple[dict[str, Summary], dict[str, np.ndarray]]:
    """Score a prediction file against a data-set split: ``(summaries, per-sample arrays)``."""
    pred = load_prediction(pred_path)
    truth = read_split(data_path, split, keys=("sigma",))["sigma"]
    if truth.shape[0] == 0:
        raise InputError(f"the {split!r} split of {data_path} is empty: nothing to score")
    if pred.ndim == 4 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if pred.ndim != 3:
        raise InputError(f"{pred_path}: predictions must have shape (N,H,W), got {pred.shape}")
    if pred.shape[0] != truth.shape[0]:
        raise InputError(f"{pred_path} holds {pred.shape[0]} images but the {split!r} split of {data_path} "
                         f"holds {truth.shape[0]}")
    if pred.shape[1:] != truth.shape[1:]:
        raise InputError(f"{pred_path} has {pred.shape[1]}x{pred.shape[2]} images but {data_path} has "
                         f"{truth.shape[1]}x{truth.shape[2]}")
    if pred.dtype.kind not in "fiu":
        raise InputError(f"{pred_path} holds {pred.dtype} values, expected real numbers")
    finite = np.isfinite(pred).all(axis=(1, 2))
    if not finite.all():
        raise InputError(f"{pred_path} contains NaN or infinite values (first in sample "
                         f"{int(np.flatnonzero(~finite)[0])}); fix the reconstructions before scoring them")
    values = per_sample(pred, truth)
    return summarize(values), values
