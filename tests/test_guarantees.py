"""Issue 13: nothing a user owns is ever overwritten or left blocked.

Each test reproduces one defect of the issue (numbered as there) through ``dgm_eit.cli.main``,
in the style of ``test_cli.py``: bad input gives exactly one stderr line naming the problem,
exit 2, and nothing left behind; the corrected command then works.
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

from dgm_eit.cli import main
from dgm_eit.results import read_recon
from test_cli import SMALL_DATA, TINY_CNF, _save, fails, work  # noqa: F401  (work: fixture)
from test_simulate import _alive, _descendants

SIM = ["--profile", "smoke", *SMALL_DATA, "--workers", "1", "--quiet"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("DGM_EIT_DEBUG", raising=False)


def _files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------------
# 3. a refused simulation never leaves a .partial that blocks the corrected command

def test_3_invalid_gn_config_is_refused_before_any_file_and_the_fixed_command_works(tmp_path, capsys):
    out = tmp_path / "s.h5"
    fails(capsys, ["simulate", *SIM, "--set", "gn.lam=-3", "--out", tmp_path / "new" / "s.h5"], "gn.lam", "-3")
    fails(capsys, ["simulate", *SIM, "--set", "gn.lam=-3", "--out", out], "gn.lam", "-3")
    assert _files(tmp_path) == []
    assert main(["simulate", *map(str, SIM), "--out", str(out)]) == 0
    assert _files(tmp_path) == ["s.h5"]


def test_3_a_partial_file_without_a_finished_chunk_never_blocks(tmp_path, capsys):
    """What an older version left after a refused config: a .partial of another config, no chunk done."""
    from dgm_eit.config import load_config
    from dgm_eit.data import storage
    from dgm_eit.data.simulate import identity_json

    out = tmp_path / "s.h5"
    cfg = load_config("smoke", ["gn.lam=-3"])
    storage.PartialFile.create(storage.partial_path(out), config_json=json.dumps(cfg), identity=identity_json(cfg, 0),
                               seed=0, sizes={"train": 16, "val": 4, "test": 4}, image_size=32, n_meas=208,
                               chunk_size=16).close()
    assert main(["simulate", *map(str, SIM), "--out", str(out)]) == 0
    assert _files(tmp_path) == ["s.h5"]


def test_3_a_failure_inside_the_chunks_removes_a_partial_without_finished_chunks(tmp_path, monkeypatch, capsys):
    from dgm_eit.data import simulate
    from dgm_eit.errors import InputError

    def refuse(self, seed, split, start, stop):
        raise InputError("Gauss-Newton failed on sample train[0]")

    monkeypatch.setattr(simulate.Simulator, "chunk", refuse)
    out = tmp_path / "s.h5"
    fails(capsys, ["simulate", *SIM, "--out", out], "train[0]")
    assert _files(tmp_path) == []


def test_3_run_refuses_an_invalid_config_before_creating_anything(tmp_path, capsys):
    fails(capsys, ["run", "--profile", "smoke", *SMALL_DATA, "--set", "gn.lam=-3", "--out", tmp_path / "exp"],
          "gn.lam")
    assert _files(tmp_path) == []


# ---------------------------------------------------------------------------------
# 4. one writer per output: unique temporary names and an advisory lock

def test_4_temporary_names_are_unique(tmp_path):
    from dgm_eit.files import atomic_path

    with atomic_path(tmp_path / "x.h5") as a, atomic_path(tmp_path / "x.h5") as b:
        assert a != b and a.suffix == b.suffix == ".h5" and str(os.getpid()) in a.name
        a.write_text("a")
        b.write_text("b")
    assert _files(tmp_path) == ["x.h5"]


@pytest.mark.parametrize("command", ["simulate", "train", "run"])
def test_4_a_second_writer_is_refused_at_once_naming_the_holder(work, tmp_path, capsys, command):
    from dgm_eit.files import output_lock

    out = tmp_path / ("s.h5" if command == "simulate" else "out")
    argv = {"simulate": ["simulate", *SIM, "--out", out],
            "train": ["train", "cnf", "--data", work["data"], "--out", out, *TINY_CNF],
            "run": ["run", "--profile", "smoke", *SMALL_DATA, "--out", out]}[command]
    with output_lock(out, "dgm-eit test"):
        fails(capsys, argv, str(out), f"pid {os.getpid()}")
        assert not out.exists()   # refused before any work
    assert _files(tmp_path) == []   # the lock file goes with its holder


def test_4_two_simulate_processes_on_one_output(tmp_path):
    """Started together: one writes the file, the other is refused with one line (no ENOENT)."""
    out = tmp_path / "s.h5"
    argv = [sys.executable, "-m", "dgm_eit", "simulate", *map(str, SIM), "--out", str(out)]
    env = {**os.environ, "DGM_EIT_DEBUG": "", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    codes = sorted(rc for rc, _ in results)
    assert all("Traceback" not in err and "No such file" not in err for _, err in results), results
    assert codes in ([0, 0], [0, 2]), results   # the second either came after the first or was refused
    for rc, err in results:
        if rc == 2:
            assert "being written by another process" in err and "pid" in err
    assert _files(tmp_path) == ["s.h5"]


# ---------------------------------------------------------------------------------
# 1. no writer overwrites an input, or a file of another kind without --overwrite

def _recon(work, out, *extra):
    return ["reconstruct", "--run", work["run"], "--data", work["data"], "--out", out, "--device", "cpu", *extra]


def test_1_reconstruct_never_overwrites_its_data_set(work, tmp_path, capsys):
    data = tmp_path / "d.h5"
    shutil.copy(work["data"], data)
    before = data.read_bytes()
    for extra in ([], ["--overwrite"]):
        fails(capsys, ["reconstruct", "--run", work["run"], "--data", data, "--out", data, "--device", "cpu", *extra],
              str(data), "--data")
    assert data.read_bytes() == before and _files(tmp_path) == ["d.h5"]


def test_1_reconstruct_never_overwrites_its_voltages(work, tmp_path, capsys):
    v = _save(tmp_path, work["v_test"][:2])
    before = v.read_bytes()
    fails(capsys, ["reconstruct", "--run", work["run"], "--voltages", v, "--out", v, "--overwrite"], "--voltages")
    assert v.read_bytes() == before and _files(tmp_path) == ["v.npy"]


def test_1_reconstruct_replaces_another_kind_only_with_overwrite(work, tmp_path, capsys):
    other = tmp_path / "other.h5"
    shutil.copy(work["data"], other)          # a data set, not a reconstruction file
    fails(capsys, _recon(work, other), str(other), "not a reconstruction file", "--overwrite")
    assert h5py.File(other, "r").attrs["format_version"] == 1
    notes = tmp_path / "notes.png"
    notes.write_text("my notes")
    fails(capsys, ["reconstruct", "--run", work["run"], "--voltages", _save(tmp_path, work["v_test"][:1]),
                   "--out", notes, "--device", "cpu"], str(notes), "--overwrite")
    assert notes.read_text() == "my notes"
    # its own kind is replaced (re-running a command), and --overwrite replaces the other
    assert main([str(a) for a in _recon(work, other, "--overwrite")]) == 0
    assert main([str(a) for a in _recon(work, other)]) == 0
    assert _files(tmp_path) == ["notes.png", "other.h5", "v.npy"]


def test_1_show_never_overwrites_its_data_set_or_another_kind(work, tmp_path, capsys):
    data = tmp_path / "d.png"      # a data set that happens to be named .png
    shutil.copy(work["data"], data)
    fails(capsys, ["show", data, "--out", data, "--overwrite"], str(data), "input")
    mine = tmp_path / "mine.png"
    mine.write_text("not an image")
    fails(capsys, ["show", work["data"], "--out", mine], str(mine), "--overwrite")
    assert mine.read_text() == "not an image"
    assert main(["show", str(work["data"]), "--out", str(mine), "--overwrite"]) == 0
    assert mine.read_bytes().startswith(b"\x89PNG")


def test_1_out_naming_a_directory_is_refused(work, tmp_path, capsys):
    d = tmp_path / "dir.h5"
    d.mkdir()
    fails(capsys, _recon(work, d), f"{d} is a directory")
    fails(capsys, ["simulate", *SIM, "--out", d], f"{d} is a directory")
    fails(capsys, ["show", work["data"], "--out", d], f"{d} is a directory")
    assert _files(tmp_path) == ["dir.h5"] and _files(d) == []


# ---------------------------------------------------------------------------------
# 2. run refuses a non-empty directory it did not make

def test_2_run_refuses_a_training_run_directory(work, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(work["run"], run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    fails(capsys, ["run", "--profile", "smoke", *SMALL_DATA, "--out", run], str(run), "not a dgm-eit run output")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert _files(tmp_path) == ["run"]


# ---------------------------------------------------------------------------------
# 5. damaged run directories: detected, named, redone; every read error names its file

GN_RUN = ["--profile", "smoke", *SMALL_DATA, "--set", 'run.methods=["gn"]', "--set", 'run.tests=["T1"]',
          "--set", "train.progress=false", "--device", "cpu"]


@pytest.fixture(scope="module")
def gn_run(tmp_path_factory):
    """A finished ``dgm-eit run`` with GN only on Test 1: two small data sets, seconds."""
    out = tmp_path_factory.mktemp("gn_run") / "exp"
    assert main(["run", *GN_RUN, "--out", str(out)]) == 0
    return out


def test_5_a_truncated_data_set_in_a_run_is_named_and_redone(gn_run, tmp_path, capsys):
    out = tmp_path / "exp"
    shutil.copytree(gn_run, out)
    data = out / "data" / "2a_40dB.h5"
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    (out / "stages.json").write_text('{"data 2a_40dB": {"sta')
    capsys.readouterr()
    assert main(["run", *GN_RUN, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"[redo]  {data}" in err and f"{out / 'stages.json'}" in err and "--overwrite" not in err
    assert data.read_bytes() == raw    # made again, byte-identical
    assert json.loads((out / "stages.json").read_text())["data 2a_40dB"]["status"] == "done"


def test_5_a_truncated_run_json_is_named(gn_run, tmp_path, capsys):
    out = tmp_path / "exp"
    shutil.copytree(gn_run, out)
    (out / "run.json").write_text('{"seed": 0, "con')
    fails(capsys, ["run", *GN_RUN, "--out", out], str(out / "run.json"), "damaged")


def test_5_a_truncated_reconstruction_in_a_run_is_named_and_redone(gn_run, work, tmp_path):
    from dgm_eit.config import load_config
    from dgm_eit.experiments import Experiment
    from dgm_eit.results import read_recon

    good = tmp_path / "good.h5"
    assert main([str(a) for a in _recon(work, good)]) == 0
    cut = tmp_path / "cnf_2a_40dB_on_2a_40dB.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    from dgm_eit.errors import InputError

    with pytest.raises(InputError, match=str(cut)):
        read_recon(cut)
    logged = []
    cfg = load_config("smoke", ["data.n_train=16", "data.n_val=4", "data.n_test=4"])
    experiment = Experiment(cfg, tmp_path / "exp", log=logged.append)
    assert experiment._output_done(good)
    assert not experiment._output_done(cut)      # so the stage runs again
    assert not cut.exists() and any(str(cut) in line and "truncated" in line for line in logged)


# ---------------------------------------------------------------------------------
# 6. evaluate refuses a reconstruction made from another data set or split

def test_6_evaluate_refuses_a_reconstruction_of_another_data_set_unless_forced(work, tmp_path, capsys):
    recon = tmp_path / "r.h5"
    assert main([str(a) for a in _recon(work, recon)]) == 0
    other = tmp_path / "other.h5"
    shutil.copy(work["data"], other)
    fails(capsys, ["evaluate", "--pred", recon, "--data", other], str(recon), str(work["data"]), "--force")
    fails(capsys, ["evaluate", "--pred", recon, "--data", work["data"], "--split", "val"], "'test'", "--force")
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(recon), "--data", str(other), "--force", "--json"]) == 0
    assert main(["evaluate", "--pred", str(recon), "--data", str(work["data"]), "--json"]) == 0


# ---------------------------------------------------------------------------------
# 7. voltages far from the training data, NaN weights

def _voltages_argv(work, tmp_path, v):
    return ["reconstruct", "--run", work["run"], "--voltages", _save(tmp_path, np.asarray(v, np.float32)),
            "--out", tmp_path / "r.npy", "--device", "cpu"]


@pytest.mark.parametrize("change,named", [("zeros", "all zeros"), ("flip", "sign-flipped")])
def test_7_zero_and_sign_flipped_voltages_are_refused(work, tmp_path, capsys, change, named):
    v = work["v_test"][:2].copy()
    v[1] = 0.0 if change == "zeros" else -v[1]
    fails(capsys, _voltages_argv(work, tmp_path, v), "v.npy", "vector 1", named)
    assert _files(tmp_path) == ["v.npy"]


@pytest.mark.parametrize("scale", [1e3, 1e30])
def test_7_voltages_far_outside_the_training_range_warn_with_the_factor(work, tmp_path, capsys, scale):
    argv = [str(a) for a in _voltages_argv(work, tmp_path, work["v_test"][:2] * scale)]
    with pytest.warns(UserWarning, match=r"far outside the training range") as record:
        rc = main(argv)
    message = next(str(w.message) for w in record if "far outside" in str(w.message))
    factor = float(re.search(r"vector \d is (\S+) x the size of the training voltages", message).group(1))
    assert scale / 2 < factor < scale * 2, message
    if rc == 0:   # an image only when it is finite, never NaN with exit 0
        assert np.all(np.isfinite(np.load(tmp_path / "r.npy")))
    else:
        assert rc == 2 and not (tmp_path / "r.npy").exists()


def test_7_nan_weights_are_refused(work, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(work["run"], run)
    state = load_file(str(run / "model.safetensors"))
    key = next(k for k, t in state.items() if t.is_floating_point() and t.numel() > 1)
    state[key][0] = float("nan")
    save_file(state, str(run / "model.safetensors"))
    argv = _voltages_argv(work, tmp_path, work["v_test"][:2])
    argv[2] = run
    fails(capsys, argv, str(run / "model.safetensors"), "nan")
    assert not (tmp_path / "r.npy").exists()


# ---------------------------------------------------------------------------------
# 8. one line, not a traceback

def test_8_empty_npy_files(work, tmp_path, capsys):
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    fails(capsys, ["reconstruct", "--run", work["run"], "--voltages", empty, "--out", tmp_path / "r.npy"], str(empty))
    fails(capsys, ["evaluate", "--pred", empty, "--data", work["data"]], str(empty))
    assert _files(tmp_path) == ["empty.npy"]


def test_8_unknown_device(work, tmp_path, capsys):
    fails(capsys, [*_recon(work, tmp_path / "r.h5")[:-2], "--device", "tpu"], "--device", "tpu")
    fails(capsys, ["train", "cnf", "--data", work["data"], "--out", tmp_path / "run", *TINY_CNF[:-2],
                   "--device", "tpu"], "tpu")
    assert _files(tmp_path) == []


def _with_test_v(work, tmp_path, value, name="odd.h5"):
    path = tmp_path / name
    shutil.copy(work["data"], path)
    with h5py.File(path, "r+") as f:
        del f["test/v"]
        f["test/v"] = value
    return path


def test_8_a_scalar_test_v(work, tmp_path, capsys):
    path = _with_test_v(work, tmp_path, 1.0)
    pred = _save(tmp_path, np.ones((4, work["size"], work["size"]), np.float32), "p.npy")
    for argv in (_recon(work, tmp_path / "r.h5")[:3] + ["--data", path, "--out", tmp_path / "r.h5"],
                 ["evaluate", "--pred", pred, "--data", path], ["inspect", path]):
        fails(capsys, argv, str(path), "test/v", "shape")
    assert _files(tmp_path) == ["odd.h5", "p.npy"]


# ---------------------------------------------------------------------------------
# 9. messages

def test_9_no_voltage_vectors(work, tmp_path, capsys):
    fails(capsys, _voltages_argv(work, tmp_path, np.zeros((0, work["n_meas"]))), "v.npy", "no voltages")


def test_9_empty_splits(work, tmp_path, capsys):
    data = tmp_path / "empty.h5"
    shutil.copy(work["data"], data)
    with h5py.File(data, "r+") as f:
        for split in ("train", "test"):
            for key in ("sigma", "v", "v_clean", "gn"):
                shape = f[split][key].shape
                del f[split][key]
                f[split][key] = np.zeros((0,) + shape[1:], np.float32)
    fails(capsys, _recon(work, tmp_path / "r.h5")[:3] + ["--data", data, "--out", tmp_path / "r.h5"],
          str(data), "'test'", "empty")
    fails(capsys, ["train", "cnf", "--data", data, "--out", tmp_path / "run", *TINY_CNF], str(data), "empty train")
    fails(capsys, ["evaluate", "--pred", _save(tmp_path, np.zeros((0, 32, 32)), "p.npy"), "--data", data],
          str(data), "empty")
    assert _files(tmp_path) == ["empty.h5", "p.npy"]


def test_9_a_directory_where_a_file_is_expected(work, tmp_path, capsys):
    d = tmp_path / "d.npy"
    d.mkdir()
    for argv in (["reconstruct", "--run", work["run"], "--voltages", d, "--out", tmp_path / "r.npy"],
                 ["evaluate", "--pred", d, "--data", work["data"]],
                 ["train", "cnf", "--data", d, "--out", tmp_path / "run", *TINY_CNF],
                 ["inspect", d]):
        fails(capsys, argv, str(d), "is a directory")
    assert _files(tmp_path) == ["d.npy"]


def test_9_an_unwritable_output_is_named_not_its_temporary_file(tmp_path):
    from dgm_eit.errors import InputError
    from dgm_eit.files import atomic_path

    target = tmp_path / "r.h5"
    with pytest.raises(InputError) as info:
        with atomic_path(target) as tmp:
            raise PermissionError(13, "Permission denied", str(tmp))
    assert str(info.value) == f"cannot write {target}: Permission denied"
    assert _files(tmp_path) == []


def test_9_a_pickled_checkpoint_is_not_a_dgm_eit_checkpoint(work, tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    argv = ["train", "cnf", "--data", work["data"], "--out", out, *TINY_CNF, "--set", "cnf.flow.epochs=3"]
    assert main([*map(str, argv), "--max-minutes", "1e-9"]) == 0
    torch.save({"format": 1, "payload": _Pickled()}, out / "checkpoints" / "last.pt")
    line = fails(capsys, argv, "last.pt", "not a dgm-eit checkpoint", "unsafe")
    assert "weights_only" not in line and not _Pickled.loaded


class _Pickled:
    loaded = False

    def __setstate__(self, state):
        type(self).loaded = True


def test_9_inspect_flags_nan_data(work, tmp_path, capsys):
    path = tmp_path / "holes.h5"
    shutil.copy(work["data"], path)
    with h5py.File(path, "r+") as f:
        f["train/v"][2, 0] = np.nan
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    table = captured.out.replace(str(path), "FILE")
    assert "nan" not in table.lower() and "inf" not in table
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "train/v" in lines[0] and "sample 2" in lines[0]


def test_9_complex_voltages_in_a_data_set_are_refused(work, tmp_path, capsys):
    with h5py.File(work["data"], "r") as f:
        v = f["test/v"][...].astype(np.complex64)
    path = _with_test_v(work, tmp_path, v)
    fails(capsys, ["inspect", path], str(path), "complex")
    fails(capsys, _recon(work, tmp_path / "r.h5")[:3] + ["--data", path, "--out", tmp_path / "r.h5"], "complex")
    assert _files(tmp_path) == ["odd.h5"]


def test_9_negative_run_jobs_is_refused(tmp_path, capsys):
    fails(capsys, ["run", "--profile", "smoke", "--set", "run.jobs=-1", "--out", tmp_path / "exp"], "run.jobs", "-1")
    assert _files(tmp_path) == []


def test_9_help_texts(capsys):
    from dgm_eit.cli import build_parser
    from dgm_eit.models.samplers import SAMPLERS
    from test_cli import _subparser

    parser = build_parser()
    train_help = _subparser(parser, ["train"]).format_help()
    assert "data.n_train" not in train_help and "--set" in train_help
    sampler = _subparser(parser, ["reconstruct"])._option_string_actions["--sampler"]
    assert all(name in sampler.help for name in SAMPLERS)


def test_9_a_train_refused_at_validation_leaves_nothing_that_blocks_the_fixed_command(work, tmp_path, capsys):
    from conftest import write_tiny_dataset

    bad = write_tiny_dataset(tmp_path / "seven.h5", size=7, n_meas=work["n_meas"], n=(4, 2, 2))
    out = tmp_path / "run"
    fails(capsys, ["train", "cnf", "--data", bad, "--out", out, *TINY_CNF], "7")
    assert _files(tmp_path) == ["seven.h5"]
    assert main([str(a) for a in ["train", "cnf", "--data", work["data"], "--out", out, *TINY_CNF]]) == 0


# ---------------------------------------------------------------------------------
# 10. Ctrl-C does not wait for the worker pool to drain

def test_10_stopping_the_simulation_pool_does_not_wait_for_running_chunks():
    """Leaving the chunk loop early (Ctrl-C, a failure) ends the workers at once; the old code
    waited for every chunk in flight (here one of 3000 samples, minutes) before exiting."""
    from dgm_eit.config import load_config
    from dgm_eit.data.simulate import Task, _run_pool

    cfg_json = json.dumps(load_config("smoke"), sort_keys=True)
    # the big chunk takes 15 min on an idle machine: waiting for it fails the test, whatever the load
    tasks = [Task("train", 0, 0, 1), Task("train", 1, 1, 30_001)]
    results = _run_pool(cfg_json, 0, tasks, workers=2)
    task, arrays = next(results)          # the one-sample chunk; the big one is running
    assert task.chunk == 0 and arrays["v"].shape[0] == 1
    import multiprocessing

    started = time.monotonic()
    results.close()                       # what Ctrl-C in the caller's loop does
    assert time.monotonic() - started < 300   # only ends a test that waits for the big chunk
    assert not [p for p in multiprocessing.active_children() if p.name.startswith(("SpawnProcess", "ForkServer"))]


def test_9_an_unwritable_output_directory_is_named_not_the_lock_file(tmp_path, monkeypatch):
    from dgm_eit.errors import InputError
    from dgm_eit.files import output_lock

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(InputError, match=rf"^cannot write {tmp_path / 's.h5'}: Permission denied$"):
        with output_lock(tmp_path / "s.h5"):
            pass


def test_5_a_truncated_tuned_csd_json_is_named(work, tmp_path, capsys):
    from test_cli import TINY_SCORE

    run = tmp_path / "score"
    assert main([str(a) for a in ["train", "score", "--data", work["data"], "--out", run, *TINY_SCORE]]) == 0
    (run / "tuned_csd.json").write_text('{"best": {"t0"')
    fails(capsys, ["reconstruct", "--run", run, "--data", work["data"], "--out", tmp_path / "r.h5", "--sampler",
                   "csd", "--limit", "1", "--device", "cpu"], str(run / "tuned_csd.json"), "tune-t0")
    assert not (tmp_path / "r.h5").exists()


def test_10_a_swallowed_ctrl_c_is_remembered_for_the_next_safe_point(ctrl_c):
    import signal

    from dgm_eit.runtime import sigint_latch

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with sigint_latch() as interrupted:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)   # the handler runs here
        except KeyboardInterrupt:
            pass   # as a finaliser would swallow it
        assert interrupted.is_set()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------------
# Issue 21, 11: messages name what is wrong

@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_21_11_a_noise_level_that_is_not_a_finite_number_is_named(tmp_path, capsys, value):
    """It was reported as 'gn.lam must be >= 0, got 3.0' (GN's weight is scaled by the SNR)."""
    fails(capsys, ["simulate", *SIM, f"--snr-db={value}", "--out", tmp_path / "s.h5"], "snr_db", value)
    assert _files(tmp_path) == []


# ---------------------------------------------------------------------------------
# Issue 21, 1: a killed run leaves no process behind, and nothing lands after it

def test_21_1_a_worker_writes_nothing_once_its_main_process_is_gone(tmp_path, monkeypatch):
    import multiprocessing

    from dgm_eit import runtime
    from dgm_eit.files import OrphanedWorker, atomic_path

    alive_r, alive_w = multiprocessing.Pipe(duplex=False)
    monkeypatch.setattr(runtime, "_lifeline", alive_r)   # what exit_with_parent records in a worker
    with atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("while the main process lives")
    alive_w.close()                                       # the main process dies
    with pytest.raises(OrphanedWorker, match="b.txt"):
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("after")
    assert _files(tmp_path) == ["a.txt"]
    alive_r.close()


def _wait_for(condition, proc, what: str, timeout: float = 900.0) -> None:
    """Poll ``condition`` while ``proc`` runs; the timeout only ends a test that would hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the command ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table from /proc")
def test_21_1_sigkill_of_a_run_ends_its_workers_and_the_helpers(tmp_path):
    """Two training stages side by side in worker processes, then SIGKILL of the main process:
    the workers, the simulator's forkserver and the resource tracker all go within seconds
    (they used to train on, write into the unlocked directory, and idle for ever)."""
    out = tmp_path / "exp"
    argv = [sys.executable, "-m", "dgm_eit", "run", "--profile", "smoke", *SMALL_DATA, "--out", str(out),
            "--set", 'run.tests=["T1"]', "--set", 'run.methods=["gn","cnf"]', "--set", "run.jobs=2",
            "--set", "cnf.flow.epochs=100000", "--set", "train.progress=false", "--device", "cpu"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "DGM_EIT_DEBUG": ""})
    helpers = []
    try:
        checkpoints = [out / "runs" / f"cnf_{label}" / "seed0" / "checkpoints" / "last.pt" for label in ("2a_40dB", "4a_40dB")]
        _wait_for(lambda: all(p.exists() for p in checkpoints), proc, "checkpoint of both training stages")
        helpers = _descendants(proc.pid)
        assert len(helpers) >= 2, "expected two training workers"
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        # 60 s only ends a test that would wait for ever; the workers go at once
        while any(_alive(p) for p in helpers) and time.monotonic() < killed + 60:
            time.sleep(0.1)
        survivors = [p for p in helpers if _alive(p)]
        assert not survivors, f"{len(survivors)} of {len(helpers)} processes outlived the killed run"
    finally:
        for pid in [proc.pid, *helpers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------
# Issue 21, 10: Ctrl-C stops a run's reconstruction stage, and the same command resumes

def test_21_10_ctrl_c_stops_a_reconstruction_stage_and_the_run_resumes(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it, to a run started with SIGINT
    ignored, as a script's background job is: the run used to go on to its report, exit 0."""
    from test_cli import _last_line, start_ignoring_sigint

    out = tmp_path / "exp"
    argv = ["run", "--profile", "smoke", *SMALL_DATA, "--out", out, "--set", 'run.tests=["T1"]',
            "--set", 'run.methods=["gn","csd"]', "--set", "run.jobs=2", "--set", "train.progress=false",
            "--device", "cpu"]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = start_ignoring_sigint([sys.executable, "-m", "dgm_eit", *map(str, argv)], stdout=subprocess.DEVNULL,
                                     stderr=err, env={**os.environ, "DGM_EIT_DEBUG": ""}, start_new_session=True)
        try:
            _wait_for(lambda: "[queue] reconstruct" in err_path.read_text(), proc, "reconstruction stage")
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=300)   # only ends a test that would hang; it takes seconds
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    stderr = err_path.read_text()
    assert rc == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert _last_line(stderr) == "dgm-eit: interrupted; re-run the same command to resume"
    assert not (out / "report.md").exists()
    # a fast machine may finish a reconstruction before the signal lands: what is there is whole
    for path in (out / "recon").iterdir():
        assert path.suffix == ".h5", f"half-written {path.name}"
        read_recon(path)
    assert main([str(a) for a in argv]) == 0
    assert sorted(p.name for p in (out / "recon").iterdir()) == ["csd_2a_40dB_on_2a_40dB_seed0.h5",
                                                                 "csd_4a_40dB_on_4a_40dB_seed0.h5"]
    assert (out / "report.md").is_file()


def test_21_11_sigterm_stops_simulate_like_ctrl_c_and_removes_its_lock(tmp_path):
    from test_cli import _last_line

    out = tmp_path / "big.h5"
    partial = tmp_path / "big.h5.partial"
    argv = [sys.executable, "-m", "dgm_eit", "simulate", "--profile", "smoke", "--set", "data.n_train=8000", "--out",
            str(out), "--workers", "2", "--chunk-size", "4", "--seed", "1", "--quiet"]
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "DGM_EIT_DEBUG": ""})
        try:
            _wait_for(lambda: partial.exists() and (tmp_path / ".big.h5.lock").exists(), proc, "partial file")
            proc.terminate()
            rc = proc.wait(timeout=300)   # only ends a test that would hang
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = err_path.read_text()
    assert rc == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    assert _last_line(stderr) == "dgm-eit: terminated; re-run the same command to resume"
    assert _files(tmp_path) == ["big.h5.partial", "stderr.txt"]   # no lock left, the partial file kept


def test_21_10_sigint_held_back_holds_a_ctrl_c_that_another_thread_receives():
    """A process-directed SIGINT goes to any thread that does not block it (a pool's manager
    thread), and Python runs the handler in the main thread regardless of its mask: the
    KeyboardInterrupt came inside the block, between starting a pool worker and writing its
    start-up data, and the worker died reading nothing ("EOFError: Ran out of input" after
    the run had stopped, 1 run in 22 under load)."""
    script = (
        "import os, signal, threading, time\n"
        "from dgm_eit.runtime import sigint_held_back\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "threading.Thread(target=threading.Event().wait, daemon=True).start()   # a thread that takes it\n"
        "finished = False\n"
        "try:\n"
        "    with sigint_held_back():\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        for _ in range(50):\n"
        "            time.sleep(0.01)   # Python runs pending handlers between these\n"
        "        finished = True\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted after the block' if finished else 'interrupted in the block')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "interrupted after the block\n"


def test_21_10_stop_pool_ends_a_worker_caught_sending_its_result(tmp_path):
    """A worker ended while it sends its result leaves half a message in the result pipe; the
    pool's manager thread then waits for the rest forever, and interpreter exit joins that
    thread: `simulate` hung after Ctrl-C on CI. The worker here writes half a message and
    waits; stop_pool must end it and let the interpreter exit."""
    script = tmp_path / "half_result.py"
    script.write_text(
        "import multiprocessing, os, pathlib, struct, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from dgm_eit.runtime import stop_pool\n"
        "def half_result(marker):\n"
        "    result_queue = sys._getframe(1).f_locals['result_queue']   # the pool worker's\n"
        "    os.write(result_queue._writer.fileno(), struct.pack('!i', 1 << 20) + b'\\x80')\n"
        "    pathlib.Path(marker).touch()\n"
        "    time.sleep(3600)\n"
        "if __name__ == '__main__':\n"
        "    marker = pathlib.Path(sys.argv[1])\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'))\n"
        "    pool.submit(half_result, str(marker))\n"
        "    while not marker.exists():\n"
        "        time.sleep(0.05)\n"
        "    stop_pool(pool)\n"
        "    print('stopped')\n")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "sent")], capture_output=True, text=True,
                          timeout=300)   # only ends a test that would hang
    assert proc.returncode == 0 and proc.stdout == "stopped\n", proc.stderr[-2000:]


def test_21_10_a_stage_worker_ended_by_stop_pool_leaves_no_temporary_file(tmp_path):
    """stop_pool ends a worker that outlasts the Ctrl-C grace with SIGTERM: the task unwinds
    (atomic_path removes its temporary file) before the worker exits. A checkpoint being
    written then was left as checkpoints/last.tmp-PID-RANDOM.pt."""
    script = (
        "import os, signal, sys\n"
        "from dgm_eit.files import atomic_path\n"
        "from dgm_eit.stages import worker_call\n"
        "def write(path):\n"
        "    with atomic_path(path) as tmp:\n"
        "        tmp.write_text('half')\n"
        "        os.kill(os.getpid(), signal.SIGTERM)   # the handler runs before the next line\n"
        "        sys.exit('SIGTERM did not unwind the task')\n"
        f"worker_call(write, {{'path': {str(tmp_path / 'last.pt')!r}}})\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr
    assert _files(tmp_path) == []
