"""Process-wide settings: threads, device, seeds."""

from __future__ import annotations

import contextlib
import os
import random

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
    pool.shutdown(wait=False, cancel_futures=True)


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
    seeds, resamples = run["seeds"], run["bootstrap_resamples"]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise InputError(f"run.seeds must be an integer >= 1 (training runs per model), got {seeds!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise InputError(f"run.bootstrap_resamples must be an integer >= 100, got {resamples!r}")
    return seeds


def training_seed(seed: int, model: str, data: str, replica: int) -> int:
    """The seed of training run ``replica`` (0, 1, ...) of ``model`` on the data set ``data``
    in a study started with ``--seed seed``: the first 6 bytes of
    SHA-256("<seed>/<model>/<data>/<replica>"), an integer in [0, 2**48).

    A hash, so the seeds of different models, data sets and replicas are unrelated (no model
    shares its initial weights or data order with another) and any machine derives the same."""
    import hashlib

    key = f"{check_seed(seed)}/{model}/{data}/{int(replica)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:6], "big")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
