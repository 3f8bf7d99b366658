"""The simulator and ``dgm-eit simulate``: determinism, resume after SIGKILL, Dask, refusals."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from dgm_eit.cli import main
from dgm_eit.config import load_config
from dgm_eit.data import simulate as sim_mod
from dgm_eit.data import storage
from dgm_eit.errors import InputError
from dgm_eit.recon import gauss_newton, gn_config
from dgm_eit.recon.tuning import apply_gn_settings, tune_gauss_newton, tuning_grid

SMALL = ["data.n_train=16", "data.n_val=8", "data.n_test=8"]


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _small_cfg(*extra):
    return load_config("smoke", SMALL + list(extra))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run every other run must reproduce byte for byte."""
    path = tmp_path_factory.mktemp("ref") / "ref.h5"
    sim_mod.simulate_dataset(_small_cfg(), path, seed=11, workers=1, chunk_size=4, progress=False)
    return path


# ---- the driver with a stand-in simulator (no physics) -------------------------------------

class _Interrupted(Exception):
    pass


class _StandIn:
    """Arrays that encode (seed, split, index), so misplaced or repeated samples show."""

    image_size, n_meas, extra_images = 4, 5, 0

    def __init__(self, fail_after=None):
        self.calls = []
        self.fail_after = fail_after

    def gn_settings(self, seed, log):
        return {}

    def chunk(self, seed, split, start, stop):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise _Interrupted()
        self.calls.append((split, start, stop))
        idx = np.arange(start, stop, dtype=np.float32) + 1000 * sim_mod.SPLIT_INDEX[split] + 1e4 * seed
        n = stop - start
        return {"sigma": np.broadcast_to(idx[:, None, None], (n, 4, 4)).copy(),
                "gn": np.broadcast_to(-idx[:, None, None], (n, 4, 4)).copy(),
                "v": np.broadcast_to(idx[:, None] + 0.5, (n, 5)).copy(),
                "v_clean": np.broadcast_to(idx[:, None], (n, 5)).copy()}


def test_driver_resumes_only_unfinished_chunks(tmp_path, monkeypatch):
    cfg = _small_cfg()
    stand_in = _StandIn()
    monkeypatch.setattr(sim_mod, "simulator_for", lambda cfg_json: stand_in)
    sim_mod.simulate_dataset(cfg, tmp_path / "whole.h5", seed=2, workers=1, chunk_size=3, progress=False)
    n_chunks = len(stand_in.calls)
    assert n_chunks == 6 + 3 + 3

    broken = _StandIn(fail_after=5)
    monkeypatch.setattr(sim_mod, "simulator_for", lambda cfg_json: broken)
    out = tmp_path / "resumed.h5"
    with pytest.raises(_Interrupted):
        sim_mod.simulate_dataset(cfg, out, seed=2, workers=1, chunk_size=3, progress=False)
    assert not out.exists() and storage.partial_path(out).exists()

    again = _StandIn()
    monkeypatch.setattr(sim_mod, "simulator_for", lambda cfg_json: again)
    with pytest.raises(InputError, match=r"unfinished simulation that was simulated with another config "
                                         r"\(seed: 2 -> 3\)"):
        sim_mod.simulate_dataset(cfg, out, seed=3, workers=1, progress=False)
    assert again.calls == []
    # an unfinished run keeps its own chunk size
    result = sim_mod.simulate_dataset(cfg, out, seed=2, workers=1, chunk_size=5, progress=False)
    assert result.resumed_samples == 15 and result.samples_run == 32 - 15
    assert sorted(again.calls) == sorted(set(stand_in.calls) - set(broken.calls))
    assert not storage.partial_path(out).exists()
    assert _digest(out) == _digest(tmp_path / "whole.h5")
    test = storage.read_split(out, "test", ("sigma",))["sigma"]
    np.testing.assert_array_equal(test[:, 0, 0], np.arange(8) + 2000 + 2e4)


# ---- the real simulator ------------------------------------------------------------------

def test_reference_holds_physical_values(reference):
    cfg = storage.dataset_config(reference)
    assert cfg["data"]["n_train"] == 16
    with storage.open_dataset(reference) as f:
        assert int(f.attrs["seed"]) == 11 and bool(f.attrs["complete"])
    data = storage.read_split(reference, "train", storage.ARRAY_KEYS)
    size = cfg["data"]["image_size"]
    assert data["sigma"].shape == (16, size, size) and data["v"].shape == (16, 208)
    c = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(c, -c)
    outside = x**2 + y**2 > 1
    assert np.all(data["sigma"][:, outside] == 0) and np.all(data["gn"][:, outside] == 0)
    assert set(np.unique(data["sigma"])) == {0.0, 0.5, 1.0, 1.5}
    for img in data["sigma"]:  # both anomalies of every phantom show on the grid
        assert {0.5, 1.5} <= set(np.unique(img))
    from dgm_eit.data.noise import measured_snr_db

    snr = measured_snr_db(data["v_clean"], data["v"])
    assert abs(snr.mean() - 40.0) < 0.5
    # Gauss-Newton must beat the homogeneous guess by a wide margin
    homogeneous = np.where(outside, 0.0, 1.0)
    gn_mse = ((data["gn"] - data["sigma"]) ** 2).mean()
    flat_mse = ((homogeneous - data["sigma"]) ** 2).mean()
    assert gn_mse < 0.7 * flat_mse


def _file_simulator(path, *extra):
    """A simulator that makes GN images as the file did: with the settings it recorded."""
    return sim_mod.Simulator(apply_gn_settings(_small_cfg(*extra), storage.dataset_gn_settings(path)))


def test_gn_is_tuned_on_the_validation_split_and_recorded(reference):
    settings = storage.dataset_gn_settings(reference)
    cfg = _small_cfg()
    factors, iters, n = tuning_grid(cfg)
    assert settings["tuned"] and settings["tuned_on"] == f"val[:{n}]"
    assert len(settings["candidates"]) == len(factors) * len(iters)
    base = gn_config(cfg)["lam"]
    assert sorted({c["lam"] for c in settings["candidates"]}) == pytest.approx(sorted(f * base for f in factors))
    best = min(settings["candidates"], key=lambda c: c["val_mse"])
    assert (settings["lam"], settings["max_iter"]) == (best["lam"], best["max_iter"])
    # the file's own validation GN images were made with the chosen settings: their MSE is the
    # one the search recorded, recomputed here from the stored arrays
    val = storage.read_split(reference, "val", ("sigma", "gn"), indices=slice(0, n))
    mse = float(np.mean((val["gn"].astype(np.float64) - val["sigma"]) ** 2))
    assert mse == pytest.approx(settings["val_mse"], rel=1e-5)
    # and a direct Gauss-Newton run with them reproduces a test image
    sim = sim_mod.Simulator(cfg)
    sample = sim.measure(11, "test", 0)
    image = sim.grid.to_image(gauss_newton(sim.coarse, sample["v"], **{**gn_config(cfg), "lam": settings["lam"],
                                                                       "max_iter": settings["max_iter"]}).sigma)
    stored = storage.read_split(reference, "test", ("gn",), indices=slice(0, 1))["gn"][0]
    np.testing.assert_allclose(stored, image, rtol=1e-5, atol=1e-6)
    assert settings["mesh_nodes"] == sim.coarse.mesh.n_nodes


def test_gn_search_scores_every_candidate_on_the_images_it_is_given():
    cfg = _small_cfg()
    sim = sim_mod.Simulator(cfg)
    val = [sim.measure(4, "val", i) for i in range(3)]
    v, truth = np.stack([s["v"] for s in val]), np.stack([s["sigma"] for s in val])
    base = gn_config(cfg)
    result = tune_gauss_newton(sim.coarse, sim.grid, v, truth, base, [0.5, 2.0], [2, 4])
    for row in result["candidates"]:
        kwargs = {**base, "lam": row["lam"], "max_iter": row["max_iter"]}
        images = [sim.grid.to_image(gauss_newton(sim.coarse, x, **kwargs).sigma) for x in v]
        assert row["val_mse"] == pytest.approx(float(np.mean((np.stack(images) - truth) ** 2)), rel=1e-9)
    assert result["val_mse"] == min(r["val_mse"] for r in result["candidates"])
    with pytest.raises(InputError, match="tune_lam factors must be positive"):
        tuning_grid(_small_cfg("gn.tune_lam=[0.5, -1]"))
    with pytest.raises(InputError, match="needs validation images"):
        sim_mod.check_config(_small_cfg("data.n_val=0"), 0)


def test_sample_depends_only_on_seed_split_index(reference):
    sim = _file_simulator(reference)
    part = sim.chunk(11, "val", 5, 7)
    ref = storage.read_split(reference, "val", storage.ARRAY_KEYS)
    for key in storage.ARRAY_KEYS:
        np.testing.assert_array_equal(part[key], ref[key][5:7])
    # another noise level keeps the phantoms and scales the same noise draw
    noisier = _file_simulator(reference, "data.snr_db=25").chunk(11, "val", 5, 7)
    np.testing.assert_array_equal(noisier["sigma"], part["sigma"])
    np.testing.assert_array_equal(noisier["v_clean"], part["v_clean"])
    assert not np.allclose(noisier["v"], part["v"])
    other_split = sim.chunk(11, "test", 5, 6)
    other_seed = sim.chunk(12, "val", 5, 6)
    assert not np.array_equal(other_split["v"], part["v"][:1])
    assert not np.array_equal(other_seed["v"], part["v"][:1])


def test_workers_do_not_change_the_file(reference, tmp_path, capsys):
    out = tmp_path / "two.h5"
    args = ["simulate", "--profile", "smoke", *sum((["--set", s] for s in SMALL), []), "--seed", "11",
            "--workers", "2", "--chunk-size", "3", "--quiet", "--out", str(out)]
    assert main(args) == 0
    assert _digest(out) == _digest(reference)
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    # another config: refused, file untouched; --overwrite replaces it
    before = _digest(out)
    assert main(args[:-2] + ["--snr-db", "25", "--workers", "1", "--out", str(out)]) == 2
    assert "another config (data.snr_db: 40.0 -> 25.0)" in capsys.readouterr().err
    assert _digest(out) == before
    assert main(args + ["--snr-db", "25", "--workers", "1", "--overwrite"]) == 0
    assert _digest(out) != before
    assert storage.dataset_config(out)["data"]["snr_db"] == 25.0


def _done_chunks(partial):
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return sum(int(f[storage.DONE_GROUP][s][()].sum()) for s in storage.SPLITS)
    except (OSError, KeyError):
        return 0


def _descendants(pid):
    """Process ids below ``pid`` (Linux /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigkill_then_resume_gives_the_same_file(reference, tmp_path, workers):
    out = tmp_path / "killed.h5"
    partial = storage.partial_path(out)
    cmd = [sys.executable, "-m", "dgm_eit", "simulate", "--profile", "smoke", *sum((["--set", s] for s in SMALL), []),
           "--seed", "11", "--workers", workers, "--chunk-size", "2", "--quiet", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 900   # only ends a test that would hang: a busy machine is slow
    try:
        while _done_chunks(partial) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the simulation made no progress"
            time.sleep(0.02)
    finally:
        helpers = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = _done_chunks(partial)
    assert 3 <= done < 16, "killed too late to test a resume"
    if workers != "1":
        assert helpers, "expected worker processes"
    # worker processes (and the forkserver) notice and go, rather than idle forever (at once;
    # 60 s only ends a test that would wait for ever)
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [p for p in helpers if _alive(p)]
    for pid in survivors:  # do not leave them behind when the check fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "worker processes outlived the killed simulation"
    assert not out.exists()
    with pytest.raises(InputError, match="incomplete"):
        storage.open_dataset(partial)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    assert _digest(out) == _digest(reference)
    assert not partial.exists() and not list(out.parent.glob(f"{out.stem}.tmp-*"))


def test_dask_cluster_gives_the_same_file(reference, tmp_path):
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "dask.h5"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, host="127.0.0.1", protocol="tcp://",
                                  dashboard_address=":0") as cluster:
        sim_mod.simulate_dataset(_small_cfg(), out, seed=11, scheduler=cluster.scheduler_address,
                                 chunk_size=4, progress=False)
    assert _digest(out) == _digest(reference)


def test_bad_input_fails_cleanly(tmp_path, capsys):
    out = tmp_path / "bad.h5"
    base = ["simulate", "--profile", "smoke", "--quiet", "--out", str(out)]
    assert main(base + ["--anomalies", "4", "--set", "phantom.gap=0.8"]) == 2
    assert "cannot fit" in capsys.readouterr().err
    assert main(base + ["--set", "simulation.h0=0.2"]) == 2
    assert "coarser than the inversion mesh" in capsys.readouterr().err
    assert main(base + ["--set", "data.n_trian=3"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    assert main(base + ["--seed", "-1"]) == 2
    assert "--seed" in capsys.readouterr().err
    assert main(base + ["--set", "mesh.radius=0"]) == 2
    assert "mesh.radius must be a positive length" in capsys.readouterr().err
    assert not out.exists() and not storage.partial_path(out).exists()
    # a damaged file at the output path is not silently replaced
    out.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert main(base + SMALL[:0] + ["--set", "data.n_train=2", "--set", "data.n_val=1", "--set", "data.n_test=1"]) == 2
    assert "not a finished dgm-eit data set" in capsys.readouterr().err


def test_mesh_radius_and_first_electrode_angle_place_the_disk(reference):
    """[mesh] radius and first_electrode_angle. A config written before they were keys reads as
    their defaults (the same data set). A disk 2.5 times larger, meshed with h0 in its unit, is the
    unit disk scaled, and the phantoms scale with it: 2-D conduction is scale-free, so the point
    electrodes measure the same voltages and GN makes the same image."""
    from dgm_eit.config import config_changes
    from dgm_eit.physics import forward_model_from_config

    before_keys = _small_cfg()
    del before_keys["mesh"]["radius"], before_keys["mesh"]["first_electrode_angle"]
    assert config_changes(before_keys, _small_cfg()) == ""
    assert sim_mod.identity_json(before_keys, 11) == sim_mod.identity_json(_small_cfg(), 11)
    assert forward_model_from_config(before_keys).mesh is forward_model_from_config(_small_cfg()).mesh

    unit = _file_simulator(reference)
    wide = _file_simulator(reference, "mesh.radius=2.5", "mesh.h0=0.25", "simulation.h0=0.1875")
    assert wide.coarse.mesh.radius == wide.fine.mesh.radius == 2.5
    np.testing.assert_allclose(wide.fine.mesh.nodes, 2.5 * unit.fine.mesh.nodes, rtol=1e-12, atol=1e-12)
    a, b = unit.sample(11, "val", 3), wide.sample(11, "val", 3)
    np.testing.assert_array_equal(b["sigma"], a["sigma"])
    np.testing.assert_allclose(b["v_clean"], a["v_clean"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b["gn"], a["gn"], rtol=1e-6, atol=1e-7)

    turned = forward_model_from_config(_small_cfg("mesh.radius=2.0", f"mesh.first_electrode_angle={np.pi / 2}"))
    electrodes = turned.mesh.nodes[[int(turned.mesh.electrode_nodes[k][0]) for k in (0, 4)]]
    np.testing.assert_allclose(electrodes, [[0.0, 2.0], [-2.0, 0.0]], atol=1e-12)   # counter-clockwise


def test_inspect_and_show(reference, tmp_path, capsys):
    assert main(["inspect", str(reference), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["splits"]["train"]["samples"] == 16
    assert abs(info["splits"]["test"]["snr_db_mean"] - 40) < 1.0
    assert info["splits"]["train"]["sigma_values"] == [0.0, 0.5, 1.0, 1.5]
    assert main(["inspect", str(reference)]) == 0
    assert "measured" not in capsys.readouterr().err
    fig = tmp_path / "s.png"
    assert main(["show", str(reference), "--split", "val", "--index", "2", "--out", str(fig)]) == 0
    assert fig.read_bytes()[:4] == b"\x89PNG"
    assert main(["show", str(reference), "--split", "val", "--index", "8"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_bench_simulate_reports_paper_scale(capsys):
    from dgm_eit.data.bench import PAPER_SAMPLES, measure

    result = measure(_small_cfg(), samples=6, workers=1, chunk_size=2)
    assert result["samples_per_s"] > 0 and result["cpu_s_per_sample"] > 0
    expected = (result["startup_s"] + PAPER_SAMPLES / result["samples_per_s"]) / 60
    assert result["paper_scale_minutes"] == pytest.approx(expected)
    assert main(["bench", "simulate", "--json", "--samples", "4", "--workers", "1"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"samples_per_s", "workers", "paper_scale_minutes"} <= set(last)
    assert last["workers"] == 1 and last["image_size"] == 128


def test_partial_of_another_version_is_not_resumed(tmp_path, monkeypatch):
    cfg = _small_cfg()
    out = tmp_path / "v.h5"
    broken = _StandIn(fail_after=1)
    monkeypatch.setattr(sim_mod, "simulator_for", lambda cfg_json: broken)
    with pytest.raises(_Interrupted):
        sim_mod.simulate_dataset(cfg, out, seed=0, workers=1, chunk_size=4, progress=False)
    with h5py.File(storage.partial_path(out), "r+") as f:
        f.attrs["dgm_eit_version"] = "0.0.1"
    fresh = _StandIn()
    monkeypatch.setattr(sim_mod, "simulator_for", lambda cfg_json: fresh)
    with pytest.raises(InputError, match="started by dgm-eit 0.0.1"):
        sim_mod.simulate_dataset(cfg, out, seed=0, workers=1, progress=False)
    result = sim_mod.simulate_dataset(cfg, out, seed=0, workers=1, overwrite=True, progress=False)
    assert result.resumed_samples == 0 and out.exists()


def test_a_config_finds_the_simulator_of_the_study_that_owns_it(monkeypatch):
    import dgm_eit.studies  # noqa: F401  (the shipped studies, as the CLI registers them)
    from dgm_eit import simulators

    assert simulators.simulator_class(_small_cfg()) is sim_mod.Simulator
    tank = load_config("ktc")
    assert simulators.study_name(tank) == "ktc" and simulators.simulator_class(tank).__name__ == "KTCSimulator"
    # its settings record reaches the tank's rule, not GN's (the config has no [gn])
    record = {"kind": "ktc-linear", "prior_std": 0.7, "corr_length": 0.05}
    assert simulators.apply_settings(tank, record)["linear"]["prior_std"] == 0.7
    assert "gn" not in simulators.apply_settings(tank, record)
    with pytest.raises(InputError, match=r"no registered study owns this config.*\[tank\] \(ktc\)"):
        simulators.simulator_class({"data": {}, "phantom": {}})
    # a third study on a disk mesh keeps the disk's sections and adds its own: its simulator wins
    monkeypatch.setitem(simulators._ENTRIES, "third", None)   # removed again after the test
    simulators.register_simulator("third", "third_tank", "dgm_eit.ktc.simulate:KTCSimulator")
    third = dict(_small_cfg(), third_tank={})
    assert simulators.study_name(third) == "third" and simulators.study_name(_small_cfg()) == "disk"
    with pytest.raises(InputError, match="sections of several studies"):
        simulators.study_name(dict(third, tank={}))
    with pytest.raises(ValueError, match="already registered"):
        simulators.register_simulator("ktc", "tank", "dgm_eit.data.simulate:Simulator")
