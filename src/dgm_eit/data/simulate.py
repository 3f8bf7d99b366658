"""Simulate a data set: phantoms -> voltages (fine mesh) + noise -> Gauss-Newton images.

Every sample is a pure function of ``(seed, split, index)``: its generator is
``numpy.random.default_rng([seed, split_index, index])``, which draws the phantom first
and the measurement noise second. Which process computes a sample, in which order, and
how often the run was interrupted therefore cannot change the file; and two data sets that
differ only in ``data.snr_db`` (or the ``[gn]`` settings) share their phantoms.

The work is cut into chunks of consecutive samples of one split. Chunks run in worker
processes (``concurrent.futures.ProcessPoolExecutor``, spawn/forkserver; each worker
builds its meshes and factorisations once) or on a Dask cluster (``scheduler``); the main
process alone writes them into ``FILE.partial`` (see :mod:`dgm_eit.data.storage`) and
records each finished chunk, so the same command resumes after a kill.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from dgm_eit import __version__
from dgm_eit.data import storage
from dgm_eit.data.storage import SPLIT_INDEX, sample_rng  # noqa: F401  (SPLIT_INDEX: tests and benchmarks)
from dgm_eit.config import config_changes, set_key, with_added_keys
from dgm_eit.data.noise import add_noise, check_snr_db
from dgm_eit.data.phantoms import element_quadrature_points, phantom_sampler
from dgm_eit.errors import InputError
from dgm_eit.recon.tuning import apply_gn_settings
from dgm_eit.runtime import check_seed, exit_with_parent, forkserver_context, stop_pool
from dgm_eit.simulators import apply_settings, import_modules, registered_modules, simulator_class

DEFAULT_CHUNK_SIZE = 16
# Below this many samples, default --workers runs in this process: worker start-up (about
# 1-2 s each) would exceed the time they save (about 40 ms a sample at the smoke profile).
SMALL_RUN = 100


def split_sizes(cfg: dict) -> dict[str, int]:
    d = cfg["data"]
    sizes = {"train": int(d["n_train"]), "val": int(d["n_val"]), "test": int(d["n_test"])}
    for split, n in sizes.items():
        if n < 0:
            raise InputError(f"data.n_{split} must be >= 0, got {n}")
    if sum(sizes.values()) == 0:
        raise InputError("data.n_train, data.n_val and data.n_test are all 0: nothing to simulate")
    return sizes


def identity_json(cfg: dict, seed: int) -> str:
    """What makes two data sets equal: the seed and the config sections that change the
    simulated arrays (the study's simulator names them), whatever the other sections say;
    keys added since a file was written count with the value that made it."""
    cfg = with_added_keys(cfg)
    sections = simulator_class(cfg).data_sections
    return json.dumps({"seed": int(seed), **{s: cfg.get(s) for s in sections}}, sort_keys=True)


class Simulator:
    """Everything mesh-dependent for one config of the disk, built once per process (the
    paper's study; see :mod:`dgm_eit.simulators` for what a simulator provides)."""

    data_sections = ("mesh", "simulation", "data", "phantom", "gn")
    apply_settings = staticmethod(apply_gn_settings)
    extra_images = 0

    @staticmethod
    def check_config(cfg: dict, seed: int) -> None:
        _check_disk(cfg, seed)

    def __init__(self, cfg: dict):
        from dgm_eit.physics import PixelGrid, forward_model_from_config
        from dgm_eit.recon import gn_config

        self.cfg = cfg
        d, p = cfg["data"], cfg["phantom"]
        self.sampler = phantom_sampler(cfg)
        self.image_size = int(d["image_size"])
        if self.image_size < 2:
            raise InputError(f"data.image_size must be >= 2, got {self.image_size}")
        self.snr_db = float(d["snr_db"])
        self.supersample = int(p["supersample"])
        # the finer simulation mesh makes the data, the inversion mesh ([mesh]) reconstructs it
        self.fine = forward_model_from_config(cfg, "simulation")
        self.coarse = forward_model_from_config(cfg, "mesh")
        self.grid = PixelGrid(self.coarse.mesh, size=self.image_size)
        self.inside = np.asarray(self.grid.inside, dtype=bool)
        fine = self.fine.mesh
        # phantoms live on the unit disk: their sizes and places are fractions of the radius
        self.quad_points = element_quadrature_points(fine.nodes / fine.radius, fine.elements, int(p["quadrature"]))
        self.gn_kwargs = gn_config(cfg)
        self.n_meas = int(self.fine.n_meas)

    def gn_settings(self, seed: int, log: Callable[[str], None] | None = None) -> dict:
        """GN's weight and iteration count for this data set, chosen on its validation split
        (:mod:`dgm_eit.recon.tuning`); the configured ones when ``gn.tune_lam`` is empty."""
        from threadpoolctl import threadpool_limits

        from dgm_eit.recon.tuning import gn_settings, tune_gauss_newton, tuning_grid

        factors, iters, images = tuning_grid(self.cfg)
        if not factors:
            return gn_settings(self.cfg, self.coarse)
        n = min(images, int(self.cfg["data"]["n_val"]))
        started = time.perf_counter()
        # one BLAS thread, as in the workers: the chosen setting must not depend on the machine
        with threadpool_limits(1):
            val = [self.measure(seed, "val", i) for i in range(n)]
            tuning = tune_gauss_newton(self.coarse, self.grid, np.stack([s["v"] for s in val]),
                                       np.stack([s["sigma"] for s in val]), self.gn_kwargs, factors, iters)
        settings = gn_settings(self.cfg, self.coarse, tuning)
        if log is not None:
            log(f"GN tuned on {n} validation images in {time.perf_counter() - started:.0f} s: "
                f"lam = {settings['lam']:.3g}, {settings['max_iter']} iterations (val MSE {settings['val_mse']:.4g})")
        return settings

    def measure(self, seed: int, split: str, index: int) -> dict[str, np.ndarray]:
        """Truth image and clean and noisy voltages of one sample (no reconstruction)."""
        rng = sample_rng(seed, split, index)
        phantom = self.sampler.sample(rng)
        v_clean = np.asarray(self.fine.forward(phantom.on_elements(self.quad_points)), dtype=np.float64)
        v = add_noise(v_clean, self.snr_db, rng)
        sigma = phantom.rasterise(self.image_size, self.supersample, inside=self.inside)
        return {"sigma": sigma, "v": v, "v_clean": v_clean}

    def sample(self, seed: int, split: str, index: int) -> dict[str, np.ndarray]:
        from dgm_eit.recon import gauss_newton

        out = self.measure(seed, split, index)
        try:
            result = gauss_newton(self.coarse, out["v"], **self.gn_kwargs)
        except InputError as err:
            # deterministic: re-running would fail on the same sample, so say which one
            raise InputError(f"Gauss-Newton failed on sample {split}[{index}] (seed {seed}): {err}; "
                             "change the [gn] settings (e.g. a larger gn.lam)") from None
        out["gn"] = np.asarray(self.grid.to_image(np.asarray(result.sigma)), dtype=np.float64)
        return out

    def chunk(self, seed: int, split: str, start: int, stop: int) -> dict[str, np.ndarray]:
        return storage.stack_chunk([self.sample(seed, split, i) for i in range(start, stop)], seed, split, start)


_SIMULATORS: dict[str, Simulator] = {}
_SIMULATOR_LOCK = threading.Lock()
_THREADS_LIMITED = False


def simulator_for(cfg_json: str):
    """The process's cached :class:`Simulator` for a config (JSON text as the key)."""
    with _SIMULATOR_LOCK:
        sim = _SIMULATORS.get(cfg_json)
        if sim is None:
            cfg = json.loads(cfg_json)
            sim = simulator_class(cfg)(cfg)
            _SIMULATORS.clear()  # one config per process at a time; meshes are large
            _SIMULATORS[cfg_json] = sim
        return sim


def _single_threaded() -> None:
    """BLAS threads change summation order; one thread everywhere keeps samples bit-identical.

    ``runtime.limit_threads`` also sets torch's threads, but importing torch costs a worker
    about 2 s and the simulator never uses it: call it only when torch is already loaded.
    """
    global _THREADS_LIMITED
    if not _THREADS_LIMITED:
        if "torch" in sys.modules:
            from dgm_eit.runtime import limit_threads

            limit_threads(1)
        else:
            from threadpoolctl import threadpool_limits

            threadpool_limits(1)
        _THREADS_LIMITED = True


def _worker_init(cfg_json: str, parent_alive=None, studies: tuple[str, ...] = ()) -> None:
    import signal

    # Ctrl-C in a terminal reaches every process of the group: the main process alone
    # decides (it keeps the finished chunks and ends the workers)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_alive is not None:
        exit_with_parent(parent_alive)
    _single_threaded()
    import_modules(studies)   # a worker sees the studies its parent registered
    simulator_for(cfg_json)


def _compute_chunk(cfg_json: str, seed: int, split: str, start: int, stop: int, timed: bool = False):
    cpu = time.process_time()
    arrays = simulator_for(cfg_json).chunk(seed, split, start, stop)
    return (arrays, time.process_time() - cpu) if timed else arrays


def simulate_chunk(cfg_json: str, seed: int, split: str, start: int, stop: int, timed: bool = False,
                   studies: tuple[str, ...] = ()):
    """One chunk of samples (worker entry point for processes and Dask).

    ``timed``: return ``(arrays, cpu_seconds)`` instead, for the benchmark; ``studies``: the
    modules of the simulators registered in the main process (``simulators.registered_modules``).
    """
    _single_threaded()
    import_modules(studies)
    return _compute_chunk(cfg_json, seed, split, start, stop, timed)


@dataclass
class Task:
    split: str
    chunk: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def run_tasks(cfg_json: str, seed: int, tasks: list[Task], *, workers: int = 1, scheduler: str | None = None,
              timed: bool = False, interrupted=None) -> Iterator[tuple[Task, dict[str, np.ndarray]]]:
    """Yield ``(task, arrays)`` as chunks finish (any order); ``(task, (arrays, cpu_s))`` if ``timed``."""
    if not tasks:
        return
    if scheduler:
        yield from _run_dask(cfg_json, seed, tasks, scheduler, timed)
    elif workers <= 1:
        from threadpoolctl import threadpool_limits

        # in this process: one BLAS thread while simulating only, the caller keeps its own
        with threadpool_limits(1):
            for task in tasks:
                yield task, _compute_chunk(cfg_json, seed, task.split, task.start, task.stop, timed)
    else:
        yield from _run_pool(cfg_json, seed, tasks, workers, timed, interrupted)


def _run_pool(cfg_json, seed, tasks, workers, timed=False, interrupted=None):
    studies = registered_modules()
    ctx = forkserver_context(["dgm_eit.data.simulate", "dgm_eit.physics", "dgm_eit.recon", *studies])
    alive_r, alive_w = ctx.Pipe(duplex=False)
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx,
                               initializer=_worker_init, initargs=(cfg_json, alive_r, studies))
    drained = False
    try:
        # Keep a bounded number of chunks in flight so results are written as they come
        # and a failure stops the run quickly.
        queue = list(reversed(tasks))
        running = {}
        limit = 2 * workers
        while queue or running:
            while queue and len(running) < limit:
                task = queue.pop()
                running[pool.submit(simulate_chunk, cfg_json, seed, task.split, task.start, task.stop,
                                     timed)] = task
            # a bounded wait, so that a Ctrl-C swallowed elsewhere is raised again within 0.5 s
            finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            if interrupted is not None and interrupted.is_set():
                raise KeyboardInterrupt
            for future in finished:
                task = running.pop(future)
                yield task, future.result()
        drained = True
    finally:
        if drained:
            pool.shutdown(wait=True, cancel_futures=True)
        else:
            # Ctrl-C or a failure: the finished chunks are on disk; do not wait for the
            # running ones (minutes on a loaded machine), end the workers now
            stop_pool(pool)
        alive_r.close()
        alive_w.close()


def _run_dask(cfg_json, seed, tasks, address, timed=False):
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise InputError("--scheduler needs Dask distributed: pip install 'dgm-eit[distributed]'") from None
    try:
        client = Client(address, timeout="20s")
    except (OSError, TimeoutError) as err:
        raise InputError(f"cannot reach the Dask scheduler at {address!r}: {err}") from None
    try:
        import uuid

        run_id = uuid.uuid4().hex[:12]
        studies = registered_modules()
        futures, task_of = [], {}
        for task in tasks:
            future = client.submit(simulate_chunk, cfg_json, seed, task.split, task.start, task.stop, timed,
                                   studies, key=f"dgm-eit-simulate-{run_id}-{task.split}-{task.chunk}", pure=False)
            futures.append(future)
            task_of[future.key] = task
        for future in as_completed(futures):
            arrays = future.result()
            future.release()
            yield task_of[future.key], arrays
    finally:
        client.close()


@dataclass
class SimulateResult:
    path: Path
    status: str  # "done" | "already done"
    sizes: dict[str, int]
    seconds: float = 0.0
    samples_run: int = 0
    resumed_samples: int = 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_config(cfg: dict, seed: int) -> dict[str, int]:
    """Cheap checks before any process starts: seed, sizes, then the study's own (phantom
    parameters, meshes, the classical image's settings)."""
    check_seed(seed)
    sizes = split_sizes(cfg)
    simulator_class(cfg).check_config(cfg, seed)
    return sizes


def _check_disk(cfg: dict, seed: int) -> None:
    sampler = phantom_sampler(cfg)
    # rejection sampling failing is the practical test of "the anomalies cannot fit"
    for index in range(3):
        sampler.sample(sample_rng(seed, "train", index))
    # before [gn]: GN's weight is scaled by the SNR, and a NaN weight would be blamed on gn.lam
    check_snr_db(float(cfg["data"]["snr_db"]))
    _check_gn(cfg)
    from dgm_eit.physics.fem import mesh_placement

    mesh_placement(cfg)   # a bad radius or angle, named before any file exists
    fine_h0, coarse_h0 = float(cfg["simulation"]["h0"]), float(cfg["mesh"]["h0"])
    if fine_h0 > coarse_h0:
        raise InputError(f"simulation.h0 = {fine_h0} is coarser than the inversion mesh's "
                         f"mesh.h0 = {coarse_h0}; simulate on a finer mesh (no inverse crime)")
    if fine_h0 == coarse_h0 and cfg["simulation"]["electrode_model"] == cfg["mesh"]["electrode_model"]:
        # stacklevel: the warning points at whoever called check_config
        warnings.warn("simulation and inversion use the same mesh: Gauss-Newton images will show the "
                      "inverse crime (optimistic); set simulation.h0 below mesh.h0", stacklevel=4)


def _check_gn(cfg: dict) -> None:
    """The [gn] values Gauss-Newton would refuse on the first sample, refused before any file exists."""
    from dgm_eit.recon import gn_config

    gn = gn_config(cfg)
    for key, low in (("lam", 0.0), ("max_iter", 0), ("tol", 0.0)):
        if not gn[key] >= low:   # also refuses NaN
            raise InputError(f"gn.{key} must be >= {low:g}, got {cfg['gn'].get(key)}")
    from dgm_eit.recon.tuning import tuning_grid

    factors, _, _ = tuning_grid(cfg)
    if factors and int(cfg["data"]["n_val"]) < 1:
        raise InputError("GN tuning (gn.tune_lam) needs validation images: set data.n_val >= 1 or gn.tune_lam = []")


def _open_resumable(partial_path: Path, identity: str, overwrite: bool) -> storage.PartialFile | None:
    """The unfinished run to resume, None to start afresh, or InputError when it is another run's."""
    if not partial_path.exists():
        return None
    try:
        partial = storage.PartialFile.open(partial_path)
    except storage.FileLockedError:
        raise  # never --overwrite a file a running simulation is writing
    except InputError as err:
        if overwrite or _no_finished_chunk(partial_path):
            return None
        raise InputError(f"cannot resume from {partial_path}: {err}; delete it or pass --overwrite") from None
    if partial.version != __version__:
        problem = (f"was started by dgm-eit {partial.version}, this is {__version__}; finish it with that version "
                   "or pass --overwrite to start again")
    elif identity_json(json.loads(partial.identity), json.loads(partial.identity)["seed"]) != identity:
        problem = (f"holds an unfinished simulation that {_describe_difference(partial.identity, identity)}; "
                   "re-run that command to finish it, or pass --overwrite to discard it")
    else:
        return partial
    empty = not partial.has_finished_chunk
    partial.close()
    if overwrite or empty:   # a partial file without one finished chunk has no work to lose
        return None
    raise InputError(f"{partial_path} {problem}")


def _no_finished_chunk(partial_path: Path) -> bool:
    """True when a partial file that cannot be resumed holds no finished chunk (nothing to lose)."""
    import h5py

    try:
        with h5py.File(partial_path, "r") as f:
            return not any(f[storage.DONE_GROUP][split][()].any() for split in storage.SPLITS)
    except Exception:   # unreadable: a crash while it was being built, before any chunk
        return False   # keep it: the user decides (delete it or pass --overwrite)


def simulate_dataset(cfg: dict, out: str | Path, *, seed: int = 0, workers: int | None = None,
                     overwrite: bool = False, scheduler: str | None = None, chunk_size: int | None = None,
                     progress: bool = True, log: Callable[[str], None] = _log) -> SimulateResult:
    """Simulate the data set of ``cfg`` into ``out`` (resumable; see the module docstring).

    ``workers``: local processes (None: all usable cores, or this process alone for fewer
    than ``SMALL_RUN`` samples); ``scheduler``: a Dask scheduler address instead.
    ``overwrite`` replaces an output or unfinished run made with another config (an
    unfinished run with the same config is resumed). Returns a :class:`SimulateResult`
    whose ``status`` is ``"done"`` or ``"already done"`` (same config and seed).
    """
    from dgm_eit.files import check_output, output_lock

    out = check_output(out)
    sizes = check_config(cfg, seed)
    # one writer per output: a second simulate on the same file is refused before any work
    with output_lock(out, "dgm-eit simulate"):
        return _simulate_locked(cfg, out, sizes, seed=seed, workers=workers, overwrite=overwrite,
                                scheduler=scheduler, chunk_size=chunk_size, progress=progress, log=log)


def _simulate_locked(cfg, out: Path, sizes, *, seed, workers, overwrite, scheduler, chunk_size, progress,
                     log) -> SimulateResult:
    from dgm_eit.runtime import cpu_count

    cfg_json = json.dumps(cfg, sort_keys=True)
    identity = identity_json(cfg, seed)
    partial_path = storage.partial_path(out)
    auto_workers = not workers
    workers = max(1, int(workers or cpu_count()))

    if out.exists():
        existing = _existing_identity(out)
        if existing == identity and not overwrite:
            return SimulateResult(out, "already done", sizes)
        if not overwrite:
            reason = _describe_difference(existing, identity) if existing else "is not a finished dgm-eit data set"
            raise InputError(f"{out} exists and {reason}; pass --overwrite to replace it")

    partial = _open_resumable(partial_path, identity, overwrite)
    if partial is None:
        # the inversion mesh fixes M and the grid fixes H x W: ask a simulator in this process
        with _report_slow(log, "building meshes"):
            sim = simulator_for(cfg_json)
        settings = sim.gn_settings(seed, log if progress else None)
        partial = storage.PartialFile.create(
            partial_path, config_json=cfg_json, identity=identity, seed=int(seed), sizes=sizes,
            image_size=sim.image_size, n_meas=sim.n_meas, chunk_size=int(chunk_size or DEFAULT_CHUNK_SIZE),
            gn_settings=json.dumps(settings, sort_keys=True), extra_images=sim.extra_images)
    try:
        # workers make the GN images with the settings fixed when the file was started
        cfg_json = json.dumps(apply_settings(cfg, partial.gn_settings), sort_keys=True)
        pending = [Task(*item) for item in partial.pending()]
        total = sum(sizes.values())
        remaining = sum(t.size for t in pending)
        resumed = total - remaining
        if auto_workers and remaining < SMALL_RUN:
            workers = 1  # starting worker processes would cost more than they save
        if workers > 1 or scheduler:
            _SIMULATORS.clear()  # the main process only writes from now on
        if resumed:
            log(f"resuming {partial_path}: {resumed} of {total} samples already done")
        started = time.perf_counter()
        from tqdm import tqdm

        bar = tqdm(total=total, initial=resumed, unit="sample", desc=f"simulate {out.name}",
                   file=sys.stderr, disable=not progress, dynamic_ncols=True, smoothing=0.1)
        from dgm_eit.runtime import sigint_latch

        try:
            with sigint_latch() as interrupted:
                for task, arrays in run_tasks(cfg_json, seed, pending, workers=workers, scheduler=scheduler,
                                              interrupted=interrupted):
                    partial.write_chunk(task.split, task.chunk, arrays)
                    bar.update(task.size)
                    if interrupted.is_set():   # a Ctrl-C swallowed while writing: stop here
                        raise KeyboardInterrupt
        except BrokenProcessPool as err:
            # a worker killed from outside (out of memory, SIGKILL): finished chunks are kept
            raise OSError(f"a simulation worker process died ({err}); re-run the same command to resume") from None
        finally:
            bar.close()
        storage.finalise(partial, out)
    except InputError:
        # a deterministic failure (e.g. Gauss-Newton refusing a sample) before any chunk was
        # finished leaves no partial file that would block the corrected command
        if not partial.has_finished_chunk:
            partial.close()
            partial_path.unlink(missing_ok=True)
        raise
    finally:
        partial.close()
    partial_path.unlink(missing_ok=True)
    return SimulateResult(out, "done", sizes, seconds=time.perf_counter() - started,
                          samples_run=remaining, resumed_samples=resumed)


@contextlib.contextmanager
def _report_slow(log: Callable[[str], None], what: str):
    """Say what took the time when a setup step is slow (meshes at paper size)."""
    started = time.perf_counter()
    yield
    seconds = time.perf_counter() - started
    if seconds > 5:
        log(f"{what}: {seconds:.1f} s")


def _existing_identity(path: Path) -> str | None:
    try:
        with storage.open_dataset(path) as f:
            config = json.loads(f.attrs["config"])
            seed = int(f.attrs["seed"]) if "seed" in f.attrs else None
    except InputError:
        return None
    if seed is None:
        return None
    try:
        return identity_json(config, seed)
    except InputError:   # a data set no registered study owns: not one this command can reuse
        return None


def _describe_difference(old_identity: str, new_identity: str) -> str:
    changes = config_changes(json.loads(old_identity), json.loads(new_identity))
    return f"was simulated with another config ({changes})"


def resolve_simulation_config(cfg: dict, *, anomalies: int | None = None, snr_db: float | None = None) -> dict:
    """Apply the ``simulate`` command's shortcuts (``--anomalies``, ``--snr-db``) with type checks."""
    cfg = copy.deepcopy(cfg)
    if anomalies is not None:
        set_key(cfg, "data.anomalies", int(anomalies))
    if snr_db is not None:
        set_key(cfg, "data.snr_db", float(snr_db))
    return cfg


def default_output(cfg: dict, seed: int) -> Path:
    d = cfg["data"]
    profile = str(cfg.get("profile", "custom")).replace("+", "_").replace("/", "_")
    if "anomalies" not in d:
        return Path("data") / f"{profile}-seed{seed}.h5"
    return Path("data") / f"{profile}-a{d['anomalies']}-snr{float(d['snr_db']):g}-seed{seed}.h5"

