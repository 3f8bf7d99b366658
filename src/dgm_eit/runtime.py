"""Process-wide settings: threads, device, seeds."""

from __future__ import annotations

import contextlib
import os
import random

from dgm_eit.config import check_int
from dgm_eit.errors import InputError


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def limit_threads(n: int | None = None) -> int:
    """Cap BLAS/OpenMP and torch threads at ``n`` (default: the usable cores).

    Oversubscribed BLAS threads made dense solves 5-10x slower on a 2-core machine,
    so worker processes call this with ``n=1``.
    """
    n = max(1, n or cpu_count())
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def blas_report() -> tuple[list, str]:
    """The loaded BLAS libraries (threadpoolctl) as JSON-able dicts and as one line of text."""
    import os

    from threadpoolctl import threadpool_info

    blas = []
    for info in threadpool_info():
        if info.get("user_api") != "blas":
            continue
        owner = os.path.basename(os.path.dirname(info.get("filepath") or "")) or "?"
        blas.append({"internal_api": info.get("internal_api"), "version": info.get("version"),
                     "num_threads": info.get("num_threads"), "library": owner,
                     "architecture": info.get("architecture")})
    text = ", ".join(f"{b['internal_api']} {b['version']} ({b['library']}, {b['num_threads']} thread(s))"
                     for b in blas) or "none found"
    return blas, text


def resolve_device(name: str = "auto"):
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device {name!r} is not a device; choose cpu, cuda, cuda:N or auto")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"device {name!r} requested but MPS is not available")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    return device


def forkserver_context(preload: list[str]):
    """The multiprocessing context of a pool of numerical workers: forkserver where the platform
    has it, each worker forked from a server that has imported ``preload`` once (fork would
    copy the caller's BLAS thread pools, torch's and open HDF5 handles); spawn elsewhere."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return context


def stop_pool(pool, grace: float = 0.0, interrupt: bool = False) -> None:
    """Stop a ``ProcessPoolExecutor`` now, without draining it: cancel the queued tasks,
    send the workers SIGINT when ``interrupt`` (so a training job saves its checkpoint), give
    them ``grace`` seconds to exit by themselves, then terminate them. For Ctrl-C and
    failures; results already received are the caller's to keep."""
    import signal
    import time

    processes = list((getattr(pool, "_processes", None) or {}).values())
    if interrupt:
        for process in processes:
            if process.is_alive():
                try:
                    os.kill(process.pid, signal.SIGINT)
                except OSError:
                    pass
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
    # A worker ended while sending its result leaves the pool's manager thread reading a
    # message that never completes, and interpreter exit joins that thread: the command hung
    # after Ctrl-C (CI, issue 21). The main process holds the last write end of the result
    # pipe; closing it turns that read into EOF, which the manager takes as a broken pool.
    result_queue = getattr(pool, "_result_queue", None)
    if result_queue is not None:
        result_queue._writer.close()
    pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------
# worker processes die with the main process

_lifeline = None   # in a pool worker: the read end of a pipe only the main process can write


def exit_with_parent(parent_alive) -> None:
    """End this worker process when the main process dies, even by SIGKILL, and remember the
    lifeline so :func:`parent_gone` can tell.

    Pool workers block on a task queue whose write end they hold themselves, so they never
    see the parent go: they would finish their task, write into a directory whose lock is
    gone, and idle forever. ``parent_alive`` is the read end of a pipe whose only write end
    the main process holds (``multiprocessing.Pipe(duplex=False)``, passed to the pool's
    initializer): it reads EOF the moment that process is gone, whatever killed it."""
    import threading

    global _lifeline
    _lifeline = parent_alive

    def watch():
        try:
            parent_alive.recv()
        except (EOFError, OSError):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="dgm-eit-parent-watch", daemon=True).start()


def parent_gone() -> bool:
    """True in a pool worker whose main process has died (the lifeline reads EOF; the main
    process never writes to it). Always False in the main process."""
    if _lifeline is None:
        return False
    try:
        return bool(_lifeline.poll())
    except (OSError, ValueError):   # closed: the watch thread is ending this process
        return True


@contextlib.contextmanager
def sigint_held_back():
    """Hold SIGINT (and SIGTERM) back from this thread for the block; one that came meanwhile
    is raised when the block ends. Processes started in the block begin with SIGINT blocked
    (the mask is inherited), so a terminal's Ctrl-C, which reaches the whole process group,
    cannot interrupt a pool worker while it is still starting (a traceback per worker); the
    worker's initializer decides what SIGINT means there (:func:`release_sigint`).

    The mask alone does not hold a signal back from Python code: the kernel hands it to
    another thread of the process (a pool's manager thread), and Python then runs its
    handler in the main thread anyway, in the block. A KeyboardInterrupt between starting a
    worker and writing its start-up data left that worker reading nothing ("EOFError: Ran
    out of input" after the run had stopped). So the main thread's handlers only note the
    signal until the block ends."""
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask"):   # pragma: no cover - Windows
        yield
        return
    came: list[tuple[int, object]] = []
    deferred = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if callable(handler):
                deferred[signum] = handler
                signal.signal(signum, lambda number, frame: came.append((number, frame)))
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        for signum, handler in deferred.items():
            signal.signal(signum, handler)
        for signum, frame in came[:1]:   # the first one decides (Ctrl-C twice is one stop)
            deferred[signum](signum, frame)


def release_sigint(handler) -> None:
    """In a process started under :func:`sigint_held_back`: install ``handler`` for SIGINT,
    then let SIGINT through (one held back meanwhile meets the new handler)."""
    import signal

    signal.signal(signal.SIGINT, handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


# ---------------------------------------------------------------------------------
# stop signals


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``): handled like Ctrl-C, so locks are released and partial work
    is kept resumable; the command exits 143."""


@contextlib.contextmanager
def stop_signals():
    """Ctrl-C raises KeyboardInterrupt and SIGTERM raises :class:`Terminated` in the main
    thread for the block, then the previous handlers come back.

    A shell that starts a command in the background without job control (``cmd &`` in a
    script or a harness) makes it ignore SIGINT, and Python keeps it ignored: Ctrl-C or
    ``kill -INT`` was lost and a run went on to its end (issue 21). Our commands are
    resumable, so stopping them on request is always safe: SIGINT is honoured however the
    process was started. Without a handler, SIGTERM would end the process at once, leaving
    its lock file and its workers' checkpoints unwritten."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        # through the SIGINT handler in place (sigint_latch's remembers it), as Terminated
        handler = signal.getsignal(signal.SIGINT)
        try:
            if callable(handler):
                handler(signal.SIGINT, frame)
        except KeyboardInterrupt:
            pass
        raise Terminated

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler set outside Python, which cannot be put back; the default then
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


MAX_SEED = 2**48


@contextlib.contextmanager
def sigint_latch():
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered in the yielded
    ``threading.Event``. A KeyboardInterrupt that lands inside a finaliser or a library
    callback is swallowed ("Exception ignored in ..."), and the job would run to the end; a
    loop that checks the event at its safe points raises it again there. Only the main
    thread's default handler is replaced (and restored); elsewhere the event never fires."""
    import signal
    import threading

    event = threading.Event()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield event
        return

    def handler(signum, frame):
        event.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def check_seed(seed) -> int:
    """The one seed rule of every command: an integer in [0, 2**48).

    The bound leaves room for derived seeds (``1000 * seed + k``) inside the 64-bit range of
    numpy and torch, and HDF5 stores the seed as int64."""
    if isinstance(seed, bool) or int(seed) != seed or not 0 <= int(seed) < MAX_SEED:
        raise InputError(f"--seed must be an integer in [0, 2**48), got {seed}")
    return int(seed)


def check_seed_settings(run: dict) -> int:
    """A study's ``[run]`` seed count (returned) and bootstrap size, checked before any work."""
    check_int(run["bootstrap_resamples"], "run.bootstrap_resamples", 100)
    return check_int(run["seeds"], "run.seeds", 1, "training runs per model")


def training_seed(seed: int, model: str, data: str, replica: int, candidate: int = 0) -> int:
    """The seed of training run ``replica`` (0, 1, ...) of ``model`` on the data set ``data``
    in a study started with ``--seed seed``: the first 6 bytes of
    SHA-256("<seed>/<model>/<data>/<replica>"), an integer in [0, 2**48). Where a replica is
    the best of several candidates (``run.best_of``), candidate j > 0 hashes
    "<seed>/<model>/<data>/<replica>/candidate<j>"; candidate 0 is the replica's own seed.

    A hash, so the seeds of different models, data sets and replicas are unrelated (no model
    shares its initial weights or data order with another) and any machine derives the same."""
    import hashlib

    suffix = f"/candidate{int(candidate)}" if candidate else ""
    key = f"{check_seed(seed)}/{model}/{data}/{int(replica)}{suffix}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:6], "big")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
