"""Resumable stages of a study, run one by one or side by side in worker processes.

A stage is a module-level function (so a worker process can run it) that makes one
output: a data set, a training run, a reconstruction file. :class:`StageRunner` skips a
stage whose output exists, records each stage's time, device or failure in a JSON file,
and keeps going when one fails, so a re-run retries only what is missing.
:class:`StudyPlan` is the one runner of a study: its steps (:data:`STEPS`) in order, each
step's stage jobs from the study's plan.
"""

from __future__ import annotations

import copy
import json
import os
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dgm_eit.config import check_int
from dgm_eit.errors import InputError
from dgm_eit.files import read_json, write_text
from dgm_eit.runtime import (check_seed, check_seed_settings, cpu_count, exit_with_parent, limit_threads,
                             release_sigint, sigint_held_back, stop_pool)
from dgm_eit.simulators import import_modules, registered_modules


# ---------------------------------------------------------------------------------------
# the stages: calls into the data, training and reconstruction packages


def simulate_stage(cfg: dict, out: Path, seed: int) -> None:
    """Physics runs on the CPU whatever ``--device`` says; the simulator uses every core."""
    from dgm_eit.data.simulate import simulate_dataset

    # overwrite: the files under DIR/data are the run's own, and one that cannot be read is
    # made again (a resumable .partial of the same config is still resumed)
    simulate_dataset(cfg, out, seed=seed, progress=bool(cfg["train"]["progress"]), overwrite=True)


def dataset_done(path: Path, log: Callable[[str], None]) -> bool:
    """A study's data set exists and opens (the study's manifest vouches for its config)."""
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
                progress: bool | None = None, candidates: list[int] | None = None,
                select: dict | None = None) -> None:
    """Train ``model`` into ``run_dir`` with ``seed``; with ``candidates`` (seeds), train one run
    per seed and keep the best on validation images (:func:`dgm_eit.best_of.train_best_of`,
    ``select``: how to reconstruct them)."""
    from dgm_eit.train import train

    max_minutes = float(cfg["run"]["train_max_minutes"]) or None

    def train_one(where: Path, seed: int) -> None:
        result = train(model, data, where, cfg, seed=seed, device=device, max_minutes=max_minutes, progress=progress)
        if not result.completed:
            raise InputError(f"training paused at step {result.step} ({result.stopped_by}, run.train_max_minutes = "
                             f"{max_minutes}); re-run the same command to continue it")

    if not candidates:
        train_one(run_dir, seed)
        return
    from dgm_eit.best_of import train_best_of

    select = dict(select or {})
    train_best_of(train_one, run_dir, candidates,
                  dict(select, data=data, device=device, **_sampler_options(cfg, select.get("sampler"))))


def _sampler_options(cfg: dict, sampler: str | None) -> dict:
    # the score model's samplers read [csd] and, for the samplers that read voltages, [mesh]
    return {"config": cfg} if sampler is not None else {}


def choose_stage(run_dir: Path, validation: Path, out: Path, *, n_samples: int | None, sampler: str | None,
                 seed: int, device: str, cfg: dict, tune: bool, calibrate: bool,
                 progress: bool | None = None) -> None:
    """Choose a trained method's settings on the validation split of ``validation`` and write
    them to ``out`` (JSON): with ``tune``, the sampler's t0 and step count (``[run] csd_tune_*``);
    with ``calibrate``, the scale of its std maps (``[run] calibration_images``) for those
    settings. Every table that tests the same model on the same validation data reads one file.
    (No progress bar: a choice is a short part of a reconstruction's time.)"""
    from dgm_eit.metrics import CALIBRATION_LEVEL
    from dgm_eit.tuning import std_scale_on_validation, tune_on_validation

    run = cfg["run"]
    settings, attrs = {}, {}
    if tune:
        settings, _ = tune_on_validation(run_dir, validation, cfg, t0s=run["csd_tune_t0"],
                                         steps=run["csd_tune_steps"], n_images=int(run["csd_tune_images"]),
                                         seed=seed, device=device, sampler=sampler)
    if calibrate:
        attrs = std_scale_on_validation(run_dir, validation, n_images=int(run["calibration_images"]),
                                        level=CALIBRATION_LEVEL, n_samples=n_samples, sampler=sampler, seed=seed,
                                        device=device, **_sampler_options(cfg, sampler), **settings)
    write_text(out, json.dumps({"settings": settings, "attrs": attrs}, indent=2, sort_keys=True))


def read_choice(path: Path) -> dict:
    """A choice file of :func:`choose_stage`: ``{"settings": {...}, "attrs": {...}}``."""
    choice = read_json(path, "the stage that chose it is redone when the run is resumed")
    if not (isinstance(choice, dict) and isinstance(choice.get("settings"), dict)
            and isinstance(choice.get("attrs"), dict)):
        raise InputError(f"{path} is not a choice file (it needs the objects 'settings' and 'attrs')")
    return choice


def choice_file_problem(path: Path) -> str | None:
    """None when ``path`` is a readable choice file, else what is wrong with it."""
    try:
        read_choice(path)
    except InputError:
        return "it is not a readable choice file"
    return None


def reconstruct_stage(run_dir: Path, data: Path, out: Path, *, n_samples: int | None, sampler: str | None,
                      seed: int, device: str, cfg: dict, progress: bool | None = None,
                      choice: Path | None = None) -> None:
    """Reconstruct the test split of ``data`` with the settings and std scale chosen on
    validation data (``choice``, a file of :func:`choose_stage`), recorded in the file."""
    from dgm_eit.reconstruct import reconstruct_split

    opts = _sampler_options(cfg, sampler)
    attrs = {}
    if choice is not None:
        chosen = read_choice(choice)
        opts.update(chosen["settings"])
        attrs = chosen["attrs"]
    progress = bool(cfg["train"]["progress"]) if progress is None else progress
    reconstruct_split(run_dir, data, "test", out, n_samples=n_samples, sampler=sampler, seed=seed, device=device,
                      progress=progress, attrs=attrs, **opts)


def ensemble_stage(members: list[Path], out: Path) -> None:
    """Pool the reconstructions of one method's training seeds into its seed ensemble's file."""
    from dgm_eit.reconstruct import pool_members
    from dgm_eit.results import read_recon, recon_attrs, write_recon_file

    loaded = []
    for path in members:
        recon, std = read_recon(path)
        attrs = recon_attrs(path)
        loaded.append({"recon": recon, "recon_std": std, "n_samples": attrs.get("n_samples", 1),
                       "nfe": attrs.get("nfe", 0), "seconds_per_image": attrs.get("seconds_per_image", 0.0)})
    pooled = pool_members(loaded)
    first = recon_attrs(members[0])
    attrs = {k: first[k] for k in ("split", "data", "sampler") if k in first}
    write_recon_file(out, pooled, {**attrs, "method": "ensemble", "n_samples": pooled["n_samples"],
                                   "members": json.dumps([str(p) for p in members])})


def worker_init(threads: int, parent_alive=None, studies: tuple[str, ...] = ()) -> None:
    import signal

    # Ctrl-C from a terminal reaches the whole process group: a worker between tasks (or
    # still starting: it was started with SIGINT held back) leaves the decision to the main
    # process, which interrupts the running tasks itself (stop_pool) and ends the rest; see
    # worker_call
    release_sigint(signal.SIG_IGN)
    if parent_alive is not None:
        exit_with_parent(parent_alive)
    limit_threads(threads)
    # a spawned worker starts with an empty registry: a stage must find the simulator of a
    # study the main process registered
    import_modules(studies)


def timed_call(fn: Callable, kwargs: dict) -> float:
    start = time.perf_counter()
    fn(**kwargs)
    return time.perf_counter() - start


class _WorkerTerminated(BaseException):
    """SIGTERM in a pool worker's task; no ``except Exception`` of the task catches it."""


def _terminate_task(signum, frame):
    raise _WorkerTerminated


def worker_call(fn: Callable, kwargs: dict) -> float:
    """:func:`timed_call` in a pool worker: Ctrl-C interrupts the task (training then saves
    its checkpoint) and is ignored again once it is over. SIGTERM (``stop_pool`` after its
    grace) unwinds the task, so that its temporary files are removed, then ends the worker."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate_task)
    try:
        return timed_call(fn, kwargs)
    except _WorkerTerminated:
        os._exit(143)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ---------------------------------------------------------------------------------------
# running them


@dataclass
class StageJob:
    """One stage: ``fn(**kwargs)`` makes the output that ``done()`` checks for, from the outputs
    of the stages named in ``needs``; ``here``: run in this process, one at a time (a data set's
    simulator or a study's own step that spreads its work itself)."""

    name: str
    done: Callable[[], bool]
    fn: Callable
    kwargs: dict
    needs: tuple[str, ...] = ()
    here: bool = False


class StageRunner:
    """Runs stage jobs, ``jobs`` at a time, and keeps their records in ``records_path``."""

    def __init__(self, records_path: Path, *, jobs: int, device: str, log: Callable[[str], None]):
        self.path = Path(records_path)
        self.jobs = jobs
        self.device = device
        self.log = log
        self.records: dict[str, dict] = {}

    def load(self) -> None:
        try:
            self.records = read_json(self.path) if self.path.exists() else {}
        except InputError as err:
            # only records: the stages' outputs say what is done, so start the records afresh
            self.log(f"[warn]  {err}; its records are started again")
            self.records = {}

    def save(self) -> None:
        write_text(self.path, json.dumps(self.records, indent=2))

    def skip(self, name: str, why: str) -> None:
        self.records[name] = {"status": "skipped", "message": why}
        self.log(f"[skip]  {name}: {why}")

    def _reused(self, name: str) -> None:
        if self.records.get(name, {}).get("status") != "done":
            # made by a call whose record was lost, or by hand: no time to report
            self.records[name] = {"status": "done", "reused": True}
        self.log(f"[reuse] {name}")

    def _failed(self, name: str, err: BaseException) -> None:
        missing = isinstance(err, ModuleNotFoundError) and (err.name or "").startswith("dgm_eit")
        status = "missing" if missing else "failed"
        message = f"{type(err).__name__}: {err}"
        cause = err.__cause__  # a worker's traceback arrives as the cause
        detail = str(cause) if cause is not None else "".join(traceback.format_exception(err, limit=6))
        self.records[name] = {"status": status, "message": message, "traceback": detail[-4000:]}
        self.save()
        self.log(f"[{status}] {name}: {message}")

    def _finished(self, job: StageJob, seconds: float) -> bool:
        if not job.done():
            self.records[job.name] = {"status": "failed", "message": "the stage finished without its output"}
            self.save()
            self.log(f"[failed] {job.name}: finished without its output")
            return False
        self.records[job.name] = {"status": "done", "seconds": seconds, "device": self.device}
        self.save()
        self.log(f"[done]  {job.name} ({seconds:.1f} s)")
        return True

    def run_one(self, job: StageJob) -> bool:
        """Run one stage here unless it is done; record time, device or failure. True when done."""
        if job.done():
            self._reused(job.name)
            return True
        self.log(f"[run]   {job.name}")
        try:
            seconds = timed_call(job.fn, job.kwargs)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # a failed stage must not lose the others' results
            if os.environ.get("DGM_EIT_DEBUG"):
                raise
            self._failed(job.name, err)
            return False
        return self._finished(job, seconds)

    def run_step(self, jobs: list[StageJob], ok: dict[str, bool]) -> dict[str, bool]:
        """Run one step's stages: those not ``here`` side by side (:meth:`run_phase`), then
        those ``here`` in order. A stage whose ``needs`` are not all done in ``ok`` is skipped,
        unless its output exists. Adds every outcome to ``ok``; returns this step's."""
        def ready(job: StageJob) -> bool:
            unmet = [name for name in job.needs if not ok.get(name)]
            if not unmet or job.done():
                return True
            self.skip(job.name, f"{unmet[0]} did not complete")
            ok[job.name] = False
            return False

        ok.update(self.run_phase([job for job in jobs if not job.here and ready(job)]))
        for job in jobs:
            if job.here and ready(job):
                ok[job.name] = self.run_one(job)
        return {job.name: ok[job.name] for job in jobs}

    def run_phase(self, jobs: list[StageJob]) -> dict[str, bool]:
        """Run independent stages, ``jobs`` at a time in worker processes when > 1.

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
                ok[job.name] = self.run_one(job)
            return ok
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # a lone job (a re-run that redoes one stage) still gets the same thread count as in a
        # full run, so it computes the same numbers
        threads = max(1, cpu_count() // self.jobs)
        context = multiprocessing.get_context("spawn")
        # the workers end themselves when this process dies, even by SIGKILL (exit_with_parent);
        # the pipe closes after the pool has shut down
        alive_r, alive_w = context.Pipe(duplex=False)
        with alive_r, alive_w, ProcessPoolExecutor(max_workers=min(self.jobs, len(pending)), mp_context=context,
                                                   initializer=worker_init,
                                                   initargs=(threads, alive_r, registered_modules())) as pool:
            futures = {}
            try:
                # the workers start during submit(); a Ctrl-C meanwhile is raised after it
                with sigint_held_back():
                    for job in pending:
                        # progress bars of parallel jobs would garble each other; the log says what finished
                        kwargs = dict(job.kwargs, progress=False)
                        if "cfg" in kwargs:
                            kwargs["cfg"] = copy.deepcopy(kwargs["cfg"])
                            kwargs["cfg"]["train"]["threads"] = threads
                        futures[pool.submit(worker_call, job.fn, kwargs)] = job
                        self.log(f"[queue] {job.name}")
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
                stop_pool(pool, grace=3.0, interrupt=True)
                raise
        return ok


# ---------------------------------------------------------------------------------------
# a study: the same steps for every study

MANIFEST = "run.json"
# a study's steps, in order; a plan gives each one's stage jobs (``<step>_jobs``)
STEPS = ("data", "training", "choice", "evaluation")


class StudyPlan(ABC):
    """A study as data, run by :meth:`run`: data sets -> training runs -> choices on
    validation -> evaluation on test data -> report, every step's stage jobs through one
    :class:`StageRunner` (``stages``, its records in ``root/stages.json``). A step's jobs are
    planned when it starts, so they may read what the steps before it made; a job whose
    inputs (``needs``) did not complete is skipped. What differs between studies is the
    jobs each step returns and the report, never the loop."""

    resume_free: tuple[str, ...] = ()   # config keys a re-run of the directory may change
    stops_at_failure = False            # True: end the study at a step with a stage not done

    def __init__(self, cfg: dict, root: str | Path, *, seed: int, device: str, log: Callable[[str], None]):
        """``root``: the study directory (``run.json`` holds its seed and config). A bad seed
        or ``[run]`` value is refused here, not as failed stages."""
        jobs = check_int(cfg["run"]["jobs"], "run.jobs", 0, "0: one per core")
        self.cfg, self.root, self.seed, self.device, self.log = cfg, Path(root), check_seed(seed), str(device), log
        self.n_seeds = check_seed_settings(cfg["run"])
        self.stages = StageRunner(self.root / "stages.json", jobs=jobs or cpu_count(), device=self.device, log=log)

    @abstractmethod
    def data_jobs(self) -> list[StageJob]: ...

    @abstractmethod
    def training_jobs(self) -> list[StageJob]: ...

    @abstractmethod
    def choice_jobs(self) -> list[StageJob]: ...

    @abstractmethod
    def evaluation_jobs(self) -> list[StageJob]: ...

    @abstractmethod
    def report(self, ok: dict[str, bool], seconds: dict[str, float]):
        """The study's result from its stages' outcomes (``ok``, by job name) and each step's time."""

    def run(self):
        from dgm_eit.runs import check_manifest

        check_manifest(self.root, self.root / MANIFEST, self.seed, self.cfg, ignore=self.resume_free)
        self.stages.load()
        ok, seconds = {}, {}
        for step in STEPS:
            start = time.perf_counter()
            outcome = self.stages.run_step(getattr(self, f"{step}_jobs")(), ok)
            seconds[step] = time.perf_counter() - start
            failed = [name for name, done in outcome.items() if not done]
            if failed and self.stops_at_failure:
                record = self.stages.records.get(failed[0], {})
                raise InputError(f"stage {failed[0]!r} did not complete ({record.get('status')}: "
                                 f"{record.get('message', '')}); fix it and re-run the same command to resume")
        result = self.report(ok, seconds)
        self.stages.save()
        return result
