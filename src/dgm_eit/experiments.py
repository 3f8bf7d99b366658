"""The paper's Tests 1-3 as one resumable pipeline (``dgm-eit run``).

Stages, in order, each reused when its output exists:

1. data sets ``DIR/data/<label>.h5``: 2 and 4 anomalies at the high and the low SNR
   (paper: 40 dB and 25 dB). Both noise levels of one anomaly count use the same data
   seed, so they hold the same phantoms with different noise: Test 2 then differs from
   Test 1 in the noise only. Done when the file exists and is marked complete.
2. training runs ``DIR/runs/<model>_<label>/`` (done when the trainer wrote ``done``):
   CVAE and CNF on every training set a test needs (they are conditional: one per data
   set, as the paper did); the score prior only on the high-SNR sets, because it sees
   images only, so one prior serves both noise levels.
3. reconstructions ``DIR/recon/<method>_<train label>_on_<test label>.h5`` of every
   test split (done when the file exists; the reconstructor writes it atomically). GN
   needs no stage: its image is the data set's ``gn`` array.
4. metrics, ``metrics.csv``, figures and ``report.md``: recomputed on every run (cheap).

Tests (REFERENCE.md section 4): T1 = high SNR, 2 and 4 anomalies (paper Tables 1, 2);
T2 = low SNR, 2 and 4 anomalies (Tables 3, 4), CSD* with the prior of the high-SNR set;
T3 = models trained on 4 anomalies / high SNR, tested on 2 anomalies at both SNRs
(Tables 5, 6).

A stage that fails is recorded in ``DIR/stages.json`` and in the report, and the stages
that do not depend on it still run; the command then exits non-zero. Re-running the
same command retries it and reuses everything else.
"""

from __future__ import annotations

import copy
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dgm_eit.config import flatten
from dgm_eit.errors import InputError
from dgm_eit.files import read_json, write_text
from dgm_eit.runtime import check_seed
from dgm_eit.metrics import METRICS, Summary, per_sample, summarize

METHODS = ("gn", "cvae", "cnf", "csd", "guided")
METHOD_NAMES = {"gn": "GN", "cvae": "CVAE", "cnf": "CNF", "csd": "CSD*", "guided": "CSD-guided"}
# the trained model each method needs
METHOD_MODEL = {"cvae": "cvae", "cnf": "cnf", "csd": "score", "guided": "score"}
TESTS = ("T1", "T2", "T3")


@dataclass(frozen=True)
class DataSpec:
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


def settings_for(cfg: dict) -> list[Setting]:
    """The tables selected by ``[run] tests``, in the paper's order."""
    run = cfg["run"]
    unknown = [t for t in run["tests"] if t not in TESTS]
    if unknown:
        raise InputError(f"run.tests: unknown test(s) {unknown}; choose from {', '.join(TESTS)}")
    hi, lo = float(run["high_snr_db"]), float(run["low_snr_db"])
    two_hi, four_hi, two_lo, four_lo = DataSpec(2, hi), DataSpec(4, hi), DataSpec(2, lo), DataSpec(4, lo)
    catalogue = {
        "T1": [Setting("T1", two_hi, two_hi, 1), Setting("T1", four_hi, four_hi, 2)],
        "T2": [Setting("T2", two_lo, two_lo, 3), Setting("T2", four_lo, four_lo, 4)],
        "T3": [Setting("T3", four_hi, two_hi, 5), Setting("T3", four_hi, two_lo, 6)],
    }
    return [s for t in TESTS if t in run["tests"] for s in catalogue[t]]


def methods_for(cfg: dict) -> list[str]:
    unknown = [m for m in cfg["run"]["methods"] if m not in METHODS]
    if unknown:
        raise InputError(f"run.methods: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return [m for m in METHODS if m in cfg["run"]["methods"]]


def check_tuning(run: dict) -> None:
    t0s, steps, n = run["csd_tune_t0"], run["csd_tune_steps"], run["csd_tune_images"]
    if not all(isinstance(t, (int, float)) and 0 < t <= 1 for t in t0s):
        raise InputError(f"run.csd_tune_t0 must list insertion times in (0, 1], got {t0s}")
    if t0s and not (steps and all(isinstance(k, int) and k >= 1 for k in steps)):
        raise InputError(f"run.csd_tune_steps must list step counts >= 1, got {steps}")
    if not (isinstance(n, int) and n >= 1):
        raise InputError(f"run.csd_tune_images must be an integer >= 1, got {n}")


def tuning_spec(setting: Setting) -> DataSpec:
    """Where CSD*'s t0 is chosen for a table: the anomaly count the models were trained on, at the
    test data's noise level (known at test time, as GN's regularisation uses it too). Tests 1-2:
    the test set's own training data; Test 3: the 4-anomaly set, never the 2-anomaly distribution."""
    return DataSpec(setting.train.anomalies, setting.data.snr_db)


def model_train_set(method: str, setting: Setting, cfg: dict) -> DataSpec | None:
    """The data set whose training split the method's model learns from (None for GN)."""
    if method == "gn":
        return None
    if METHOD_MODEL[method] == "score":
        return DataSpec(setting.train.anomalies, float(cfg["run"]["high_snr_db"]))
    return setting.train


def data_seed(seed: int, anomalies: int) -> int:
    """One seed per anomaly count, shared by both noise levels: same phantoms, different noise."""
    return 1000 * seed + anomalies


def dataset_config(cfg: dict, spec: DataSpec) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["data"]["anomalies"] = spec.anomalies
    cfg["data"]["snr_db"] = float(spec.snr_db)
    return cfg


def check_run_manifest(root: Path, path: Path, seed: int, cfg: dict, ignore: tuple[str, ...]) -> None:
    """Refuse to mix stages made with a different config or seed into one output directory
    (keys starting with one of ``ignore`` may change); a new directory gets the manifest."""
    if path.exists():
        old = read_json(path, "use a new --out (or restore the file)")
        if old.get("seed") != seed:
            raise InputError(f"{root} was made with --seed {old.get('seed')}, not {seed}; "
                             "use another --out or the same seed")
        before, now = flatten(old.get("config", {})), flatten(cfg)
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and not k.startswith(ignore))
        if changed:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
            raise InputError(f"{root} was made with a different config ({shown}"
                             f"{', ...' if len(changed) > 5 else ''}); use another --out")
    else:
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            # e.g. a training run: its metrics.csv would be overwritten by the report's
            raise InputError(f"{root} exists and is not a dgm-eit run output directory (no {path.name}); "
                             "use a new --out")
        root.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"seed": seed, "config": cfg}, indent=2, sort_keys=True))


class Layout:
    """Where each stage writes under the output directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def data(self, spec: DataSpec) -> Path:
        return self.root / "data" / f"{spec.label}.h5"

    def run(self, model: str, spec: DataSpec) -> Path:
        return self.root / "runs" / f"{model}_{spec.label}"

    def recon(self, method: str, train: DataSpec, data: DataSpec) -> Path:
        return self.root / "recon" / f"{method}_{train.label}_on_{data.label}.h5"

    def figure(self, setting: Setting) -> Path:
        return self.root / "figures" / f"{setting.key}.png"

    @property
    def stages(self) -> Path:
        return self.root / "stages.json"

    @property
    def manifest(self) -> Path:
        return self.root / "run.json"


# ---------------------------------------------------------------------------------------
# calls into the other packages (data, trainer, reconstructor)


def simulate_stage(cfg: dict, out: Path, seed: int) -> None:
    """Physics runs on the CPU whatever ``--device`` says; the simulator uses every core."""
    from dgm_eit.data.simulate import simulate_dataset

    # overwrite: the files under DIR/data are the run's own, and one that cannot be read is
    # made again (a resumable .partial of the same config is still resumed)
    simulate_dataset(cfg, out, seed=seed, progress=bool(cfg["train"]["progress"]), overwrite=True)


def dataset_done(path: Path, log: Callable[[str], None]) -> bool:
    """A run's data set exists and opens (the run's manifest vouches for its config)."""
    from dgm_eit.data.storage import open_dataset

    if not path.exists():
        return False
    try:
        open_dataset(path).close()
    except InputError as err:
        log(f"[redo]  {err}")   # the stage makes it again
        return False
    return True


def train_stage(model: str, data: Path, run_dir: Path, cfg: dict, seed: int, device: str,
                progress: bool | None = None) -> None:
    from dgm_eit.train import train

    max_minutes = float(cfg["run"]["train_max_minutes"]) or None
    result = train(model, data, run_dir, cfg, seed=seed, device=device, max_minutes=max_minutes, progress=progress)
    if not result.completed:
        raise InputError(f"training paused at step {result.step} ({result.stopped_by}, run.train_max_minutes = "
                         f"{max_minutes}); re-run the same command to continue it")


def reconstruct_stage(run_dir: Path, data: Path, out: Path, *, n_samples: int, sampler: str | None,
                      seed: int, device: str, cfg: dict, progress: bool | None = None,
                      tune_data: Path | None = None) -> None:
    """Reconstruct the test split of ``data``; with ``tune_data``, first choose CSD*'s t0 and
    step count on its validation split (``[run] csd_tune_*``)."""
    from dgm_eit.reconstruct import reconstruct_split

    # the score model's samplers read [csd] and, for guided sampling, [mesh] from the config
    opts = {"config": cfg} if sampler is not None else {}
    if tune_data is not None:
        from dgm_eit.tuning import tune_on_validation

        run = cfg["run"]
        best, _ = tune_on_validation(run_dir, tune_data, cfg, t0s=run["csd_tune_t0"], steps=run["csd_tune_steps"],
                                     n_images=int(run["csd_tune_images"]), seed=seed, device=device,
                                     sampler=sampler)
        opts.update(best)
    progress = bool(cfg["train"]["progress"]) if progress is None else progress
    reconstruct_split(run_dir, data, "test", out, n_samples=n_samples, sampler=sampler, seed=seed, device=device,
                      progress=progress, **opts)


def _worker_init(threads: int) -> None:
    from dgm_eit.runtime import limit_threads

    limit_threads(threads)


def _timed_call(fn: Callable, kwargs: dict) -> float:
    start = time.perf_counter()
    fn(**kwargs)
    return time.perf_counter() - start


@dataclass
class StageJob:
    """One stage: ``fn(**kwargs)`` (module level, so a worker process can run it) makes the
    output that ``done()`` checks for."""

    name: str
    done: Callable[[], bool]
    fn: Callable
    kwargs: dict


def gn_seconds_per_image(data: Path, cfg: dict, n: int) -> float:
    """Wall time of one Gauss-Newton image (solve + rasterisation), timed on ``n`` test voltages.

    The data set's GN images were made in bulk by worker processes, so they carry no
    per-image time of their own; this times the same solver with the same settings here.
    """
    from dgm_eit.data.storage import dataset_gn_settings, read_split
    from dgm_eit.recon.tuning import apply_gn_settings
    from dgm_eit.reconstruct import gn_images

    cfg = apply_gn_settings(cfg, dataset_gn_settings(data))
    v = read_split(data, "test", keys=("v",), indices=slice(0, max(1, n)))["v"]
    size = int(cfg["data"]["image_size"])
    gn_images(cfg, v[:1], size)  # the first call builds the mesh and the FEM's sparsity pattern
    start = time.perf_counter()
    gn_images(cfg, v, size)
    return (time.perf_counter() - start) / len(v)


# ---------------------------------------------------------------------------------------
# results


@dataclass
class MethodResult:
    method: str                      # key of METHODS
    train_set: DataSpec | None
    summaries: dict[str, Summary]
    per_sample: dict[str, np.ndarray]
    sampling: dict = field(default_factory=dict)   # CSD* settings chosen on validation (t0, n_steps)

    @property
    def name(self) -> str:
        return METHOD_NAMES[self.method]


@dataclass
class SettingResult:
    setting: Setting
    methods: list[MethodResult] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)   # method key -> why
    figure: Path | None = None
    gn_settings: dict = field(default_factory=dict)   # how the test set's GN images were made

    def get(self, method: str) -> MethodResult | None:
        return next((m for m in self.methods if m.method == method), None)


@dataclass
class EfficiencyRow:
    method: str
    train_set: DataSpec | None
    parameters: int | None
    train_seconds: float | None
    train_steps: int | None
    seconds_per_image: float | None
    nfe: float | None
    device: str


@dataclass
class RunResult:
    cfg: dict
    seed: int
    out: Path
    settings: list[SettingResult]
    efficiency: list[EfficiencyRow]
    stages: dict[str, dict]
    wall_seconds: float

    @property
    def failures(self) -> dict[str, dict]:
        return {k: v for k, v in self.stages.items() if v.get("status") != "done"}

    def records(self) -> list[dict]:
        """Rows of ``metrics.csv``."""
        rows = []
        for sr in self.settings:
            for mr in sr.methods:
                for metric in METRICS:
                    s = mr.summaries[metric]
                    rows.append({"test": sr.setting.test, "train_set": mr.train_set.label if mr.train_set else "none",
                                 "test_set": sr.setting.data.label, "method": mr.name, "metric": metric,
                                 "mean": repr(s.mean), "std": repr(s.std), "n": s.n})
        return rows

    def per_sample_records(self) -> list[dict]:
        """Rows of ``metrics_per_sample.csv``: one per test image and method."""
        rows = []
        for sr in self.settings:
            for mr in sr.methods:
                for i in range(len(mr.per_sample["MSE"])):
                    row = {"test": sr.setting.test, "train_set": mr.train_set.label if mr.train_set else "none",
                           "test_set": sr.setting.data.label, "method": mr.name, "index": i}
                    row.update({m: repr(float(mr.per_sample[m][i])) for m in METRICS})
                    rows.append(row)
        return rows


# ---------------------------------------------------------------------------------------
# the pipeline


class Experiment:
    """Plan and run every stage for one output directory."""

    def __init__(self, cfg: dict, out: str | Path, *, seed: int = 0, device: str = "cpu",
                 log: Callable[[str], None] = print):
        self.cfg = cfg
        # refused here, not as 38 failed stages
        self.seed = check_seed(seed)
        self.device = str(device)
        self.layout = Layout(out)
        self.log = log
        self.settings = settings_for(cfg)
        self.methods = methods_for(cfg)
        check_tuning(cfg["run"])
        from dgm_eit.runtime import cpu_count

        jobs = cfg["run"]["jobs"]
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 0:
            raise InputError(f"run.jobs must be an integer >= 0 (0: one per core), got {jobs!r}")
        self.jobs = jobs or cpu_count()
        self.stage_records: dict[str, dict] = {}
        self._check_data_configs()

    def _check_data_configs(self) -> None:
        """Every data set's config is checked before anything is created: a bad value is one
        error, not failed stages whose unfinished files block the corrected command."""
        import warnings

        from dgm_eit.data.simulate import check_config

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the simulator warns once per data set itself
            for spec in self.datasets():
                check_config(dataset_config(self.cfg, spec), data_seed(self.seed, spec.anomalies))

    # -- bookkeeping ---------------------------------------------------------------------

    def _check_manifest(self) -> None:
        # which tests and methods to run may change between calls; what they compute may not
        check_run_manifest(self.layout.root, self.layout.manifest, self.seed, self.cfg,
                           ignore=("run.tests", "run.methods", "run.figure_samples", "run.jobs",
                                   "run.train_max_minutes", "run.expected_time", "train.progress", "train.threads"))

    def _load_stage_records(self) -> None:
        path = self.layout.stages
        try:
            self.stage_records = read_json(path) if path.exists() else {}
        except InputError as err:
            # only records: the stages' outputs say what is done, so start the records afresh
            self.log(f"[warn]  {err}; its records are started again")
            self.stage_records = {}

    def _save_stage_records(self) -> None:
        write_text(self.layout.stages, json.dumps(self.stage_records, indent=2))

    def _reused(self, name: str) -> None:
        if self.stage_records.get(name, {}).get("status") != "done":
            # made by a call whose record was lost, or by hand: no time to report
            self.stage_records[name] = {"status": "done", "reused": True}
        self.log(f"[reuse] {name}")

    def _failed(self, name: str, err: BaseException) -> None:
        missing = isinstance(err, ModuleNotFoundError) and (err.name or "").startswith("dgm_eit")
        status = "missing" if missing else "failed"
        message = f"{type(err).__name__}: {err}"
        cause = err.__cause__  # a worker's traceback arrives as the cause
        detail = str(cause) if cause is not None else "".join(traceback.format_exception(err, limit=6))
        self.stage_records[name] = {"status": status, "message": message, "traceback": detail[-4000:]}
        self._save_stage_records()
        self.log(f"[{status}] {name}: {message}")

    def _finished(self, job: StageJob, seconds: float) -> bool:
        if not job.done():
            self.stage_records[job.name] = {"status": "failed", "message": "the stage finished without its output"}
            self._save_stage_records()
            self.log(f"[failed] {job.name}: finished without its output")
            return False
        self.stage_records[job.name] = {"status": "done", "seconds": seconds, "device": self.device}
        self._save_stage_records()
        self.log(f"[done]  {job.name} ({seconds:.1f} s)")
        return True

    def _stage(self, job: StageJob) -> bool:
        """Run one stage here unless it is done; record time, device or failure. True when done."""
        if job.done():
            self._reused(job.name)
            return True
        self.log(f"[run]   {job.name}")
        try:
            seconds = _timed_call(job.fn, job.kwargs)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # a failed stage must not lose the others' results
            if os.environ.get("DGM_EIT_DEBUG"):
                raise
            self._failed(job.name, err)
            return False
        return self._finished(job, seconds)

    def _run_phase(self, jobs: list[StageJob]) -> dict[str, bool]:
        """Run independent stages, ``run.jobs`` at a time in worker processes when > 1.

        Small networks use two threads poorly, so two one-thread jobs on two cores finish
        sooner than the same jobs one after the other with two threads each.
        """
        ok, pending = {}, []
        for job in jobs:
            if job.done():
                self._reused(job.name)
                ok[job.name] = True
            else:
                pending.append(job)
        if self.jobs <= 1 or not pending:
            for job in pending:
                ok[job.name] = self._stage(job)
            return ok
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from dgm_eit.runtime import cpu_count

        # a lone job (a re-run that redoes one stage) still gets the same thread count as in a
        # full run, so it computes the same numbers
        threads = max(1, cpu_count() // self.jobs)
        with ProcessPoolExecutor(max_workers=min(self.jobs, len(pending)),
                                 mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {}
            for job in pending:
                # progress bars of parallel jobs would garble each other; the log says what finished
                kwargs = dict(job.kwargs, progress=False)
                if "cfg" in kwargs:
                    kwargs["cfg"] = copy.deepcopy(kwargs["cfg"])
                    kwargs["cfg"]["train"]["threads"] = threads
                futures[pool.submit(_timed_call, job.fn, kwargs)] = job
                self.log(f"[queue] {job.name}")
            try:
                for future in as_completed(futures):
                    job = futures[future]
                    try:
                        seconds = future.result()
                    except Exception as err:
                        if os.environ.get("DGM_EIT_DEBUG"):
                            raise
                        self._failed(job.name, err)
                        ok[job.name] = False
                        continue
                    ok[job.name] = self._finished(job, seconds)
            except KeyboardInterrupt:
                # never drain the pool (whole training runs): the workers get Ctrl-C, save
                # their checkpoints, and are ended after a short grace
                from dgm_eit.runtime import stop_pool

                stop_pool(pool, grace=3.0, interrupt=True)
                raise
        return ok

    # -- plan ------------------------------------------------------------------------------

    def datasets(self) -> list[DataSpec]:
        specs = []
        for s in self.settings:
            specs.append(s.data)
            for method in self.methods:
                train = model_train_set(method, s, self.cfg)
                if train is not None:
                    specs.append(train)
            if "csd" in self.methods and self.cfg["run"]["csd_tune_t0"]:
                specs.append(tuning_spec(s))
        return sorted(set(specs), key=lambda d: (d.anomalies, -d.snr_db))

    def training_runs(self) -> list[tuple[str, DataSpec]]:
        runs = []
        for s in self.settings:
            for method in self.methods:
                if method != "gn":
                    runs.append((METHOD_MODEL[method], model_train_set(method, s, self.cfg)))
        order = {"cvae": 0, "cnf": 1, "score": 2}
        return sorted(set(runs), key=lambda r: (order[r[0]], r[1].anomalies, -r[1].snr_db))

    def reconstructions(self) -> list[tuple[str, DataSpec, DataSpec]]:
        jobs = []
        for s in self.settings:
            for method in self.methods:
                if method != "gn":
                    jobs.append((method, model_train_set(method, s, self.cfg), s.data))
        return list(dict.fromkeys(jobs))

    # -- stage actions ---------------------------------------------------------------------

    def _dataset_done(self, spec: DataSpec) -> bool:
        return dataset_done(self.layout.data(spec), self.log)

    def _recon_done(self, path: Path) -> bool:
        """The reconstruction exists and reads; a damaged one is named and removed, so it is redone."""
        from dgm_eit.data.storage import recon_file_problem

        if not path.exists():
            return False
        problem = recon_file_problem(path)
        if problem is None:
            return True
        self.log(f"[redo]  {path}: {problem}")
        path.unlink(missing_ok=True)
        return False

    def _dataset_job(self, spec: DataSpec) -> StageJob:
        path = self.layout.data(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        return StageJob(f"data {spec.label}", lambda: self._dataset_done(spec), simulate_stage,
                        dict(cfg=dataset_config(self.cfg, spec), out=path, seed=data_seed(self.seed, spec.anomalies)))

    def _train_job(self, model: str, spec: DataSpec) -> StageJob:
        run_dir = self.layout.run(model, spec)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        return StageJob(f"train {model} on {spec.label}", lambda: (run_dir / "done").exists(), train_stage,
                        dict(model=model, data=self.layout.data(spec), run_dir=run_dir,
                             cfg=dataset_config(self.cfg, spec), seed=self.seed, device=self.device))

    def _reconstruct_job(self, method: str, train: DataSpec, data: DataSpec) -> StageJob:
        run = self.cfg["run"]
        out = self.layout.recon(method, train, data)
        out.parent.mkdir(parents=True, exist_ok=True)
        sampler = {"csd": run["csd_sampler"], "guided": run["guided_sampler"]}.get(method)
        tune = None
        if method == "csd" and sampler in ("csd", "dds") and run["csd_tune_t0"]:
            tune = self.layout.data(self.tuning_set(method, train, data))
        return StageJob(f"reconstruct {method} ({train.label}) on {data.label}", lambda: self._recon_done(out),
                        reconstruct_stage,
                        dict(run_dir=self.layout.run(METHOD_MODEL[method], train), data=self.layout.data(data),
                             out=out, n_samples=int(run[f"{method}_samples"]), sampler=sampler, seed=self.seed,
                             device=self.device, cfg=dataset_config(self.cfg, data), tune_data=tune))

    def tuning_set(self, method: str, train: DataSpec, data: DataSpec) -> DataSpec:
        """The data set whose validation split chooses CSD*'s settings for a table (see
        :func:`tuning_spec`)."""
        for s in self.settings:
            if s.data == data and model_train_set(method, s, self.cfg) == train:
                return tuning_spec(s)
        raise InputError(f"no results table tests {method} ({train.label}) on {data.label}")

    # -- run -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        start = time.perf_counter()
        self._check_manifest()
        self._load_stage_records()
        data_ok = {}
        for spec in self.datasets():
            # the simulator already spreads one data set over every core
            data_ok[spec] = self._stage(self._dataset_job(spec))
        # the slowest jobs first, so parallel workers finish together
        cost = {"score": 0, "cnf": 1, "cvae": 2, "guided": 0, "csd": 1}
        train_jobs = {}
        for model, spec in sorted(self.training_runs(), key=lambda r: cost[r[0]]):
            if data_ok[spec]:
                train_jobs[(model, spec)] = self._train_job(model, spec)
            else:
                self._skip(f"train {model} on {spec.label}", f"data set {spec.label} is not available")
        trained = self._run_phase(list(train_jobs.values()))
        run_ok = {key: trained.get(job.name, False) for key, job in train_jobs.items()}
        recon_jobs = []
        for method, train, data in sorted(self.reconstructions(), key=lambda r: cost.get(r[0], 2)):
            if run_ok.get((METHOD_MODEL[method], train)) and data_ok[data]:
                recon_jobs.append(self._reconstruct_job(method, train, data))
            else:
                self._skip(f"reconstruct {method} ({train.label}) on {data.label}",
                           f"needs the {METHOD_MODEL[method]} run on {train.label} and the data set {data.label}")
        self._run_phase(recon_jobs)
        self._time_gn(data_ok)
        settings = [self._evaluate(s, data_ok) for s in self.settings]
        result = RunResult(self.cfg, self.seed, self.layout.root, settings, self._efficiency(),
                           dict(self.stage_records), time.perf_counter() - start)
        self._save_stage_records()
        return result

    def _skip(self, name: str, why: str) -> None:
        self.stage_records[name] = {"status": "skipped", "message": why}
        self.log(f"[skip]  {name}: {why}")

    def _time_gn(self, data_ok: dict) -> None:
        if "gn" not in self.methods:
            return
        for spec in sorted({s.data for s in self.settings}, key=lambda d: (d.anomalies, -d.snr_db)):
            name = f"time gn on {spec.label}"
            record = self.stage_records.get(name, {})
            if not data_ok.get(spec):
                continue
            if record.get("status") == "done" and "seconds_per_image" in record:
                continue
            try:
                spi = gn_seconds_per_image(self.layout.data(spec), dataset_config(self.cfg, spec),
                                           int(self.cfg["run"]["gn_timing_samples"]))
            except Exception as err:  # timing is reported, never worth losing the report over
                if os.environ.get("DGM_EIT_DEBUG"):
                    raise
                self.stage_records[name] = {"status": "failed", "message": f"{type(err).__name__}: {err}"}
                continue
            self.stage_records[name] = {"status": "done", "seconds_per_image": spi, "device": "cpu"}
            self.log(f"[done]  {name}: {spi * 1000:.0f} ms per image")

    def _evaluate(self, setting: Setting, data_ok: dict) -> SettingResult:
        from dgm_eit.data.storage import dataset_gn_settings, read_split

        result = SettingResult(setting)
        if not data_ok.get(setting.data):
            result.missing = {m: f"data set {setting.data.label} is not available" for m in self.methods}
            return result
        arrays = read_split(self.layout.data(setting.data), "test", keys=("sigma", "gn"))
        result.gn_settings = dataset_gn_settings(self.layout.data(setting.data))
        truth = arrays["sigma"]
        recons, stds = {}, {}
        for method in self.methods:
            train = model_train_set(method, setting, self.cfg)
            if method == "gn":
                recon, std = arrays["gn"], None
            else:
                path = self.layout.recon(method, train, setting.data)
                if not path.exists():
                    result.missing[method] = f"no reconstruction ({path.name})"
                    continue
                recon, std = read_recon(path)
            try:
                values = per_sample(recon, truth)
            except InputError as err:
                result.missing[method] = f"not scored: {err}"
                continue
            sampling = {}
            if method == "csd":
                attrs = recon_attrs(path)
                sampling = {k: attrs[k] for k in ("t0", "n_steps", "sampler") if k in attrs}
                if sampling:
                    sampling["tuned_on"] = self.tuning_set(method, train, setting.data).label
            result.methods.append(MethodResult(method, train, summarize(values), values, sampling))
            recons[METHOD_NAMES[method]] = recon
            if std is not None and method in ("cnf", "csd"):
                stds[METHOD_NAMES[method]] = std
        if result.methods:
            from dgm_eit.report import comparison_figure

            k = min(int(self.cfg["run"]["figure_samples"]), len(truth))
            path = self.layout.figure(setting)
            path.parent.mkdir(parents=True, exist_ok=True)
            comparison_figure(path, truth[:k], {n: r[:k] for n, r in recons.items()},
                              {n: s[:k] for n, s in stds.items()}, setting.title)
            result.figure = path
        return result

    def _efficiency(self) -> list[EfficiencyRow]:
        rows = []
        if "gn" in self.methods:
            times = [r["seconds_per_image"] for k, r in self.stage_records.items()
                     if k.startswith("time gn") and r.get("status") == "done"]
            rows.append(EfficiencyRow("gn", None, 0, None, None, float(np.mean(times)) if times else None,
                                      None, "cpu"))
        seen = set()
        jobs = sorted(self.reconstructions(), key=lambda j: (METHODS.index(j[0]), j[1].anomalies, -j[1].snr_db))
        for method, train, _ in jobs:
            if (method, train) in seen:
                continue
            seen.add((method, train))
            model = METHOD_MODEL[method]
            run_dir = self.layout.run(model, train)
            if not (run_dir / "done").exists():
                continue
            files = [self.layout.recon(m, t, d) for m, t, d in self.reconstructions() if m == method and t == train]
            attrs = [recon_attrs(f) for f in files if f.exists()]
            spi = [a["seconds_per_image"] for a in attrs if "seconds_per_image" in a]
            nfe = [a["nfe"] for a in attrs if "nfe" in a]
            record = self.stage_records.get(f"train {model} on {train.label}", {})
            seconds, steps = training_time(run_dir)
            rows.append(EfficiencyRow(method, train, count_parameters(run_dir), seconds, steps,
                                      float(np.mean(spi)) if spi else None, float(np.mean(nfe)) if nfe else None,
                                      record.get("device", self.device)))
        return rows


# ---------------------------------------------------------------------------------------
# reading other stages' outputs


def read_recon(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "recon" not in f:
                raise InputError(f"{path}: no 'recon' array")
            recon = f["recon"][...]
            std = f["recon_std"][...] if "recon_std" in f else None
    except OSError as err:   # h5py's message does not name the file
        raise InputError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {err}") from None
    return recon, std


def recon_attrs(path: Path) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except OSError as err:
        raise InputError(f"{path} is not a readable HDF5 file (truncated or corrupt?): {err}") from None


def count_parameters(run_dir: Path) -> int | None:
    """Parameters of the trained model in ``run_dir``."""
    try:
        from dgm_eit.train import load_run

        model, _, _ = load_run(run_dir, device="cpu")
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # an efficiency figure is not worth failing the report
        if os.environ.get("DGM_EIT_DEBUG"):
            raise
        return None


def training_time(run_dir: Path) -> tuple[float | None, int | None]:
    """Wall time and optimiser steps the trainer recorded in ``done`` (summed over resumed sessions)."""
    try:
        done = json.loads((run_dir / "done").read_text())
    except (OSError, ValueError):
        return None, None
    seconds, steps = done.get("wall_s"), done.get("step")
    return (float(seconds) if seconds is not None else None, int(steps) if steps is not None else None)
