"""The command line against the project's must-hold rules (docs/DESIGN.md, Conventions).

Bad input (unknown config key or profile, NaN or mis-sized voltages, NaN predictions,
wrong shapes, a truncated data file, a corrupt checkpoint or weights file, a missing file)
must give exactly one line on stderr naming the problem, a non-zero exit and no output
that looks finished. Every command that draws random numbers takes ``--seed`` and the
same seed gives the same result.

Everything runs in-process through ``dgm_eit.cli.main`` on one tiny simulated data set, one
tiny CNF run (a sampling model, so seeds matter for reconstruction too) and one tiny score
run (CSD*, tune-t0). Subprocess tests check the real entry point: no traceback on bad input,
and Ctrl-C during simulate/train gives one line, exit 130 and a state that resumes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from dgm_eit.cli import build_parser, main

SMALL_DATA = ["--set", "data.n_train=16", "--set", "data.n_val=4", "--set", "data.n_test=4"]
# one optimiser step per epoch on 16 training images; one thread, because two threads on a
# loaded 2-core machine made each step ~30x slower
TINY_CNF = ["--profile", "smoke", "--set", "cnf.flow.epochs=1", "--set", "cnf.n_samples=2",
            "--set", "train.threads=1", "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    # DGM_EIT_DEBUG turns the one-line error into a traceback
    monkeypatch.delenv("DGM_EIT_DEBUG", raising=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny real data set and a trained tiny CNF run, shared by the module's tests."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data.h5"
    assert main(["simulate", "--profile", "smoke", *SMALL_DATA, "--out", str(data), "--workers", "1",
                 "--quiet", "--seed", "1"]) == 0
    run = root / "run-cnf"
    assert main(["train", "cnf", "--data", str(data), "--out", str(run), *TINY_CNF, "--seed", "0"]) == 0
    assert (run / "model.safetensors").is_file()
    with h5py.File(data, "r") as f:
        n_meas = f["test/v"].shape[1]
        size = f["test/sigma"].shape[1]
        v_test = f["test/v"][...]
    return {"root": root, "data": data, "run": run, "n_meas": n_meas, "size": size, "v_test": v_test}


TINY_SCORE = ["--profile", "smoke", "--set", "score.score.epochs=1", "--set", "train.threads=1",
              "--no-progress", "--device", "cpu"]
# a short CSD* sweep: 2 insertion times x 2 reverse steps on 2 validation images
TINY_SWEEP = ["--t0", "0.3,0.5", "--steps", "2", "--corrector-steps", "0", "--n-val", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def score_run(work):
    """A tiny trained score prior (one step): the model behind CSD* and tune-t0."""
    run = work["root"] / "run-score"
    assert main([str(a) for a in ["train", "score", "--data", work["data"], "--out", run, *TINY_SCORE]]) == 0
    return run


def _copy_run(source, tmp_path):
    # tune-t0 writes tuned_csd.json into its run, which later reconstructions would read
    run = tmp_path / source.name
    shutil.copytree(source, run)
    return run


@pytest.fixture(scope="module")
def truncated(work):
    """The real data set cut to 60 % of its bytes, as an interrupted copy would leave it."""
    path = work["root"] / "truncated.h5"
    raw = work["data"].read_bytes()
    path.write_bytes(raw[: int(len(raw) * 0.6)])
    return path


def fails(capsys, argv, *words) -> str:
    """Run ``dgm-eit argv``; assert exit 2 and one stderr line naming ``words``."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"{argv[0]} exited {rc} on bad input, not 2; stderr: {err!r}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err!r}"
    line = lines[0]
    assert line.startswith(f"dgm-eit {argv[0]}: error:"), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not named in {line!r}"
    return line


def leftovers(directory, stem) -> list[str]:
    """Files in ``directory`` whose name starts with ``stem`` (outputs, .tmp, .partial)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(stem)) if directory.is_dir() else []


def _save(directory, array, name="v.npy"):
    path = directory / name
    np.save(path, array)
    return path



# ---------------------------------------------------------------------------------
# config: unknown key, unknown profile

PROFILE_COMMANDS = {
    "simulate": lambda out: ["simulate", "--out", out / "x.h5", "--workers", "1", "--quiet"],
    "train": lambda out: ["train", "cnf", "--data", out / "missing.h5", "--out", out / "x-run"],
    "run": lambda out: ["run", "--out", out / "x-run"],
    "bench": lambda out: ["bench", "simulate", "--samples", "2", "--workers", "1"],
}


@pytest.mark.parametrize("command", sorted(PROFILE_COMMANDS))
def test_unknown_config_key_is_refused_before_any_output(command, tmp_path, capsys):
    argv = PROFILE_COMMANDS[command](tmp_path)
    line = fails(capsys, [*argv, "--profile", "smoke", "--set", "data.n_trian=4"], "data.n_trian")
    assert "data.n_train" in line   # the did-you-mean hint
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", sorted(PROFILE_COMMANDS))
def test_unknown_profile_is_refused_before_any_output(command, tmp_path, capsys):
    argv = PROFILE_COMMANDS[command](tmp_path)
    fails(capsys, [*argv, "--profile", "smokey"], "smokey")
    assert list(tmp_path.iterdir()) == []


def test_wrongly_typed_config_value_is_refused(tmp_path, capsys):
    fails(capsys, ["simulate", "--out", tmp_path / "x.h5", "--profile", "smoke", "--set", "data.n_train=many"],
          "data.n_train")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------
# reconstruct --voltages: NaN, wrong length, wrong rank, missing file

def _reconstruct_voltages(work, tmp_path, v):
    path = tmp_path / "v.npy"
    np.save(path, v)
    return ["reconstruct", "--run", work["run"], "--voltages", path, "--out", tmp_path / "recon.npy"]


def test_reconstruct_refuses_nan_voltages(work, tmp_path, capsys):
    v = work["v_test"][:2].copy()
    v[1, 5] = np.nan
    fails(capsys, _reconstruct_voltages(work, tmp_path, v), "v.npy", "nan", "row 1, column 5")
    assert leftovers(tmp_path, "recon") == []


def test_reconstruct_refuses_infinite_voltages(work, tmp_path, capsys):
    v = work["v_test"][0].copy()
    v[0] = np.inf
    fails(capsys, _reconstruct_voltages(work, tmp_path, v), "v.npy", "infinite")
    assert leftovers(tmp_path, "recon") == []


@pytest.mark.parametrize("length_change", [-1, 1])
def test_reconstruct_refuses_wrong_voltage_length(work, tmp_path, capsys, length_change):
    m = work["n_meas"] + length_change
    v = np.ones((2, m), dtype=np.float32)
    fails(capsys, _reconstruct_voltages(work, tmp_path, v), str(m), str(work["n_meas"]))
    assert leftovers(tmp_path, "recon") == []


def test_reconstruct_refuses_three_dimensional_voltages(work, tmp_path, capsys):
    v = np.ones((2, 1, work["n_meas"]), dtype=np.float32)
    fails(capsys, _reconstruct_voltages(work, tmp_path, v), "shape")
    assert leftovers(tmp_path, "recon") == []


def test_reconstruct_refuses_a_voltage_file_that_is_not_npy(work, tmp_path, capsys):
    path = tmp_path / "v.npy"
    path.write_text("0.1 0.2 0.3\n")
    fails(capsys, ["reconstruct", "--run", work["run"], "--voltages", path, "--out", tmp_path / "recon.npy"],
          str(path))
    assert leftovers(tmp_path, "recon") == []


def test_library_reconstruct_voltages_refuses_nan_before_gauss_newton(work):
    from dgm_eit.errors import InputError
    from dgm_eit.reconstruct import reconstruct_voltages

    v = work["v_test"][:1].copy()
    v[0, 0] = np.nan
    with pytest.raises(InputError, match="voltages contain NaN"):
        reconstruct_voltages(work["run"], v, device="cpu")


def test_reconstruct_user_voltages_works(work, tmp_path, capsys):
    """The good path, so the refusals above are not refusing everything."""
    out = tmp_path / "recon.npy"
    assert main(["reconstruct", "--run", str(work["run"]), "--voltages", str(_save(tmp_path, work["v_test"][:2])),
                 "--out", str(out), "--device", "cpu"]) == 0
    recon = np.load(out)
    assert recon.shape == (2, work["size"], work["size"]) and np.all(np.isfinite(recon))
    assert leftovers(tmp_path, "recon") == ["recon.npy"]


# ---------------------------------------------------------------------------------
# evaluate: NaN / negative predictions, wrong shapes

def _truth(work):
    with h5py.File(work["data"], "r") as f:
        return f["test/sigma"][...]


def test_evaluate_refuses_nan_predictions(work, tmp_path, capsys):
    pred = _truth(work).copy()
    pred[1, 3, 3] = np.nan
    fails(capsys, ["evaluate", "--pred", _save(tmp_path, pred, "pred.npy"), "--data", work["data"]],
          "pred.npy", "nan", "sample 1")


def test_evaluate_refuses_nan_in_an_hdf5_recon_file(work, tmp_path, capsys):
    pred = _truth(work).copy()
    pred[0, 0, 0] = np.nan
    path = tmp_path / "pred.h5"
    with h5py.File(path, "w") as f:
        f["recon"] = pred
    fails(capsys, ["evaluate", "--pred", path, "--data", work["data"]], str(path), "nan")


def test_evaluate_refuses_non_numeric_predictions(work, tmp_path, capsys):
    pred = np.full(_truth(work).shape, "x")
    fails(capsys, ["evaluate", "--pred", _save(tmp_path, pred, "pred.npy"), "--data", work["data"]],
          "pred.npy", "real numbers")


def test_evaluate_scores_negative_predictions(work, tmp_path, capsys):
    """A regression network may undershoot below zero; that is a poor prediction, not bad
    input, and must be scored (its error counted), not refused."""
    truth = _truth(work)
    pred = truth - 1.2      # mostly negative inside the disk
    assert (pred < 0).any()
    path = _save(tmp_path, pred.astype(np.float32), "pred.npy")
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(path), "--data", str(work["data"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == len(truth)
    # the same error of 1.2 at every pixel, inside the disk or out: MSE 1.44 under any mask
    assert result["metrics"]["MSE"]["mean"] == pytest.approx(1.44, rel=1e-4)
    assert all(np.isfinite(m["mean"]) for m in result["metrics"].values())


@pytest.mark.parametrize("shape_change", ["count", "size", "rank"])
def test_evaluate_refuses_wrong_shapes(work, tmp_path, capsys, shape_change):
    truth = _truth(work)
    n, h, w = truth.shape
    pred = {"count": np.ones((n + 1, h, w)), "size": np.ones((n, h + 1, w + 1)), "rank": np.ones((n, h * w))}
    line = fails(capsys, ["evaluate", "--pred", _save(tmp_path, pred[shape_change].astype(np.float32), "pred.npy"),
                          "--data", work["data"]], "pred.npy")
    expected = {"count": str(n + 1), "size": f"{h + 1}x{w + 1}", "rank": "shape"}[shape_change]
    assert expected in line


# ---------------------------------------------------------------------------------
# truncated data file, given to every command that reads one

def test_inspect_refuses_truncated_data(truncated, capsys):
    fails(capsys, ["inspect", truncated], str(truncated), "truncated")


def test_show_refuses_truncated_data(truncated, tmp_path, capsys):
    out = tmp_path / "sample.png"
    fails(capsys, ["show", truncated, "--out", out], str(truncated), "truncated")
    assert leftovers(tmp_path, "sample") == []


def test_train_refuses_truncated_data(truncated, tmp_path, capsys):
    out = tmp_path / "run"
    fails(capsys, ["train", "cnf", "--data", truncated, "--out", out, *TINY_CNF], str(truncated), "truncated")
    # no run directory: a config.json left behind would tie --out to the bad data path
    assert not out.exists()


def test_reconstruct_refuses_truncated_data(work, truncated, tmp_path, capsys):
    out = tmp_path / "recon.h5"
    fails(capsys, ["reconstruct", "--run", work["run"], "--data", truncated, "--out", out, "--device", "cpu"],
          str(truncated), "truncated")
    assert leftovers(tmp_path, "recon") == []


def _damaged_copy(work, tmp_path, damage):
    path = tmp_path / f"{damage}.h5"
    if damage == "not-hdf5":
        path.write_text("sigma,v\n1,2\n")
        return path
    shutil.copy(work["data"], path)
    with h5py.File(path, "r+") as f:
        if damage == "incomplete":      # what an interrupted simulation leaves
            f.attrs["complete"] = False
        elif damage == "no-test-split":
            del f["test"]
    return path


@pytest.mark.parametrize("damage,named", [("not-hdf5", "not a readable HDF5"), ("incomplete", "incomplete"),
                                          ("no-test-split", "'test'")])
def test_damaged_data_files_are_refused_by_every_reader(work, tmp_path, capsys, damage, named):
    path = _damaged_copy(work, tmp_path, damage)
    pred = _save(tmp_path, _truth(work), "pred.npy")
    for argv in (["inspect", path], ["show", path, "--out", tmp_path / "s.png"],
                 ["train", "cnf", "--data", path, "--out", tmp_path / "run", *TINY_CNF],
                 ["reconstruct", "--run", work["run"], "--data", path, "--out", tmp_path / "r.h5", "--device", "cpu"],
                 ["evaluate", "--pred", pred, "--data", path]):
        fails(capsys, argv, str(path), named)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "pred.npy"])


def test_nan_inside_a_data_set_is_named_by_train_and_reconstruct(work, tmp_path, capsys):
    """A NaN in the arrays used to reach training as a NaN loss 'lower the lr' advice."""
    path = tmp_path / "nan.h5"
    shutil.copy(work["data"], path)
    with h5py.File(path, "r+") as f:
        for split, sample in (("train", 2), ("test", 1)):
            v = f[split]["v"][...]
            v[sample, 0] = np.nan
            f[split]["v"][...] = v
    fails(capsys, ["train", "cnf", "--data", path, "--out", tmp_path / "run", *TINY_CNF],
          str(path), "train/v", "nan", "sample 2")
    assert not (tmp_path / "run" / "model.safetensors").exists()
    fails(capsys, ["reconstruct", "--run", work["run"], "--data", path, "--out", tmp_path / "r.h5", "--device", "cpu"],
          str(path), "test/v", "nan", "sample 1")
    assert leftovers(tmp_path, "r.h5") == []


def test_tune_t0_refuses_truncated_data_and_records_nothing(score_run, truncated, tmp_path, capsys):
    run = _copy_run(score_run, tmp_path)
    fails(capsys, ["tune-t0", "--run", run, "--data", truncated, *TINY_SWEEP], str(truncated), "truncated")
    assert not list(run.glob("tuned_csd*"))


def test_evaluate_refuses_truncated_data(work, truncated, tmp_path, capsys):
    pred = _save(tmp_path, _truth(work), "pred.npy")
    fails(capsys, ["evaluate", "--pred", pred, "--data", truncated], str(truncated), "truncated")


def test_evaluate_refuses_truncated_prediction_file(work, tmp_path, capsys):
    good = tmp_path / "pred.h5"
    with h5py.File(good, "w") as f:
        f["recon"] = _truth(work)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    fails(capsys, ["evaluate", "--pred", cut, "--data", work["data"]], str(cut))


def test_evaluate_refuses_truncated_npy_prediction(work, tmp_path, capsys):
    good = _save(tmp_path, _truth(work), "good.npy")
    cut = tmp_path / "cut.npy"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    fails(capsys, ["evaluate", "--pred", cut, "--data", work["data"]], str(cut))


# ---------------------------------------------------------------------------------
# corrupt checkpoint (train) and corrupt weights (reconstruct)

@pytest.fixture(scope="module")
def paused_run(work):
    """A CNF run stopped after its first step with a resumable checkpoint."""
    out = work["root"] / "run-paused"
    # --max-minutes ~0 stops after the first step
    assert main([str(a) for a in [*_three_epoch_train(work, out), "--max-minutes", "1e-9"]]) == 0
    assert (out / "checkpoints" / "last.pt").is_file() and not (out / "model.safetensors").exists()
    return out


def _three_epoch_train(work, out):
    return ["train", "cnf", "--data", work["data"], "--out", out, *TINY_CNF, "--set", "cnf.flow.epochs=3"]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_train_refuses_a_corrupt_checkpoint_and_writes_no_model(work, paused_run, tmp_path, capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(paused_run, out)
    checkpoint = out / "checkpoints" / "last.pt"
    raw = checkpoint.read_bytes()
    damaged = {"garbage": b"this is not a torch checkpoint" * 10, "truncated": raw[: len(raw) // 2]}
    checkpoint.write_bytes(damaged[damage])
    fails(capsys, _three_epoch_train(work, out), str(checkpoint))
    assert not (out / "model.safetensors").exists() and not (out / "done").exists()


def test_train_resumes_an_undamaged_checkpoint(work, paused_run, tmp_path):
    """The good path next to the refusals above: the same command finishes the paused run."""
    out = tmp_path / "run"
    shutil.copytree(paused_run, out)
    assert main([str(a) for a in _three_epoch_train(work, out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "done").is_file()
    epochs = [line.split(",")[1] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]   # each epoch once: nothing lost or repeated by the resume


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_reconstruct_refuses_corrupt_weights(work, tmp_path, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(work["run"], run)
    weights = run / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes({"garbage": b"\x00\x01garbage" * 100, "truncated": raw[: len(raw) // 2],
                         "empty": b""}[damage])
    out = tmp_path / "recon.h5"
    fails(capsys, ["reconstruct", "--run", run, "--data", work["data"], "--out", out, "--device", "cpu"],
          str(weights))
    assert leftovers(tmp_path, "recon") == []


def test_reconstruct_refuses_a_run_without_weights(work, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(work["run"], run)
    (run / "model.safetensors").unlink()
    fails(capsys, ["reconstruct", "--run", run, "--data", work["data"], "--out", tmp_path / "recon.h5"],
          "model.safetensors")
    assert leftovers(tmp_path, "recon") == []


# ---------------------------------------------------------------------------------
# missing files

def test_missing_files_are_named(work, tmp_path, capsys):
    missing = tmp_path / "nothing-here.h5"
    cases = [
        ["inspect", missing],
        ["show", missing, "--out", tmp_path / "s.png"],
        ["train", "cnf", "--data", missing, "--out", tmp_path / "run", *TINY_CNF],
        ["reconstruct", "--run", work["run"], "--data", missing, "--out", tmp_path / "r.h5"],
        ["reconstruct", "--run", tmp_path / "no-run", "--data", work["data"], "--out", tmp_path / "r.h5"],
        ["reconstruct", "--run", work["run"], "--voltages", tmp_path / "no.npy", "--out", tmp_path / "r.npy"],
        ["evaluate", "--pred", missing, "--data", work["data"]],
        ["evaluate", "--pred", _save(tmp_path, _truth(work), "p.npy"), "--data", missing],
        ["tune-t0", "--run", tmp_path / "no-run", "--data", work["data"]],
    ]
    for argv in cases:
        named = next(str(a) for a in argv if "nothing-here" in str(a) or "no-run" in str(a) or "no.npy" in str(a))
        fails(capsys, argv, named)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npy"]


def test_tune_t0_refuses_a_run_that_is_not_a_score_model(work, capsys):
    fails(capsys, ["tune-t0", "--run", work["run"], "--data", work["data"], "--device", "cpu"], "score")


# ---------------------------------------------------------------------------------
# seeds

RANDOM_COMMANDS = [["simulate"], ["train", "cnf"], ["reconstruct"], ["run"], ["tune-t0"],
                   ["bench", "fem"], ["bench", "simulate"]]


def _subparser(parser, names):
    for name in names:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("names", RANDOM_COMMANDS, ids=" ".join)
def test_every_command_that_draws_random_numbers_takes_seed(names):
    parser = _subparser(build_parser(), [n for n in names if n != "cnf"])
    assert "--seed" in parser._option_string_actions


HUGE_SEED = str(10**20)   # beyond 64 bits


def test_out_of_range_seed_is_refused_before_any_output(work, tmp_path, capsys):
    cases = [
        ["simulate", "--profile", "smoke", *SMALL_DATA, "--out", tmp_path / "d.h5", "--workers", "1", "--quiet"],
        ["train", "cnf", "--data", work["data"], "--out", tmp_path / "run", *TINY_CNF],
        ["reconstruct", "--run", work["run"], "--data", work["data"], "--out", tmp_path / "r.h5", "--device", "cpu"],
        ["tune-t0", "--run", work["run"], "--data", work["data"], "--device", "cpu"],
        ["run", "--profile", "smoke", "--out", tmp_path / "exp"],
    ]
    for argv in cases:
        fails(capsys, [*argv, "--seed", HUGE_SEED], "--seed", HUGE_SEED)
    assert list(tmp_path.iterdir()) == []


def test_run_refuses_a_negative_seed_before_writing_a_report(tmp_path, capsys):
    """It used to fail all 38 stages in one long line and still write report.md."""
    fails(capsys, ["run", "--profile", "smoke", "--out", tmp_path / "exp", "--seed", "-1"], "--seed", "-1")
    assert not (tmp_path / "exp").exists()


def test_bench_fem_names_a_negative_seed(capsys):
    fails(capsys, ["bench", "fem", "--seed", "-1", "--repeat", "1"], "--seed", "-1")


def test_simulate_same_seed_same_data(tmp_path):
    sizes = ["--set", "data.n_train=3", "--set", "data.n_val=1", "--set", "data.n_test=1"]

    def simulate(name, seed):
        path = tmp_path / name
        assert main(["simulate", "--profile", "smoke", *sizes, "--out", str(path), "--workers", "1", "--quiet",
                     "--seed", str(seed)]) == 0
        with h5py.File(path, "r") as f:
            return {f"{s}/{k}": f[s][k][...] for s in ("train", "val", "test") for k in ("sigma", "v", "gn")}

    a, b, c = simulate("a.h5", 7), simulate("b.h5", 7), simulate("c.h5", 8)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(a["train/v"], c["train/v"])


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_train_same_seed_same_weights(work, tmp_path):
    def train(name, seed):
        out = tmp_path / name
        assert main([str(a) for a in ["train", "cnf", "--data", work["data"], "--out", out, *TINY_CNF,
                                      "--seed", seed]]) == 0
        return _weights(out / "model.safetensors")

    a, b = train("a", 3), train("b", 3)
    reference = _weights(work["run"] / "model.safetensors")   # seed 0
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], reference[k]) for k in a)


def test_reconstruct_same_seed_same_samples(work, tmp_path):
    def reconstruct(name, seed):
        out = tmp_path / name
        assert main([str(a) for a in ["reconstruct", "--run", work["run"], "--data", work["data"], "--out", out,
                                      "--samples", 2, "--device", "cpu", "--seed", seed]]) == 0
        with h5py.File(out, "r") as f:
            return f["recon"][...], int(f.attrs["seed"])

    (a, seed_a), (b, _), (c, _) = reconstruct("a.h5", 5), reconstruct("b.h5", 5), reconstruct("c.h5", 6)
    assert seed_a == 5
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)   # the CNF samples, so another seed gives other images


def test_reconstruct_with_csd_same_seed_same_images(work, score_run, tmp_path):
    def reconstruct(name, seed):
        out = tmp_path / name
        assert main([str(a) for a in ["reconstruct", "--run", score_run, "--data", work["data"], "--out", out,
                                      "--sampler", "csd", "--limit", 2, "--device", "cpu", "--seed", seed]]) == 0
        with h5py.File(out, "r") as f:
            return f["recon"][...]

    a, b, c = reconstruct("a.h5", 5), reconstruct("b.h5", 5), reconstruct("c.h5", 6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_reconstruction_file_records_the_command_that_remakes_it(work, score_run, tmp_path):
    """t0 and steps reach the sampler, and every option the file records goes back into its
    command (run here, so its paths are the ones given)."""
    import shlex

    from dgm_eit.reconstruct import reconstruct_command
    from dgm_eit.results import read_recon, recon_attrs

    def reconstruct(name, *options):
        out = tmp_path / name
        assert main([str(a) for a in ["reconstruct", "--run", score_run, "--data", work["data"], "--out", out,
                                      "--sampler", "csd", "--limit", 2, "--samples", 2, "--batch-size", 1,
                                      "--threads", 1, "--device", "cpu", "--seed", 5, *options]]) == 0
        return out

    made = reconstruct("a.h5", "--t0", 0.3, "--steps", 2)
    attrs = recon_attrs(made)
    assert {k: attrs[k] for k in ("t0", "n_steps", "n_samples", "sampler", "limit", "batch_size", "threads",
                                  "device", "weights", "seed")} == {
        "t0": 0.3, "n_steps": 2, "n_samples": 2, "sampler": "csd", "limit": 2, "batch_size": 1, "threads": 1,
        "device": "cpu", "weights": "model", "seed": 5}
    command = reconstruct_command(attrs, run=score_run, data=work["data"], out=tmp_path / "again.h5")
    assert command.startswith("dgm-eit reconstruct ") and " --t0 0.3 --steps 2 " in command
    assert main(shlex.split(command)[1:]) == 0
    for mine, theirs in zip(read_recon(tmp_path / "again.h5"), read_recon(made)):
        assert np.array_equal(mine, theirs)
    other = read_recon(reconstruct("b.h5", "--t0", 0.5, "--steps", 2))[0]
    assert not np.array_equal(other, read_recon(made)[0])
    with pytest.raises(ValueError, match="records no seed"):
        reconstruct_command({"split": "test"}, run="r", data="d", out="o")


@pytest.mark.parametrize("option, value, words", [("--t0", "0", ["--t0", "(0, 1]"]), ("--t0", "1.5", ["--t0"]),
                                                  ("--steps", "0", ["--steps", ">= 1"]),
                                                  ("--threads", "0", ["--threads", ">= 1"])])
def test_reconstruct_refuses_bad_sampler_steps_and_threads(work, score_run, tmp_path, capsys, option, value, words):
    fails(capsys, ["reconstruct", "--run", score_run, "--data", work["data"], "--out", tmp_path / "r.h5",
                   option, value, "--device", "cpu"], *words)
    assert leftovers(tmp_path, "r.h5") == []


def test_tune_t0_same_seed_same_table(work, score_run, tmp_path):
    run = _copy_run(score_run, tmp_path)

    def sweep(seed):
        assert main([str(a) for a in ["tune-t0", "--run", run, "--data", work["data"], *TINY_SWEEP,
                                      "--seed", seed]]) == 0
        rows = json.loads((run / "tuned_csd.json").read_text())["table"]
        return [(r["t0"], r["n_steps"], r["mse"]) for r in rows]

    a, b, c = sweep(2), sweep(2), sweep(3)
    assert len(a) == 2 and a == b
    assert a != c


def test_tune_t0_sweeps_the_sampler_it_is_given_and_records_it(work, score_run, tmp_path):
    run = _copy_run(score_run, tmp_path)

    def sweep(sampler):
        assert main([str(a) for a in ["tune-t0", "--run", run, "--data", work["data"], *TINY_SWEEP,
                                      "--sampler", sampler]]) == 0
        return json.loads((run / "tuned_csd.json").read_text())

    plain, consistent = sweep("csd"), sweep("dds")
    assert plain["best"]["sampler"] == "csd" and consistent["best"]["sampler"] == "dds"
    # same seed and grid: only the data-consistency steps differ
    assert [r["t0"] for r in plain["table"]] == [r["t0"] for r in consistent["table"]]
    assert [r["mse"] for r in plain["table"]] != [r["mse"] for r in consistent["table"]]


def test_reconstruct_refuses_unknown_sampler(work, score_run, tmp_path, capsys):
    fails(capsys, ["reconstruct", "--run", score_run, "--data", work["data"], "--out", tmp_path / "r.h5",
                   "--sampler", "bogus", "--device", "cpu"], "bogus")
    assert leftovers(tmp_path, "r.h5") == []


def test_reconstruct_refuses_a_sampler_for_a_model_without_samplers(work, tmp_path, capsys):
    """A CNF run ignored --sampler and wrote a file whose 'sampler' attribute named a method
    that never ran."""
    fails(capsys, ["reconstruct", "--run", work["run"], "--data", work["data"], "--out", tmp_path / "r.h5",
                   "--sampler", "csd", "--device", "cpu"], "--sampler csd", "'cnf'")
    fails(capsys, ["reconstruct", "--run", work["run"], "--data", work["data"], "--out", tmp_path / "r.h5",
                   "--t0", "0.3", "--steps", "2", "--device", "cpu"], "--t0 0.3, --steps 2 apply to score runs")
    assert leftovers(tmp_path, "r.h5") == []


# ---------------------------------------------------------------------------------
# the real entry point: one line, exit 2, no traceback

def test_entry_point_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dgm_eit", "inspect", str(tmp_path / "absent.h5")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DGM_EIT_DEBUG": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "absent.h5" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# ---------------------------------------------------------------------------------
# Ctrl-C at the real entry point: one line, exit 130, resumable state kept

def start_ignoring_sigint(argv, **kwargs) -> subprocess.Popen:
    """Start ``argv`` as a shell script starts a background job (``cmd &`` without job
    control): with SIGINT ignored, which the child inherits. The test suite itself ran that
    way under a harness, and every Ctrl-C test failed (issue 21): dgm-eit must honour SIGINT
    however it was started."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return subprocess.Popen(argv, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_when(argv, ready, tmp_path, timeout=900.0):
    """Start ``dgm-eit argv``, send SIGINT once ``ready()`` holds; return (returncode, stderr).

    What it checks is the event (ready, then exit 130 with a resumable state), not the speed:
    the timeouts only end a test that would otherwise hang (on a loaded machine start-up and
    the first chunk or epoch can take minutes). Ctrl-C itself does not wait for running
    chunks or epochs (test_guarantees.py, item 10)."""
    err_path = tmp_path / "stderr.txt"
    env = {**os.environ, "DGM_EIT_DEBUG": "", "OMP_NUM_THREADS": "1"}
    with open(err_path, "w") as err:
        proc = start_ignoring_sigint([sys.executable, "-m", "dgm_eit", *map(str, argv)], stdout=subprocess.DEVNULL,
                                     stderr=err, env=env, cwd=tmp_path)
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "finished before it could be interrupted: " + err_path.read_text()[-500:]
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    return rc, err_path.read_text()


def _last_line(stderr: str) -> str:
    # tqdm redraws with carriage returns; the last drawn line is what the user sees
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()][-1]


def test_ctrl_c_stops_simulate_with_its_partial_file(tmp_path):
    out = tmp_path / "big.h5"
    partial = tmp_path / "big.h5.partial"
    argv = ["simulate", "--profile", "smoke", "--set", "data.n_train=8000", "--out", out, "--workers", "2",
            "--chunk-size", "4", "--seed", "1"]
    # the progress bar shows a rate once the first chunks are done ("?sample/s" before that);
    # 8,000 samples, so that even a fast machine is still simulating when the signal comes
    # (2,000 smoke samples once finished first under load: exit 0)
    rc, stderr = _interrupt_when(argv, lambda: partial.exists() and re.search(
        r"[0-9]sample/s", (tmp_path / "stderr.txt").read_text()) is not None, tmp_path)
    assert rc == 130
    assert "Traceback" not in stderr
    assert _last_line(stderr) == "dgm-eit: interrupted; re-run the same command to resume"
    assert partial.exists() and not out.exists()


def test_ctrl_c_stops_train_with_a_checkpoint_that_resumes(work, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "cnf", "--data", work["data"], "--out", out, *TINY_CNF, "--set", "cnf.flow.epochs=1000"]
    # metrics.csv appears after the first epoch's checkpoint
    rc, stderr = _interrupt_when(argv, lambda: (out / "metrics.csv").exists(), tmp_path)
    assert rc == 130
    assert "Traceback" not in stderr
    assert _last_line(stderr) == "dgm-eit: interrupted; re-run the same command to resume"
    assert (out / "checkpoints" / "last.pt").is_file() and not (out / "model.safetensors").exists()
    # the same command goes on from the checkpoint: the epochs stay 1, 2, 3, ... with none repeated
    assert main([str(a) for a in [*argv, "--max-minutes", "1e-9"]]) == 0
    epochs = [int(line.split(",")[1]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 1



@pytest.mark.parametrize("seed", [-1, 2**48, 1.5, True])
def test_one_seed_rule_for_every_command(seed):
    from dgm_eit.errors import InputError
    from dgm_eit.runtime import check_seed

    with pytest.raises(InputError, match=r"--seed must be an integer in \[0, 2\*\*48\)"):
        check_seed(seed)
    assert check_seed(2**48 - 1) == 2**48 - 1


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    from dgm_eit.files import atomic_path

    target = tmp_path / "out" / "fig.png"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert list((tmp_path / "out").iterdir()) == []
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".png"
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list((tmp_path / "out").iterdir()) == [target]
