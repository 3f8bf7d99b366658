"""Process-wide settings: threads, device, seeds."""

from __future__ import annotations

import os
import random


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


def resolve_device(name: str = "auto"):
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
