"""The paper's Tests 1-3 as one resumable pipeline (``dgm-eit run``).

What is compared comes from two registries: the tables from :data:`dgm_eit.paper.TESTS`,
the methods from :mod:`dgm_eit.methods` (each says which model it needs, which data set
that model learns from, how many samples it draws, which sampler it uses). Stages, in
order, each reused when its output exists:

1. data sets ``DIR/data/<label>.h5``: 2 and 4 anomalies at the high and the low SNR
   (paper: 40 dB and 25 dB). Both noise levels of one anomaly count use the same data
   seed, so they hold the same phantoms with different noise: Test 2 then differs from
   Test 1 in the noise only. Done when the file exists and is marked complete.
2. training runs ``DIR/runs/<run label>_<label>/seed<k>/`` (done when the trainer marked it
   finished): ``run.seeds`` per model and training set the selected methods need, seed k
   trained with :func:`dgm_eit.runtime.training_seed`. A run label is the model's name, or a
   method's own (:attr:`~dgm_eit.methods.Method.run_label`, e.g. ``cvae-v``) where the method
   sets config values of its own for its model. Conditional models learn from every
   table's own training set, as the paper did; the score prior only from the high-SNR
   sets, because it sees images only, so one prior serves both noise levels.
3. reconstructions ``DIR/recon/<method>_<train label>_on_<test label>_seed<k>.h5`` of every
   test split by every seed's model (done when the file exists; the reconstructor writes it
   atomically), and with several seeds the ensembles
   ``DIR/recon/<method>-ens_<train label>_on_<test label>.h5`` pooled from them. GN needs
   no stage: its image is the data set's ``gn`` array, and it has no seed.
4. metrics, intervals, the calibration of the std maps, ``metrics.csv``, figures, ``report.md``
   and ``remake.sh`` (the ``dgm-eit reconstruct`` command behind every seed's reconstruction
   file, read from its attributes: :meth:`Experiment.remake_command`): recomputed on every run
   (cheap).

A stage that fails is recorded in ``DIR/stages.json`` and in the report, and the stages
that do not depend on it still run; the command then exits non-zero. Re-running the
same command retries it and reuses everything else.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from dgm_eit import runs
from dgm_eit.best_of import check_best_of, read_selection
from dgm_eit.config import check_int
from dgm_eit.data.storage import dataset_gn_settings, read_split
from dgm_eit.errors import InputError
from dgm_eit.methods import GAUSS_NEWTON, Method, select_methods, trainers
from dgm_eit.metrics import evaluate_calibration, per_sample, scaled_coverage
from dgm_eit.models.posterior import TUNABLE_SAMPLERS
from dgm_eit.paper import settings_for
from dgm_eit.reconstruct import reconstruct_command
from dgm_eit.report import comparison_figure
from dgm_eit.results import (DataSpec, EfficiencyRow, MethodResult, RunResult, Setting, SettingResult,
                             read_recon, recon_attrs, recon_file_problem)
from dgm_eit.runtime import training_seed
from dgm_eit.stages import (MANIFEST, StageJob, StudyPlan, choice_file_problem, choose_stage, dataset_done,
                            ensemble_stage, reconstruct_stage, simulate_stage, train_stage)

# the classical reconstruction the study makes: the data set's GN image (made by the simulator)
CLASSICAL = ("gn",)
# which tests and methods to run, and how, may change between calls; what they compute may not
RESUME_FREE = ("run.tests", "run.methods", "run.seeds", "run.figure_samples", "run.jobs", "run.train_max_minutes",
               "run.expected_time", "run.bootstrap_resamples", "train.progress", "train.threads")


def check_tuning(run: dict) -> None:
    t0s, steps, n = run["csd_tune_t0"], run["csd_tune_steps"], run["csd_tune_images"]
    if not all(isinstance(t, (int, float)) and 0 < t <= 1 for t in t0s):
        raise InputError(f"run.csd_tune_t0 must list insertion times in (0, 1], got {t0s}")
    if t0s and not (steps and all(isinstance(k, int) and k >= 1 for k in steps)):
        raise InputError(f"run.csd_tune_steps must list step counts >= 1, got {steps}")
    check_int(n, "run.csd_tune_images", 1)


def tuning_spec(setting: Setting) -> DataSpec:
    """Where a sampler's t0 is chosen for a table: the anomaly count the models were trained on,
    at the test data's noise level (known at test time, as GN's regularisation uses it too).
    Tests 1-2: the test set's own training data; Test 3: the 4-anomaly set, never the
    2-anomaly distribution."""
    return DataSpec(setting.train.anomalies, setting.data.snr_db)


def data_seed(seed: int, anomalies: int) -> int:
    """One seed per anomaly count, shared by both noise levels: same phantoms, different noise."""
    return 1000 * seed + anomalies


def config_for(cfg: dict, spec: DataSpec) -> dict:
    """The config with ``[data]`` set to the data set ``spec``."""
    cfg = copy.deepcopy(cfg)
    cfg["data"]["anomalies"] = spec.anomalies
    cfg["data"]["snr_db"] = float(spec.snr_db)
    return cfg


def _spec_order(spec: DataSpec) -> tuple:
    return spec.anomalies, -spec.snr_db


class Layout:
    """Where each stage writes under the output directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def data(self, spec: DataSpec) -> Path:
        return self.root / "data" / f"{spec.label}.h5"

    def run(self, model: str, spec: DataSpec, seed_index: int) -> Path:
        return self.root / "runs" / f"{model}_{spec.label}" / f"seed{seed_index}"

    def recon(self, method: str, train: DataSpec, data: DataSpec, seed_index: int | None = None) -> Path:
        """A reconstruction by the model of seed ``seed_index``; None: a method without seeds (an ensemble)."""
        seed = "" if seed_index is None else f"_seed{seed_index}"
        return self.root / "recon" / f"{method}_{train.label}_on_{data.label}{seed}.h5"

    def choice(self, method: str, train: DataSpec, validation: DataSpec, seed_index: int) -> Path:
        """The settings the model of seed ``seed_index`` gets on ``validation``'s validation split."""
        return self.root / "choices" / f"{method}_{train.label}_on_{validation.label}_seed{seed_index}.json"

    def remade(self, recon: Path) -> Path:
        """Where the printed command that remakes the reconstruction file ``recon`` writes it, so
        that it can be compared with the run's own."""
        return self.root / "remade" / recon.name

    def relative(self, path: Path) -> Path:
        """``path`` as a command run in the output directory names it."""
        return path.relative_to(self.root)

    def figure(self, setting: Setting) -> Path:
        return self.root / "figures" / f"{setting.key}.png"

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST


def gn_seconds_per_image(data: Path, cfg: dict, n: int) -> float:
    """Wall time of one Gauss-Newton image (solve + rasterisation), timed on ``n`` test voltages.

    The data set's GN images were made in bulk by worker processes, so they carry no
    per-image time of their own; this times the same solver with the same settings here.
    """
    from dgm_eit.recon.tuning import apply_gn_settings
    from dgm_eit.reconstruct import gn_images

    cfg = apply_gn_settings(cfg, dataset_gn_settings(data))
    v = read_split(data, "test", keys=("v",), indices=slice(0, max(1, n)))["v"]
    size = int(cfg["data"]["image_size"])
    gn_images(cfg, v[:1], size)  # the first call builds the mesh and the FEM's sparsity pattern
    start = time.perf_counter()
    gn_images(cfg, v, size)
    return (time.perf_counter() - start) / len(v)


class Experiment(StudyPlan):
    """The paper's study on one output directory: the stage jobs of every step, run by
    :meth:`~dgm_eit.stages.StudyPlan.run`; a failed stage skips only the stages that read its output."""

    resume_free = RESUME_FREE

    def __init__(self, cfg: dict, out: str | Path, *, seed: int = 0, device: str = "cpu",
                 log: Callable[[str], None] = print):
        super().__init__(cfg, out, seed=seed, device=device, log=log)
        self.layout = Layout(out)
        self.settings = settings_for(cfg)
        self.methods = select_methods(cfg["run"]["methods"], ensembles=self.n_seeds > 1, classical=CLASSICAL)
        for method in self.methods:
            method.configure(cfg)   # a method's own config key that the profile lacks is refused here
        check_tuning(cfg["run"])
        self.best_of, self.best_of_methods = check_best_of(cfg["run"], {m.key for m in self.methods if m.seeded})
        self._check_data_configs()

    def _check_data_configs(self) -> None:
        """Every data set's config is checked before anything is created: a bad value is one
        error, not failed stages whose unfinished files block the corrected command."""
        import warnings

        from dgm_eit.data.simulate import check_config

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the simulator warns once per data set itself
            for spec in self.datasets():
                check_config(config_for(self.cfg, spec), data_seed(self.seed, spec.anomalies))

    # -- plan ------------------------------------------------------------------------------

    def train_set(self, method: Method, setting: Setting) -> DataSpec | None:
        return method.train_set(setting.train, float(self.cfg["run"]["high_snr_db"]))

    def training_seed(self, label: str, spec: DataSpec, seed_index: int, candidate: int = 0) -> int:
        """Seed k of the runs ``label`` (a model's name or a method's run label) on ``spec``; with
        ``run.best_of``, the seed of that run's candidate ``candidate``."""
        return training_seed(self.seed, label, spec.label, seed_index, candidate)

    def chosen_by(self, label: str) -> Method | None:
        """The method of ``run.best_of_methods`` whose validation images choose among the
        candidates of the runs ``label``; None: the runs are trained once."""
        if self.best_of == 1:
            return None
        return next((m for m in self.methods if m.key in self.best_of_methods and m.label == label), None)

    def _tunes(self, method: Method) -> bool:
        """Whether the method's sampler settings are chosen on validation data in this run."""
        run = self.cfg["run"]
        return method.tunes_t0 and method.sampler(run) in TUNABLE_SAMPLERS and bool(run["csd_tune_t0"])

    def _calibrates(self, method: Method) -> bool:
        """Whether the scale of the method's std maps is chosen on validation data in this run
        (a seed ensemble pools its seeds' maps unscaled)."""
        run = self.cfg["run"]
        return (method.std_map and not method.ensemble and int(run["calibration_images"]) > 0
                and (method.n_samples(run) or 1) > 1)

    def datasets(self) -> list[DataSpec]:
        specs = []
        for s in self.settings:
            specs.append(s.data)
            for method in self.methods:
                train = self.train_set(method, s)
                if train is not None:
                    specs.append(train)
            if ((any(m.tunes_t0 for m in self.methods) and self.cfg["run"]["csd_tune_t0"])
                    or any(self._calibrates(m) for m in self.methods)):
                specs.append(tuning_spec(s))
        return sorted(set(specs), key=_spec_order)

    def training_runs(self) -> list[tuple[str, DataSpec, int]]:
        """``(run label, training set, seed index)`` of every run the methods need (the label is
        the model's name, or a method's own where it configures its model: methods of one label
        share the run), seed 0 of every model first (an interrupted study then has whole tables
        of its first seeds soonest), within a seed the costliest model first."""
        cost = {m.label: m.cost for m in trainers(self.methods)}
        runs_needed = {(m.label, self.train_set(m, s)) for s in self.settings for m in self.methods
                       if m.model is not None}
        return [(label, spec, k) for k in range(self.n_seeds)
                for label, spec in sorted(runs_needed, key=lambda r: (-cost[r[0]], _spec_order(r[1])))]

    def trains(self, label: str) -> Method:
        """A selected method whose model the runs ``label`` are (they all train it alike)."""
        return next(m for m in trainers(self.methods) if m.label == label)

    def reconstructions(self) -> list[tuple[Method, DataSpec, DataSpec]]:
        """``(method, training set, test set)`` of every table's trained methods, in plan order."""
        jobs = [(m, self.train_set(m, s), s.data) for s in self.settings for m in self.methods if m.model is not None]
        return list(dict.fromkeys(jobs))

    def tuning_set(self, method: Method, train: DataSpec, data: DataSpec) -> DataSpec:
        """The data set whose validation split chooses a method's sampler settings for a table
        (see :func:`tuning_spec`)."""
        for s in self.settings:
            if s.data == data and self.train_set(method, s) == train:
                return tuning_spec(s)
        raise InputError(f"no results table tests {method.key} ({train.label}) on {data.label}")

    def seed_files(self, key: str, train: DataSpec, data: DataSpec) -> list[Path]:
        """The reconstructions of the method ``key`` by each seed's model."""
        return [self.layout.recon(key, train, data, k) for k in range(self.n_seeds)]

    def method_files(self, method: Method, train: DataSpec, data: DataSpec) -> list[Path]:
        """The reconstruction files a trained method is scored from: one per seed, or an ensemble's one."""
        if method.ensemble:
            return [self.layout.recon(method.key, train, data)]
        return self.seed_files(method.key, train, data)

    def remake_command(self, method: Method, train: DataSpec, data: DataSpec, k: int, attrs: dict) -> str:
        """The ``dgm-eit reconstruct`` command that remakes seed ``k``'s reconstruction file of a
        trained method into ``remade/`` from that file's attributes ``attrs`` (seed, samples,
        sampler, the t0 and steps chosen on validation ...), its paths relative to the output
        directory, to be run there."""
        layout = self.layout
        path = layout.recon(method.key, train, data, k)
        return reconstruct_command(attrs, run=layout.relative(layout.run(method.label, train, k)),
                                   data=layout.relative(layout.data(data)), out=layout.relative(layout.remade(path)))

    # -- stage jobs ------------------------------------------------------------------------

    def _dataset_done(self, spec: DataSpec) -> bool:
        return dataset_done(self.layout.data(spec), self.log)

    def _output_done(self, path: Path, problem: Callable[[Path], str | None] = recon_file_problem) -> bool:
        """The output (a reconstruction, or a choice file) exists and reads; a damaged one is
        named and removed, so it is redone."""
        if not path.exists():
            return False
        why = problem(path)
        if why is None:
            return True
        self.log(f"[redo]  {path}: {why}")
        path.unlink(missing_ok=True)
        return False

    def _dataset_job(self, spec: DataSpec) -> StageJob:
        path = self.layout.data(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the simulator already spreads one data set over every core: one at a time, here
        return StageJob(_data_name(spec), lambda: self._dataset_done(spec), simulate_stage,
                        dict(cfg=config_for(self.cfg, spec), out=path, seed=data_seed(self.seed, spec.anomalies)),
                        here=True)

    def _train_job(self, method: Method, spec: DataSpec, k: int) -> StageJob:
        run_dir = self.layout.run(method.label, spec, k)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        best_of = {}
        chooser = self.chosen_by(method.label)
        if chooser is not None:
            run = self.cfg["run"]
            best_of = dict(candidates=[self.training_seed(method.label, spec, k, j) for j in range(self.best_of)],
                           select=dict(n_samples=chooser.n_samples(run), sampler=chooser.sampler(run)))
        return StageJob(_train_name(method.label, spec, k), lambda: runs.is_finished(run_dir),
                        train_stage, dict(model=method.model, data=self.layout.data(spec), run_dir=run_dir,
                                          cfg=method.configure(config_for(self.cfg, spec)),
                                          seed=self.training_seed(method.label, spec, k), device=self.device,
                                          **best_of),
                        needs=(_data_name(spec),))

    def chooses(self, method: Method) -> bool:
        """Whether settings of the method are chosen on validation data in this run (a seed
        ensemble pools its seeds' reconstructions: it chooses nothing itself)."""
        return not method.ensemble and (self._tunes(method) or self._calibrates(method))

    def _choose_job(self, method: Method, train: DataSpec, validation: DataSpec, k: int) -> StageJob:
        run = self.cfg["run"]
        out = self.layout.choice(method.key, train, validation, k)
        out.parent.mkdir(parents=True, exist_ok=True)
        return StageJob(f"choose {method.key} ({train.label}) on {validation.label} validation, seed {k}",
                        lambda: self._output_done(out, choice_file_problem), choose_stage,
                        dict(run_dir=self.layout.run(method.label, train, k), validation=self.layout.data(validation),
                             out=out, n_samples=method.n_samples(run), sampler=method.sampler(run),
                             seed=self.training_seed(method.label, train, k), device=self.device,
                             cfg=method.configure(config_for(self.cfg, validation)),
                             tune=self._tunes(method), calibrate=self._calibrates(method)),
                        needs=(_train_name(method.label, train, k), _data_name(validation)))

    def _reconstruct_job(self, method: Method, train: DataSpec, data: DataSpec, k: int) -> StageJob:
        run = self.cfg["run"]
        out = self.layout.recon(method.key, train, data, k)
        out.parent.mkdir(parents=True, exist_ok=True)
        choice, needs = None, (_train_name(method.label, train, k), _data_name(data))
        if self.chooses(method):
            choose = self._choose_job(method, train, self.tuning_set(method, train, data), k)
            choice, needs = choose.kwargs["out"], needs + (choose.name,)
        return StageJob(_recon_name(method.key, train, data, k), lambda: self._output_done(out), reconstruct_stage,
                        dict(run_dir=self.layout.run(method.label, train, k), data=self.layout.data(data),
                             out=out, n_samples=method.n_samples(run), sampler=method.sampler(run),
                             seed=self.training_seed(method.label, train, k), device=self.device,
                             cfg=method.configure(config_for(self.cfg, data)), choice=choice), needs=needs)

    def _ensemble_job(self, method: Method, train: DataSpec, data: DataSpec) -> StageJob:
        out = self.layout.recon(method.key, train, data)
        members = self.seed_files(method.ensemble_of, train, data)

        def problem(path: Path) -> str | None:
            # a run that raised or lowered --seeds must not score the ensemble of the old seeds
            pooled = [Path(p).name for p in json.loads(recon_attrs(path).get("members", "[]"))]
            if pooled != [p.name for p in members]:
                return f"it pools {len(pooled)} seeds' reconstructions, this run has {len(members)}"
            return None

        return StageJob(f"pool {method.key} ({train.label}) on {data.label}",
                        lambda: self._output_done(out, lambda p: recon_file_problem(p) or problem(p)),
                        ensemble_stage, dict(members=members, out=out),
                        needs=tuple(_recon_name(method.ensemble_of, train, data, k) for k in range(self.n_seeds)),
                        here=True)

    # -- the steps -------------------------------------------------------------------------

    def data_jobs(self) -> list[StageJob]:
        return [self._dataset_job(spec) for spec in self.datasets()]

    def training_jobs(self) -> list[StageJob]:
        return [self._train_job(self.trains(label), spec, k) for label, spec, k in self.training_runs()]

    def _by_cost(self) -> list[tuple[Method, DataSpec, DataSpec]]:
        # the slowest jobs first, so parallel workers finish together
        return sorted(self.reconstructions(), key=lambda r: -r[0].cost)

    def choice_jobs(self) -> list[StageJob]:
        """One stage per model and validation set, read by every table that tests that model at
        that noise level; none for a reconstruction that is made already."""
        jobs = [self._choose_job(m, train, self.tuning_set(m, train, data), k) for m, train, data in self._by_cost()
                if self.chooses(m) for k in range(self.n_seeds) if not self._output_done(self.layout.recon(
                    m.key, train, data, k))]
        return list({job.name: job for job in jobs}.values())

    def evaluation_jobs(self) -> list[StageJob]:
        """Every seed's reconstructions of the test splits, then the seed ensembles pooled from them."""
        ordered = self._by_cost()
        return ([self._reconstruct_job(m, train, data, k) for m, train, data in ordered if not m.ensemble
                 for k in range(self.n_seeds)]
                + [self._ensemble_job(m, train, data) for m, train, data in ordered if m.ensemble])

    def report(self, ok: dict[str, bool], seconds: dict[str, float]) -> RunResult:
        start = time.perf_counter()
        data_ok = {spec: ok.get(_data_name(spec), False) for spec in self.datasets()}
        self._time_gn(data_ok)
        settings = [self._evaluate(s, data_ok) for s in self.settings]
        seeds, selections = {}, {}
        for label, spec in dict.fromkeys((m, s) for m, s, _ in self.training_runs()):
            name = f"{label} on {spec.label}"
            selections[name] = [read_selection(self.layout.run(label, spec, k)) for k in range(self.n_seeds)]
            # a best-of run keeps the seed of the candidate it chose
            seeds[name] = [self.training_seed(label, spec, k) if chosen is None
                           else chosen["candidates"][chosen["chosen"]]["seed"]
                           for k, chosen in enumerate(selections[name])]
        return RunResult(self.cfg, self.seed, self.layout.root, settings, self._efficiency(),
                         dict(self.stages.records), sum(seconds.values()) + time.perf_counter() - start, seeds,
                         selections)

    def _time_gn(self, data_ok: dict) -> None:
        if GAUSS_NEWTON not in self.methods:
            return
        records = self.stages.records
        for spec in sorted({s.data for s in self.settings}, key=_spec_order):
            name = f"time gn on {spec.label}"
            record = records.get(name, {})
            if not data_ok.get(spec):
                continue
            if record.get("status") == "done" and "seconds_per_image" in record:
                continue
            try:
                spi = gn_seconds_per_image(self.layout.data(spec), config_for(self.cfg, spec),
                                           int(self.cfg["run"]["gn_timing_samples"]))
            except Exception as err:  # timing is reported, never worth losing the report over
                if os.environ.get("DGM_EIT_DEBUG"):
                    raise
                records[name] = {"status": "failed", "message": f"{type(err).__name__}: {err}"}
                continue
            records[name] = {"status": "done", "seconds_per_image": spi, "device": "cpu"}
            self.log(f"[done]  {name}: {spi * 1000:.0f} ms per image")

    def _evaluate(self, setting: Setting, data_ok: dict) -> SettingResult:
        result = SettingResult(setting)
        if not data_ok.get(setting.data):
            result.missing = {m.key: f"data set {setting.data.label} is not available" for m in self.methods}
            return result
        arrays = read_split(self.layout.data(setting.data), "test", keys=("sigma", "gn"))
        result.gn_settings = dataset_gn_settings(self.layout.data(setting.data))
        truth = arrays["sigma"]
        recons, stds = {}, {}
        for method in self.methods:
            train = self.train_set(method, setting)
            if method.model is None:
                images = [(arrays["gn"], None)]
                files = []
            else:
                files = self.method_files(method, train, setting.data)
                absent = [p.name for p in files if not p.exists()]
                if absent:
                    result.missing[method.key] = f"no reconstruction ({', '.join(absent)})"
                    continue
                images = [read_recon(p) for p in files]
            attrs = [recon_attrs(path) for path in files] or [{}]
            # a method that draws one sample per image writes no std map to calibrate
            calibrated = method.std_map and all(std is not None for _, std in images)
            try:
                values = [per_sample(recon, truth) for recon, _ in images]
                calibration = [_calibration(recon, std, truth, a) for (recon, std), a in zip(images, attrs)
                               ] if calibrated else []
            except InputError as err:
                result.missing[method.key] = f"not scored: {err}"
                continue
            sampling = []
            if self._tunes(method) and not method.ensemble:
                tuned_on = self.tuning_set(method, train, setting.data).label
                sampling = [{**{k: a[k] for k in ("t0", "n_steps", "sampler") if k in a}, "tuned_on": tuned_on}
                            for a in attrs]
            seeded = method.seeded
            commands, pooled_from = [], []
            if seeded:
                commands = [self.remake_command(method, train, setting.data, k, a) for k, a in enumerate(attrs)]
            elif method.ensemble:
                members = self.seed_files(method.ensemble_of, train, setting.data)
                pooled_from = [str(self.layout.relative(p)) for p in members]
            samples = attrs[0].get("n_samples") if calibrated else None
            result.methods.append(MethodResult(method.key, method.name, train, values, seeded, sampling,
                                               commands=commands, pooled_from=pooled_from, calibration=calibration,
                                               posterior_samples=None if samples is None else int(samples),
                                               paper_row=method.paper_row_for(self.cfg)))
            # figures show the first seed's model, and each ensemble
            recon, std = images[0]
            recons[method.name] = recon
            if std is not None and method.std_map:
                stds[method.name] = std
        run = self.cfg["run"]
        result.compare_with(GAUSS_NEWTON.key, resamples=int(run["bootstrap_resamples"]), seed=self.seed)
        if result.methods:
            k = min(int(run["figure_samples"]), len(truth))
            path = self.layout.figure(setting)
            comparison_figure(path, truth[:k], {n: r[:k] for n, r in recons.items()},
                              {n: s[:k] for n, s in stds.items()}, setting.title)
            result.figure = path
        return result

    def _efficiency(self) -> list[EfficiencyRow]:
        """One row per method and training set: a trained method's figures are per model (the
        mean over its seeds), an ensemble's are what all its models cost together."""
        rows = []
        records = self.stages.records
        if GAUSS_NEWTON in self.methods:
            times = [r["seconds_per_image"] for k, r in records.items()
                     if k.startswith("time gn") and r.get("status") == "done"]
            rows.append(EfficiencyRow(GAUSS_NEWTON.key, GAUSS_NEWTON.name, None, None, 0, None, None,
                                      float(np.mean(times)) if times else None, None, "cpu"))
        position = {m: i for i, m in enumerate(self.methods)}
        jobs = self.reconstructions()
        trained_models = sorted({(m, t) for m, t, _ in jobs}, key=lambda j: (position[j[0]], _spec_order(j[1])))
        for method, train in trained_models:
            run_dirs = [self.layout.run(method.label, train, k) for k in range(self.n_seeds)]
            if not all(runs.is_finished(d) for d in run_dirs):
                continue
            files = [f for m, t, d in jobs if m == method and t == train for f in self.method_files(m, t, d)]
            attrs = [recon_attrs(f) for f in files if f.exists()]
            spi = [a["seconds_per_image"] for a in attrs if "seconds_per_image" in a]
            nfe = [a["nfe"] for a in attrs if "nfe" in a]
            times = [runs.training_time(d) for d in run_dirs]
            seconds = [t for t, _ in times if t is not None]
            steps = [s for _, s in times if s is not None]
            device = records.get(_train_name(method.label, train, 0), {}).get("device", self.device)
            models = self.n_seeds if method.ensemble else 1
            params = _parameters(run_dirs[0])

            def per_model(values):   # a trained method's cost per model; an ensemble's of all K
                if not values:
                    return None
                return float(np.sum(values)) if method.ensemble else float(np.mean(values))

            rows.append(EfficiencyRow(method.key, method.name, method.model, train,
                                      None if params is None else params * models, per_model(seconds),
                                      None if not steps else int(round(per_model(steps))),
                                      float(np.mean(spi)) if spi else None, float(np.mean(nfe)) if nfe else None,
                                      device, models))
        return rows


def _data_name(spec: DataSpec) -> str:
    return f"data {spec.label}"


def _train_name(label: str, spec: DataSpec, k: int) -> str:
    return f"train {label} on {spec.label}, seed {k}"


def _recon_name(key: str, train: DataSpec, data: DataSpec, k: int) -> str:
    return f"reconstruct {key} ({train.label}) on {data.label}, seed {k}"


def _calibration(recon, std, truth, attrs: dict) -> dict:
    """The calibration figures of one reconstruction file's std maps and, where the run chose
    a scale for them on validation data (attribute ``std_scale``), of the scaled maps."""
    figures = evaluate_calibration(recon, std, truth)
    if "std_scale" in attrs:
        figures.update(scaled_coverage(recon, std, truth, float(attrs["std_scale"]), int(attrs["std_scale_images"])))
    return figures


def _parameters(run_dir: Path) -> int | None:
    try:
        return runs.count_parameters(run_dir)
    except Exception:  # an efficiency figure is not worth failing the report
        if os.environ.get("DGM_EIT_DEBUG"):
            raise
        return None
