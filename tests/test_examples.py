"""The README's Python quickstart: ``examples/reconstruct_voltages.py`` runs as a script on a
small model the test trains (smoke profile), and gives what the library gives. The KTC
example runs in ``test_ktc_study.py`` on the tiny study made there."""

from __future__ import annotations

import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgm_eit.cli import main
from dgm_eit.figures import DPI
from dgm_eit.reconstruct import check_voltages, reconstruct_voltages
from dgm_eit.runs import load_run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["data.n_train=24", "data.n_val=8", "data.n_test=4", "cnf.flow.epochs=1", "train.progress=false"]


def run_example(name: str, *args) -> None:
    """Run an example as ``python examples/NAME ARGS`` does, in this process."""
    argv = sys.argv
    sys.argv = [str(EXAMPLES / name), *map(str, args)]
    try:
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        sys.argv = argv
    assert stop.value.code == 0


@pytest.fixture(scope="module")
def cnf_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("example")
    sets = [a for s in SMALL for a in ("--set", s)]
    assert main(["simulate", "--profile", "smoke", "--out", str(root / "d.h5"), "--seed", "2", "--quiet"] + sets) == 0
    assert main(["train", "cnf", "--data", str(root / "d.h5"), "--out", str(root / "cnf"), "--profile", "smoke",
                 "--seed", "2", "--no-progress"] + sets) == 0
    return root / "cnf"


def test_quickstart_reconstructs_its_own_voltages_as_the_library_does(cnf_run, tmp_path, capsys):
    out = tmp_path / "out"
    run_example("reconstruct_voltages.py", cnf_run, "--out", out, "--samples", "3")
    assert "MSE per image" in capsys.readouterr().out
    voltages, images, stds = (np.load(out / f"{k}.npy") for k in ("voltages", "images", "stds"))
    _, cfg, info = load_run(cnf_run)
    size = cfg["data"]["image_size"]
    assert voltages.shape == (2, 208) and images.shape == stds.shape == (2, size, size)
    assert np.all(stds >= 0) and np.all(np.isfinite(images))
    # the vectors it made are in the training data's order and units: inside the training range
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_voltages(voltages, info, "example") == []
    # the same call from the library gives the same bits
    direct = reconstruct_voltages(cnf_run, voltages, n_samples=3, seed=0)
    np.testing.assert_array_equal(images, direct["recon"])
    np.testing.assert_array_equal(stds, direct["recon_std"])
    assert Image.open(out / "reconstructions.png").info["dpi"][0] == pytest.approx(DPI, abs=0.1)
    # and a user's own .npy file of voltages goes the same way
    again = tmp_path / "again"
    run_example("reconstruct_voltages.py", cnf_run, "--voltages", out / "voltages.npy", "--out", again,
                "--samples", "3")
    np.testing.assert_array_equal(np.load(again / "images.npy"), images)
    assert (again / "reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quickstart_refuses_voltages_of_another_length(cnf_run, tmp_path):
    np.save(tmp_path / "short.npy", np.ones((2, 100)))
    with pytest.raises(ValueError, match="trained on 208 measurements"):
        run_example("reconstruct_voltages.py", cnf_run, "--voltages", tmp_path / "short.npy", "--out", tmp_path)
