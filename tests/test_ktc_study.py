"""The KTC2023 study: tank model, linearised and GN difference reconstructions, segmentation
and its threshold choice, the simulated tank data set, ``dgm-eit run --profile ktc`` and the
``dgm-eit ktc`` entry point, on small meshes and tiny data the tests make."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import scipy.io as sio

from dgm_eit.cli import main
from dgm_eit.config import load_config
from dgm_eit.datasets import ktc2023 as ktc
from dgm_eit.errors import InputError
from dgm_eit.ktc import nuisance, segment
from dgm_eit.methods import get_method
from dgm_eit.stats import order_agreement, rank_agreement
from dgm_eit.ktc.tank import DifferenceReconstructor, Tank, public_dir

# coarse meshes and a 16-pixel grid: every test here takes seconds
SMALL = ["tank.sim_h0=0.006", "tank.h0=0.008", "data.image_size=16", "linear.tune_prior_std=[0.5,2.0]",
         "linear.tune_corr_length=[0.06]", "linear.tune_images=8"]
TINY_RUN = SMALL + ["data.n_train=32", "data.n_val=12", "run.tune_images=8", "run.levels=[1,4]",
                    "cvae.vae.epochs=1", "cvae.regressor.epochs=1", "cnf.flow.epochs=1", "score.score.epochs=1",
                    "run.csd_tune_t0=[0.5]", "run.csd_tune_dc_weight=[3.0]", "iterated.prior_scale=[1.0]", "run.csd_tune_images=4", "run.cnf_samples=4", "run.csd_samples=2",
                    "csd.n_steps=5", "run.csd_tune_steps=[5]", "iterated.iterations=[2]", "train.progress=false",
                    "run.jobs=2", "cnf.hidden_channels=[8,8,8]", "cnf.cond_channels=[4,4,4]", "score.nf=8",
                    "unet.regression.epochs=1", "unet.channels=[8,8]"]


def small_cfg(*extra):
    return load_config("ktc", SMALL + list(extra))


@pytest.fixture(scope="module")
def tank():
    return Tank(small_cfg())


@pytest.fixture(scope="module")
def rec(tank):
    return DifferenceReconstructor(tank, 1.0, 0.06)


def inclusion_dv(tank, value, centre=(0.05, 0.0), radius=0.025):
    """Fine-mesh difference voltages of one disk of relative conductivity ``value``."""
    c = tank.fine.mesh.centroids
    inside = np.hypot(c[:, 0] - centre[0], c[:, 1] - centre[1]) < radius
    sigma = tank.sigma_bg * np.where(inside, value, 1.0)
    return tank.fine.forward(sigma) - tank.u_water


def test_tank_is_fitted_to_the_shipped_reference(tank):
    assert 0.6 < tank.sigma_bg < 0.9 and tank.fit.residual < 0.12
    assert tank.noise_std.shape == (ktc.N_MEAS,) and np.all(tank.noise_std > 0)
    # the organisers' model, 0.05 % of |U_ref| and 0.01 % of its maximum, times tank.noise_scale
    u = tank.ref.voltages
    organisers = Tank(small_cfg("tank.noise_scale=1.0")).noise_std
    assert organisers[0] == pytest.approx(np.hypot(5e-4 * abs(u[0]), 1e-4 * np.abs(u).max()))
    np.testing.assert_allclose(tank.noise_std, small_cfg()["tank"]["noise_scale"] * organisers, rtol=1e-12)
    assert "fitted to ref.mat" in tank.describe()
    for key, value in (("tank.sim_h0", 0.01), ("tank.noise_scale", -1), ("tank.data_std", -0.1)):
        with pytest.raises(InputError, match=key):
            Tank(small_cfg(f"{key}={value}"))


def test_the_data_term_weighs_every_measurement_alike_or_by_the_noise_model(tank, rec):
    assert tank.data_std.shape == tank.noise_std.shape
    np.testing.assert_array_equal(rec.weights, np.full(ktc.N_MEAS, 1 / 0.03**2))   # the profile's data_std
    older = small_cfg()
    del older["tank"]["data_std"]   # a study made before the key weighed by the noise model
    by_noise = [DifferenceReconstructor(Tank(cfg), 1.0, 0.06) for cfg in (small_cfg("tank.data_std=0.0"), older)]
    for r in by_noise:
        np.testing.assert_array_equal(r.weights, 1 / r.tank.noise_std**2)
        # the simulated noise stays the organisers' either way
        np.testing.assert_array_equal(r.tank.noise_std, tank.noise_std)
    # the weighting changes the image
    dv = inclusion_dv(tank, 20.0)
    assert not np.allclose(rec.linear(dv), by_noise[0].linear(dv))


def test_linear_image_finds_a_conductive_and_a_resistive_inclusion(tank, rec):
    grid = tank.grid
    near = np.hypot(grid.x - 0.05, grid.y) < 0.02
    for value, sign in ((20.0, 1), (0.01, -1)):
        image = rec.linear(inclusion_dv(tank, value))
        assert image.shape == grid.shape and np.all(image[~grid.inside] == 0)
        contrast = image[near].mean() - 1.0
        assert sign * contrast > 0.1, (value, contrast)
        assert sign * contrast > abs(image[grid.inside & ~near].mean() - 1.0)


def test_masked_and_nan_measurements_are_left_out_alike(tank, rec):
    dv = inclusion_dv(tank, 20.0)
    mask = ktc.level_mask(3, tank.ref.injections, tank.ref.pattern)
    with_nan = np.where(mask, dv, np.nan)
    garbage = np.where(mask, dv, 1e3)
    np.testing.assert_allclose(rec.linear(with_nan), rec.linear(garbage, mask))
    assert not np.allclose(rec.linear(dv), rec.linear(dv, mask))
    with pytest.raises(InputError, match="usable measurements"):
        rec.linear(np.full(ktc.N_MEAS, np.nan))
    with pytest.raises(InputError, match="shape"):
        rec.linear(dv[:100])
    with pytest.raises(InputError, match="mask"):
        rec.linear(dv, mask[:10])


def test_gauss_newton_starts_at_the_linear_step_and_fits_the_data_better(tank):
    rec = DifferenceReconstructor(tank, 4.0, 0.06)   # the top of the profile's prior grid: the data term leads
    dv = inclusion_dv(tank, 50.0, radius=0.03)
    path = rec.gauss_newton_path(dv[None], None, [1, 4])
    # on u = log x: the first iterate is exp of the linearised change (clipped to the bounds)
    inside = tank.grid.inside
    expected = np.clip(np.exp(rec.linear(dv)[inside] - 1.0), 1e-2, 1e2)
    np.testing.assert_allclose(path[1][0][inside], expected, rtol=1e-10)
    np.testing.assert_allclose(rec.gauss_newton(dv, None, 4), path[4][0])

    def misfit(image):
        x = image[tank.grid.inside]
        v, _ = rec._jacobian(x)
        return np.sum(((dv - (v - rec.v_water)) / tank.data_std) ** 2)

    assert misfit(path[4][0]) < 0.7 * misfit(path[1][0])
    with pytest.raises(InputError, match="iteration counts"):
        rec.gauss_newton_path(dv[None], None, [0])


class RecordedPool(ProcessPoolExecutor):
    """The pool Gauss-Newton starts, with its worker processes kept for a look after it ends."""

    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.workers = []
        RecordedPool.made.append(self)

    def submit(self, *args, **kwargs):
        future = super().submit(*args, **kwargs)
        self.workers = list(self._processes.values())
        return future


@pytest.fixture
def recorded_pools(monkeypatch):
    from dgm_eit.ktc import tank as tank_module

    RecordedPool.made = []
    monkeypatch.setattr(tank_module, "ProcessPoolExecutor", RecordedPool)
    return RecordedPool.made


def gn_inputs(tank):
    """Five difference-voltage rows: inclusions of both kinds, a level's mask and NaN rows."""
    dv = np.stack([inclusion_dv(tank, v, centre=c) for v, c in
                   ((20.0, (0.05, 0.0)), (0.05, (-0.04, 0.03)), (5.0, (0.0, -0.06)), (0.2, (0.03, 0.05)),
                    (50.0, (-0.05, -0.02)))])
    masks = np.ones(dv.shape, dtype=bool)
    masks[1] = ktc.level_mask(4, tank.ref.injections, tank.ref.pattern)
    dv[3, :200] = np.nan
    return dv, masks


def test_gauss_newton_in_processes_gives_the_serial_bits_and_leaves_no_worker(tank, rec, recorded_pools,
                                                                              monkeypatch):
    from dgm_eit.ktc import tank as tank_module

    dv, masks = gn_inputs(tank)
    serial = rec.gauss_newton_path(dv, masks, [1, 3, 4], workers=1)
    assert recorded_pools == []
    parallel = rec.gauss_newton_path(dv, masks, [4, 1, 3], workers=2)
    assert sorted(parallel) == sorted(serial) == [1, 3, 4]
    for k in serial:
        np.testing.assert_array_equal(parallel[k], serial[k])
    # by default: every core once there are enough images, one process otherwise
    monkeypatch.setattr(tank_module, "cpu_count", lambda: 3)
    monkeypatch.setattr(tank_module, "MIN_IMAGES_PER_WORKER", 2)
    np.testing.assert_array_equal(rec.gauss_newton_path(dv, masks, [3])[3], serial[3])
    np.testing.assert_array_equal(rec.gauss_newton_path(dv[:3], masks[:3], [3])[3], serial[3][:3])
    assert [pool._max_workers for pool in recorded_pools] == [2, 2]
    # the workers ended with the call, normally
    workers = [w for pool in recorded_pools for w in pool.workers]
    assert len(workers) >= 2 and all(not w.is_alive() and w.exitcode == 0 for w in workers)
    # bad input is refused before any worker starts
    dv[2] = np.nan
    with pytest.raises(InputError, match="usable measurements"):
        rec.gauss_newton_path(dv, masks, [2], workers=2)
    assert len(recorded_pools) == 2


def test_the_tank_supplies_its_classical_reconstructions_by_kind(tmp_path):
    """What the study asks of the tank for a classical method or a sampler's data term, by kind."""
    from dgm_eit.ktc.physics import TankPhysics
    from dgm_eit.methods import StudyPhysics

    physics = TankPhysics(small_cfg("iterated.iterations=[1,2]", "iterated.prior_scale=[1.0,2.0]"),
                          tmp_path / "absent.h5")
    assert isinstance(physics, StudyPhysics) and physics.classical_kinds == ("linear", "gn")
    dv, masks = gn_inputs(physics.sim.tank)
    linear = physics.classical_image(dv, masks)
    np.testing.assert_array_equal(physics.classical("linear", dv, masks, {}), linear)
    np.testing.assert_array_equal(linear[1], physics.sim.recon.linear(dv[1], masks[1]))
    base = physics.sim.recon.prior_std
    candidates = physics.candidates("gn", dv, masks)
    assert [(c["iterations"], c["prior_std"]) for c, _ in candidates] == [
        (1, base), (2, base), (1, 2 * base), (2, 2 * base)]
    np.testing.assert_array_equal(physics.classical("gn", dv, masks, candidates[3][0]), candidates[3][1])
    assert not np.array_equal(candidates[3][1], candidates[1][1])   # GN's own prior changes its images
    with pytest.raises(InputError, match="the tank makes no 'kotre' reconstruction; it makes linear, gn"):
        physics.classical("kotre", dv, masks, {})
    with pytest.raises(InputError, match="data term for dds only, not for the sampler 'dps'"):
        physics.sample(None, linear, dv, masks, {"sampler": "dps"}, seed=0)
    with pytest.raises(InputError, match="absent.h5 to fit the linearised data term on"):
        physics.data_term_record()


CTRL_C_SCRIPT = """
import os, signal, sys, threading, time
import numpy as np
# a suite started in the background of a non-interactive shell inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {tests!r})
from test_ktc_study import RecordedPool, gn_inputs, small_cfg
from dgm_eit.ktc import tank as tank_module

class InterruptedPool(RecordedPool):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()

tank_module.ProcessPoolExecutor = InterruptedPool
tank = tank_module.Tank(small_cfg())
dv, masks = gn_inputs(tank)
start = time.perf_counter()
try:   # minutes of work in one process
    tank_module.DifferenceReconstructor(tank, 1.0, 0.06).gauss_newton_path(
        np.repeat(dv, 200, axis=0), np.repeat(masks, 200, axis=0), [8], workers=2)
except KeyboardInterrupt:
    workers = RecordedPool.made[0].workers
    print("stopped after", time.perf_counter() - start, "s;", len(workers), "workers,",
          sum(w.is_alive() for w in workers), "alive")
"""


def test_ctrl_c_stops_the_gauss_newton_pool_at_once_and_the_process_exits():
    import re
    import subprocess
    import sys
    from pathlib import Path

    # in a process of its own: a pool stopped with its task pipe full once kept the interpreter
    # from exiting (the queue's feeder thread blocked on a pipe no worker read any more)
    done = subprocess.run([sys.executable, "-c", CTRL_C_SCRIPT.format(tests=str(Path(__file__).parent))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seconds, workers, alive = re.search(r"stopped after (\S+) s; (\d+) workers, (\d+) alive", done.stdout).groups()
    assert float(seconds) < 30 and int(workers) == 2 and int(alive) == 0


def test_upsample_and_segment():
    img = np.ones((16, 16))
    img[6:10, 2:5] = 0.0       # resistive
    img[6:10, 11:14] = 2.0     # conductive
    up = segment.upsample(img)
    assert up.shape == (256, 256) and up[0, 0] == 1.0      # water outside the disk, not 0
    classes = segment.segment(up, 0.5, 1.5)
    assert classes.dtype == np.uint8 and set(np.unique(classes)) == {0, 1, 2}
    assert classes[128, 50] == 1 and classes[128, 200] == 2 and classes[10, 128] == 0
    np.testing.assert_array_equal(segment.segment_images(img[None], 0.5, 1.5)[0], classes)
    with pytest.raises(InputError, match="low < 1 < high"):
        segment.segment(up, 1.2, 1.5)


def test_threshold_choice_matches_the_exact_score():
    rng = np.random.default_rng(0)
    truths, images = [], []
    for _ in range(4):
        t = np.zeros((256, 256), np.uint8)
        r, c = rng.integers(40, 160, 2)
        t[r:r + 50, c:c + 50] = 1 + rng.integers(2)
        truths.append(t)
        # images whose objects sit at 0.6 (resistive) and 1.6 (conductive) plus noise
        images.append(1.0 + 0.6 * ((t == 2) * 1.0 - (t == 1)) + 0.05 * rng.standard_normal(t.shape))
    best = segment.tune_thresholds(np.stack(images), np.stack(truths))
    assert 0.5 < best["low"] < 0.85 and 1.15 < best["high"] < 1.55
    exact = np.mean([ktc.score(segment.segment(x, best["low"], best["high"]), t) for x, t in zip(images, truths)])
    assert best["score"] == pytest.approx(exact, abs=1e-5) and best["score"] > 0.95


def test_simulated_tank_data_set(tmp_path):
    from dgm_eit.data.simulate import simulate_dataset
    from dgm_eit.data.storage import dataset_gn_settings, read_split
    from dgm_eit.ktc.simulate import KTCSimulator, apply_linear_settings

    cfg = small_cfg("data.n_train=6", "data.n_val=8", "data.n_test=0")
    paths = [tmp_path / "a.h5", tmp_path / "b.h5"]
    for p in paths:
        simulate_dataset(cfg, p, seed=3, workers=1, progress=False)
    a, b = (read_split(p, "val", keys=("sigma", "v", "gn", "gn_extra")) for p in paths)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    settings = dataset_gn_settings(paths[0])
    assert settings["kind"] == "ktc-linear" and settings["tuned"] and len(settings["candidates"]) == 2
    assert settings["prior_std"] in (0.5, 2.0) and settings["tuned_on"] == "val[:8]"
    sim = KTCSimulator(apply_linear_settings(cfg, settings))
    assert set(np.unique(a["sigma"])) <= {0.0} | set(np.unique(a["sigma"][:, sim.inside]))
    assert a["sigma"].min() >= 0 and a["sigma"].max() <= 2
    for i in range(8):
        m = sim.measure(3, "val", i)
        # dropped measurements are 0 in v and left out of the conditioning image
        assert np.all(a["v"][i][~m["mask"]] == 0)
        np.testing.assert_allclose(a["gn"][i], sim.recon.linear(m["v"], m["mask"]), atol=1e-5)
        assert sim.truth_classes(3, "val", i).shape == (256, 256)
    # the profile's extra images: the same step with the chosen prior scaled by each pair of factors
    assert sim.extra_factors == [(0.25, 1.0), (4.0, 1.0), (1.0, 3.0)] and a["gn_extra"].shape == (8, 3, 16, 16)
    m = sim.measure(3, "val", 5)
    for k, (std, length) in enumerate(sim.extra_factors):
        rec = DifferenceReconstructor(sim.tank, settings["prior_std"] * std, settings["corr_length"] * length)
        np.testing.assert_allclose(a["gn_extra"][5, k], rec.linear(m["v"], m["mask"]), atol=1e-5)
    masks = np.stack([sim.measure(3, "val", i)["mask"] for i in range(8)])
    np.testing.assert_allclose(sim.extra(a["v"], masks), a["gn_extra"], atol=1e-5)   # what the study feeds the U-Net
    assert not np.allclose(a["gn_extra"][:, 0], a["gn_extra"][:, 1])
    # none without them; a bad list is refused naming the key
    simulate_dataset(small_cfg("data.n_train=2", "data.n_val=2", "data.n_test=0", "linear.extra_images=[]"),
                     tmp_path / "c.h5", seed=3, workers=1, progress=False)
    with pytest.raises(InputError, match="has no gn_extra images"):
        read_split(tmp_path / "c.h5", "val", keys=("gn_extra",))
    for bad in ("[[1.0]]", "[[0.0, 1.0]]", "[1.0, 2.0]"):
        with pytest.raises(InputError, match="linear.extra_images must list"):
            KTCSimulator.check_config(small_cfg(f"linear.extra_images={bad}"), 0)


def test_ktc_run_and_entry_point(ktc_tiny_study, tmp_path, capsys):
    from dgm_eit.ktc.study import Methods, load_study, validation_pairs

    out, args = ktc_tiny_study
    report = (out / "report.md").read_text()
    assert "Nothing here was tuned on the real targets" in report and "| CSD* |" in report
    cfg, chosen = load_study(out)
    assert f"- {nuisance.describe(cfg['tank'])}." in report
    assert "- The same step at 3 other priors (std, correlation length: (" in report
    assert "`linear.extra_images`, set a priori): input channels of `cvae`, `unet` (`inputs`)." in report
    # the profile's U-Net and CVAE read them, trained and run on the tank alike; its CNF does not
    model = Methods(cfg, out).model(get_method("unet"))
    assert model.needs_extra and model.info.extra_images == 3 and model.net.down[0][0].in_channels == 4
    model = Methods(cfg, out).model(get_method("cvae"))
    assert model.needs_extra and model.regressor.net[0].in_channels == 4
    assert not Methods(cfg, out).model(get_method("cnf")).needs_extra
    from dgm_eit.reconstruct import reconstruct_voltages   # raw voltages need the tank's own entry point
    with pytest.raises(InputError, match="no \\[mesh\\] to make the GN images of raw voltages.*dgm-eit ktc"):
        reconstruct_voltages(out / "runs" / "unet" / "seed0", np.full((1, ktc.N_MEAS), 1e-3), device="cpu")
    # the sim-to-real agreement: the rank correlation of the validation scores and the targets' totals
    val, total = {m: chosen[m]["score"] for m in chosen}, dict.fromkeys(chosen, 0.0)
    for method, _, _, _, score in (r.split(",") for r in (out / "scores.csv").read_text().splitlines()[1:]):
        total[method] += float(score)
    assert f"rank correlation of {rank_agreement(val, total):.2f} " in report
    # ... and which pairs validation separates (paired over its images), and how many the targets order alike
    pairs = validation_pairs(chosen, resamples=int(cfg["run"]["bootstrap_resamples"]))
    split = order_agreement(pairs, total)
    assert len(pairs) == 15 and sum(map(len, split.values())) == 15
    assert (f"Of the 15 pairs of methods, validation separates {len(split['agree']) + len(split['disagree'])} "
            f"(the paired 95% interval") in report
    assert f"order {len(split['agree'])} of them the same way" in report
    scores = (out / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + 6 * 2 * 4    # methods x levels x targets
    assert set(chosen) == {"linear", "gn", "cvae", "cnf", "csd", "unet"} and chosen["gn"]["iterations"] == 2
    assert len(chosen["cnf"]["seeds"]) == 1 and chosen["cnf"]["score"] == chosen["cnf"]["seeds"][0]["score"]
    # the submissions are the challenge's format and score as scores.csv says
    rows = [r.split(",") for r in scores[1:]]
    assert {r[1] for r in rows if r[0] == "cnf"} == {"0"} and {r[1] for r in rows if r[0] == "gn"} == {"-"}
    for method, seed, level, target, score in rows[:8] + rows[-8:]:
        where = out / "submissions" / method / ("" if seed == "-" else f"seed{seed}")
        pred = ktc.load_reconstruction(where / f"level_{level}" / f"{target}.mat")
        truth = ktc.load_truth(public_dir() / f"true{target}.mat")
        assert ktc.score(pred, truth) == pytest.approx(float(score), abs=1e-6)
    # re-running reuses every stage and writes the same scores and submissions, byte for byte;
    # the times are in timings.json
    def outputs():
        return {p.relative_to(out): p.read_bytes() for p in [out / "scores.csv", *(out / "submissions").rglob("*.mat")]}

    first = outputs()
    assert len(first) == 1 + 6 * 2 * 4
    assert set(json.loads((out / "timings.json").read_text())["seconds_per_image"]) == set(chosen)
    assert main(args) == 0
    assert outputs() == first
    # the entry point on the public files at level 4 reproduces the study's submission
    pred_dir = tmp_path / "pred"
    assert main(["ktc", str(public_dir()), str(pred_dir), "4", "--run", str(out), "--method", "linear"]) == 0
    for n in range(1, 5):
        np.testing.assert_array_equal(sio.loadmat(pred_dir / f"{n}.mat")["reconstruction"],
                                      sio.loadmat(out / "submissions" / "linear" / "level_4" / f"{n}.mat")["reconstruction"])
    # from Python (the CLI's own path) and through the README's example: the study's CNF submission,
    # with its images and std maps
    from dgm_eit.ktc.entry import reconstruct_folder
    from test_examples import run_example

    made = reconstruct_folder(public_dir(), 4, out, method="cnf", seed=1)
    assert made.numbers == [1, 2, 3, 4] and made.method == "cnf" and made.val_score == chosen["cnf"]["score"]
    assert made.recon.shape == made.recon_std.shape == (4, 16, 16) and np.all(made.recon_std >= 0)
    capsys.readouterr()
    run_example("ktc_folder.py", out, public_dir(), 4, "--method", "cnf", "--seed", 1, "--out", tmp_path / "ex")
    printed = capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "ex" / "images.npy"), made.recon)
    for n, classes in zip(made.numbers, made.classes):
        submitted = sio.loadmat(out / "submissions" / "cnf" / "seed0" / "level_4" / f"{n}.mat")["reconstruction"]
        np.testing.assert_array_equal(classes, submitted)
        np.testing.assert_array_equal(sio.loadmat(tmp_path / "ex" / f"{n}.mat")["reconstruction"], submitted)
        score = next(float(s) for m, _, lv, tg, s in rows if (m, lv, tg) == ("cnf", "4", str(n)))
        line = next(x for x in printed.splitlines() if x.startswith(f"data{n}.mat -> "))
        assert line.endswith(f"score {score:.3f}")
    assert (tmp_path / "ex" / "ktc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the challenge's evaluation files: the dropped electrodes' data are NaN
    nan_dir = tmp_path / "nan_inputs"
    nan_dir.mkdir()
    ref = ktc.load_reference(public_dir() / "ref.mat")
    keep = ktc.level_mask(4, ref.injections, ref.pattern)
    sio.savemat(nan_dir / "ref.mat", {k: v for k, v in sio.loadmat(public_dir() / "ref.mat").items()
                                      if not k.startswith("__")})
    for n in range(1, 5):
        d = sio.loadmat(public_dir() / f"data{n}.mat")
        d["Uel"] = np.where(keep[:, None], d["Uel"], np.nan)
        sio.savemat(nan_dir / f"data{n}.mat", {k: d[k] for k in ("Uel", "Inj", "Mpat")})
    assert main(["ktc", str(nan_dir), str(tmp_path / "pred_nan"), "4", "--run", str(out), "--method", "linear"]) == 0
    for n in range(1, 5):
        np.testing.assert_array_equal(sio.loadmat(tmp_path / "pred_nan" / f"{n}.mat")["reconstruction"],
                                      sio.loadmat(pred_dir / f"{n}.mat")["reconstruction"])
    capsys.readouterr()
    assert main(["ktc", str(public_dir()), str(tmp_path / "best"), "1", "--run", str(out)]) == 0
    assert len(list((tmp_path / "best").glob("*.mat"))) == 4
    # the default is said, with the reason, and is the report's
    said = capsys.readouterr().err
    assert said.startswith("dgm-eit ktc: method ") and "validation score" in said
    name = said.split("dgm-eit ktc: method ")[1].split(":")[0]
    assert f"**Default method of `dgm-eit ktc`: {name}**" in report
    # a changed config is refused, not mixed into the same directory
    capsys.readouterr()
    assert main(args + ["--set", "phantom.gap=0.1"]) == 2
    assert "different config" in capsys.readouterr().err


def test_the_study_chose_gn_on_the_bits_of_one_process(ktc_tiny_study, monkeypatch):
    """Its 8 validation images went through the pool wherever there are two cores."""
    from dgm_eit.ktc import tank as tank_module
    from dgm_eit.ktc.study import Methods, choose_settings, load_study, validation_set

    out, _ = ktc_tiny_study
    cfg, chosen = load_study(out)
    monkeypatch.setattr(tank_module, "MIN_IMAGES_PER_WORKER", 10**9)
    methods = Methods(cfg, out, seed=1)
    again = choose_settings(methods, "gn", validation_set(methods, chosen["gn"]["n_images"]), log=lambda m: None)
    keys = ("iterations", "prior_std", "low", "high", "score", "image_scores")
    assert {k: again[k] for k in keys} == {k: chosen["gn"][k] for k in keys}


def test_ktc_entry_point_errors(tmp_path, capsys):
    from test_cli import fails

    fails(capsys, ["ktc", public_dir(), tmp_path / "o", "8", "--run", tmp_path], "level")
    fails(capsys, ["ktc", public_dir(), tmp_path / "o", "1", "--run", tmp_path], "not a directory made by")
    (tmp_path / "in").mkdir()
    (tmp_path / "run").mkdir()
    cfg = load_config("ktc", ['run.methods=["linear"]'])
    (tmp_path / "run" / "run.json").write_text(json.dumps({"seed": 0, "config": cfg}))
    (tmp_path / "run" / "methods.json").write_text(json.dumps({"linear": {"low": 0.5, "high": 1.5, "score": 0.5}}))
    fails(capsys, ["ktc", tmp_path / "in", tmp_path / "o", "1", "--run", tmp_path / "run"], "ref.mat")
    # a method is a registered key (refused before the study is read), and one the study ran
    fails(capsys, ["ktc", public_dir(), tmp_path / "o", "1", "--run", tmp_path, "--method", "gan"],
          "unknown method 'gan'", "choose from linear, gn,")
    fails(capsys, ["ktc", public_dir(), tmp_path / "o", "1", "--run", tmp_path / "run", "--method", "unet"],
          "no settings for method 'unet'", "it ran linear")
    assert not (tmp_path / "o").exists()


def test_a_model_told_to_read_extra_images_is_refused_before_any_work_where_it_cannot(tmp_path, capsys):
    from test_cli import fails

    extra = '["gn","extra"]'
    fails(capsys, ["run", "--profile", "ktc", "--out", tmp_path / "o", "--seed", "0", "--set", f"cvae.inputs={extra}",
                   "--set", "linear.extra_images=[]"], "cvae.inputs has 'extra', but linear.extra_images is empty")
    fails(capsys, ["run", "--profile", "ktc", "--out", tmp_path / "o", "--seed", "0", "--set", 'cnf.inputs=["extra"]'],
          "cnf.inputs must be ['gn'] or ['gn', 'extra']")
    assert not (tmp_path / "o").exists()


def test_ktc_study_with_two_seeds_pools_an_ensemble_and_defaults_by_the_stated_rule(tmp_path, capsys):
    from dgm_eit.ktc.study import default_method, load_study

    out = tmp_path / "study"
    tiny = [a for a in TINY_RUN if not a.startswith(("run.levels", "run.jobs"))]
    args = ["run", "--profile", "ktc", "--out", str(out), "--seed", "2", "--seeds", "2",
            "--set", 'run.methods=["linear", "cnf"]', "--set", "run.levels=[1]", "--set", "run.jobs=2"]
    # with the tank's nuisances: the data set's pool workers draw them too
    nuisances = ["tank.electrode_shift=0.003", "tank.contact_max=0.001", "tank.drift_std=0.01"]
    assert main(args + [a for s in tiny + nuisances for a in ("--set", s)]) == 0
    cfg, chosen = load_study(out)
    assert "draws its own nuisances: the electrodes' places shifted" in (out / "report.md").read_text()
    from dgm_eit.data.storage import read_split
    from dgm_eit.ktc.simulate import KTCSimulator
    from dgm_eit.ktc.study import data_path

    stored = read_split(data_path(out), "val", keys=("v",))["v"][:2]
    sim = KTCSimulator(cfg)
    remade = [sim.measure(2, "val", i)["v"] for i in range(2)]
    np.testing.assert_allclose(stored, np.stack(remade), rtol=1e-5, atol=1e-7)
    assert set(chosen) == {"linear", "cnf", "cnf-ens"}
    seeds = chosen["cnf"]["seeds"]
    assert len(seeds) == 2 and chosen["cnf"]["score"] == pytest.approx(np.mean([r["score"] for r in seeds]))
    assert all(len(r["image_scores"]) == 8 for r in seeds)
    assert chosen["cnf-ens"]["members"] == [{}, {}] and "score" in chosen["cnf-ens"]
    # a third seed: the new seed's choice, and the ensemble chosen again from all three
    from dgm_eit.ktc.study import Study

    more = {**cfg, "run": {**cfg["run"], "seeds": 3}}
    assert [m.key for m in Study(more, out, seed=2)._unchosen(chosen)] == ["cnf", "cnf-ens"]
    assert (out / "runs" / "cnf" / "seed1" / "done").is_file()
    rows = [r.split(",") for r in (out / "scores.csv").read_text().splitlines()[1:]]
    assert {(r[0], r[1]) for r in rows} == {("linear", "-"), ("cnf", "0"), ("cnf", "1"), ("cnf-ens", "-")}
    report = (out / "report.md").read_text()
    assert "| CNF ens |" in report and "the mean ± std over the seeds" in report
    default, why = default_method(chosen, resamples=cfg["run"]["bootstrap_resamples"])
    assert f"**Default method of `dgm-eit ktc`: {get_method(default).name}** — {why}." in report
    # the entry point runs the ensemble
    capsys.readouterr()
    assert main(["ktc", str(public_dir()), str(tmp_path / "ens"), "1", "--run", str(out), "--method", "cnf-ens"]) == 0
    assert "CNF ens" in capsys.readouterr().out and len(list((tmp_path / "ens").glob("*.mat"))) == 4
    # packed with both seeds, the study keeps its ensembles and its default, and makes the same submissions
    from dgm_eit.ktc import bundle
    from test_cli import fails

    packed = tmp_path / "packed"
    fails(capsys, ["ktc-pack", out, "--out", packed, "--seeds", "3"], "--seeds 3", "trained 2 seeds")
    assert main(["ktc-pack", str(out), "--out", str(packed), "--seeds", "2"]) == 0
    assert {"runs/cnf/seed0/model.safetensors", "runs/cnf/seed1/model.safetensors"} <= set(
        bundle.check_bundle(packed)["files"])
    assert load_study(packed) == load_study(out)
    record = json.loads((packed / bundle.PROVENANCE).read_text())
    assert record["shipped_seeds"] == 2 and record["default_method"] == default
    assert main(["ktc", str(public_dir()), str(tmp_path / "ens2"), "1", "--run", str(packed), "--method", "cnf-ens"]) == 0
    for n in range(1, 5):
        assert (sio.loadmat(tmp_path / "ens2" / f"{n}.mat")["reconstruction"]
                == sio.loadmat(tmp_path / "ens" / f"{n}.mat")["reconstruction"]).all()


def test_the_default_rule_prefers_a_tied_ensemble_and_a_clear_winner_otherwise():
    from dgm_eit.ktc.study import default_method

    rng = np.random.default_rng(0)

    def record(level, spread=0.05, n=40):
        return {"image_scores": (level + spread * rng.standard_normal(n)).tolist(), "score": level}

    tied = {"linear": record(0.60), "cnf": {"seeds": [record(0.80), record(0.78)], "score": 0.79},
            "cnf-ens": record(0.795), "cvae": {"seeds": [record(0.70), record(0.71)], "score": 0.705}}
    tied["cnf"]["score"] = 0.79
    method, why = default_method(tied, resamples=500)
    assert method == "cnf-ens" and "tied" in why and "seed ensemble" in why
    clear = {"linear": record(0.40), "gn": record(0.80, spread=0.01)}
    method, why = default_method(clear, resamples=500)
    assert method == "gn" and "clear of the runner-up" in why


def test_the_agreement_line_is_left_out_where_no_order_can_be_compared():
    from dgm_eit.ktc.report import _agreement

    val, real = {"linear": 0.7, "gn": 0.6, "cvae": 0.8}, {"linear": 20.0, "gn": 17.0, "cvae": 21.0}
    assert "rank correlation of 1.00 " in "".join(_agreement(val, real))
    assert _agreement({"gn": 0.6, "cvae": 0.8}, {"gn": 17.0, "cvae": 21.0}) == []    # two methods
    assert _agreement(val, dict.fromkeys(real, 20.0)) == []                           # the targets tie them all
