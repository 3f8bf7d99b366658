"""Shared fixtures. ``tiny_dataset`` writes a synthetic file in the data-set layout
(docs/DESIGN.md) without the physics, so model and trainer tests stay fast; tests of the
simulator make real files with ``dgm-eit simulate --profile smoke``."""

from __future__ import annotations

import json
import signal

import h5py
import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def _circle_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    c = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(c, -c)
    inside = x**2 + y**2 <= 1
    images = np.where(inside, 1.0, 0.0)[None].repeat(n, axis=0)
    for img in images:
        for value in (0.5, 1.5):
            cx, cy = rng.uniform(-0.5, 0.5, size=2)
            r = rng.uniform(0.15, 0.3)
            img[(x - cx) ** 2 + (y - cy) ** 2 <= r**2] = value
    return images.astype(np.float32)


def write_tiny_dataset(path, size=16, n_meas=208, n=(24, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    forward = rng.normal(size=(size * size, n_meas)) / size
    with h5py.File(path, "w") as f:
        f.attrs["config"] = json.dumps({"data": {"image_size": size}, "synthetic": True})
        f.attrs["format_version"] = 1
        f.attrs["dgm_eit_version"] = "test"
        for split, count in zip(("train", "val", "test"), n):
            sigma = _circle_images(rng, count, size)
            v_clean = sigma.reshape(count, -1) @ forward
            v = v_clean + 0.01 * rng.normal(size=v_clean.shape)
            # a blurred, biased truth plays the Gauss-Newton image
            gn = 0.5 * sigma + 0.25 * (np.roll(sigma, 1, axis=1) + np.roll(sigma, -1, axis=2))
            g = f.create_group(split)
            g["sigma"] = sigma
            g["v"] = v.astype(np.float32)
            g["v_clean"] = v_clean.astype(np.float32)
            g["gn"] = gn.astype(np.float32)
        f.attrs["complete"] = True
    return path


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_tiny_dataset(tmp_path / "tiny.h5")


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt in this process during the test, as in a terminal, even
    when the suite runs where SIGINT is ignored (started as a background job of a script)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def ktc_tiny_study(tmp_path_factory):
    """``(directory, argv)``: a finished ``dgm-eit run --profile ktc`` study on the small meshes
    and tiny data of ``test_ktc_study`` (every method, levels 1 and 4, --seed 1), made once for
    the tests of the study, the entry point and the pack command."""
    from dgm_eit.cli import main
    from test_ktc_study import TINY_RUN

    out = tmp_path_factory.mktemp("ktc_tiny") / "study"
    argv = ["run", "--profile", "ktc", "--out", str(out), "--seed", "1"] + [a for s in TINY_RUN for a in ("--set", s)]
    assert main(argv) == 0
    return out, argv
