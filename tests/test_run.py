"""``dgm-eit run --profile smoke --seeds 2`` end to end, once per test session (a few minutes)."""

import csv
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from dgm_eit.cli import main
from dgm_eit.config import load_config
from dgm_eit.data.storage import read_split
from dgm_eit.experiments import Experiment
from dgm_eit.methods import get_method, select_methods
from dgm_eit.metrics import (CALIBRATION, COVERAGE, METRICS, SCALED_COVERAGE, calibrated_sampler_coverage, evaluate,
                             evaluate_calibration)
from dgm_eit.paper import PAPER_RESULTS, paper_mse_change, settings_for
from dgm_eit.report import CSV_COLUMNS
from dgm_eit.results import DataSpec, evaluate_file, read_recon, recon_attrs

ARGS = ["--profile", "smoke", "--seed", "0", "--seeds", "2", "--set", "train.progress=false"]
SEEDS = 2


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke_run") / "run"
    code = main(["run", "--out", str(out), *ARGS])
    return out, code


def _experiment(out) -> Experiment:
    return Experiment(load_config("smoke", [f"run.seeds={SEEDS}"]), out)


def _csv_rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        return list(reader)


def test_smoke_run_makes_every_row_table_and_figure(smoke_run):
    out, code = smoke_run
    assert code == 0
    cfg = load_config("smoke")
    settings = settings_for(cfg)
    assert len(settings) == 6
    rows = _csv_rows(out)
    methods = select_methods(cfg["run"]["methods"], ensembles=True)
    trained = [m for m in methods if m.model is not None and not m.ensemble]
    assert len(trained) == 4 and {m.key for m in methods} == {m.key for m in trained} | {
        "gn", *(m.key + "-ens" for m in trained)}
    # per seed, plus the pooled row, for every trained method; one row for GN and each ensemble;
    # a method with std maps adds its calibration figures to each, and where a seed's model
    # draws several samples, the scale chosen on validation and the coverages it gives
    blocks = {m.key: 1 + (SEEDS if m.model is not None and not m.ensemble else 0) for m in methods}
    scaled = {m.key for m in methods if m.std_map and not m.ensemble and m.n_samples(cfg["run"]) > 1}
    assert scaled == {"cnf", "csd"} and cfg["run"]["calibration_images"] > 0
    figures_per_block = {m.key: len(METRICS) + (len(CALIBRATION) if m.std_map else 0)
                         + (len(SCALED_COVERAGE) + 1 if m.key in scaled else 0) for m in methods}
    assert len(rows) == len(settings) * sum(blocks[k] * figures_per_block[k] for k in blocks)
    scales = [float(r["mean"]) for r in rows if r["metric"] == "std_scale"]
    assert scales and all(np.isfinite(scales)) and min(scales) > 0
    seen = {(r["test"], r["train_set"], r["test_set"], r["method"], r["seed"], r["metric"]) for r in rows}
    assert len(seen) == len(rows)
    for r in rows:
        if r["metric"] == "std_scale" and r["seed"] != "all":   # a figure of the validation images
            assert int(r["n"]) == cfg["run"]["calibration_images"] and r["std"] == "nan"
            continue
        assert int(r["n"]) == (SEEDS if r["seed"] == "all" else cfg["data"]["n_test"])
        assert np.isfinite(float(r["mean"]))
        # a correlation over the whole test set has no spread over its images
        whole_set = r["metric"] in CALIBRATION and r["metric"] not in COVERAGE and r["seed"] != "all"
        assert r["std"] == "nan" if whole_set else np.isfinite(float(r["std"]))
    assert {r["seed"] for r in rows if r["method"] == "CNF"} == {"0", "1", "all"}
    assert {r["seed"] for r in rows if r["method"] in ("GN", "CNF ens")} == {"-"}
    # CSD* in Test 2 uses the prior trained on the 40 dB set; CVAE/CNF their own 25 dB set
    t2 = {r["method"]: r["train_set"] for r in rows if r["test"] == "T2" and r["test_set"] == "2a_25dB"}
    assert {m: t for m, t in t2.items() if not m.endswith(" ens")} == {
        "GN": "none", "CVAE": "2a_25dB", "CNF": "2a_25dB", "CSD*": "2a_40dB", "CSD-guided": "2a_40dB"}
    assert t2["CNF ens"] == "2a_25dB" and t2["CSD* ens"] == "2a_40dB"
    t3 = {r["method"]: r["train_set"] for r in rows if r["test"] == "T3" and r["test_set"] == "2a_25dB"}
    assert t3["CVAE"] == t3["CNF"] == t3["CSD*"] == t3["CSD* ens"] == "4a_40dB"

    report = (out / "report.md").read_text()
    header = "| Method | MSE | PSNR | SSIM | RE | AE | DR | MSE vs GN [95% CI] | wins vs GN | rank | paper MSE vs GN |"
    assert report.count(header) == 6
    for method in methods:
        assert len(re.findall(rf"^\| {re.escape(method.name)}( \(\w+\))? \|", report, re.M)) >= 6
    assert report.count(f"resampling the {cfg['data']['n_test']} test images and the {SEEDS} seeds") == 6
    assert "## Efficiency" in report and "| CSD* | 2a_40dB | 1 |" in report and "| CSD* ens | 2a_40dB | 2 |" in report
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", report)
    assert len(figures) == 6 + 1   # one per table, and the calibration curves
    for rel in figures:
        assert (out / rel).stat().st_size > 5000
    assert "did not complete" not in report
    from dgm_eit.paper import PAPER_CITATION

    assert f"The study reproduced: {PAPER_CITATION}." in report


def test_report_states_the_gn_settings_each_test_set_chose_on_validation(smoke_run):
    from dgm_eit.data.storage import dataset_gn_settings

    out, _ = smoke_run
    report = (out / "report.md").read_text()
    exp = _experiment(out)
    for s in exp.settings:
        settings = dataset_gn_settings(exp.layout.data(s.data))
        assert settings["tuned"] and settings["tuned_on"].startswith("val[:")
        line = (f"GN: kotre (p = 0.5), lam = {settings['lam']:.3g}, {settings['max_iter']} iterations, "
                f"{settings['mesh_nodes']}-node mesh (h0 = 0.1); lam and iterations chosen on {settings['tuned_on']}")
        section = report.split(f"### {s.title}")[1].split("###")[0]
        assert line in section
    # the models that read GN images for new voltages make them with the data set's settings
    from dgm_eit.runs import load_run

    _, cfg, _ = load_run(exp.layout.run("cnf", DataSpec(2, 25.0), 1))
    chosen = dataset_gn_settings(exp.layout.data(DataSpec(2, 25.0)))
    assert (cfg["gn"]["lam"], cfg["gn"]["max_iter"], cfg["gn"]["lam_snr_ref_db"]) == \
        (chosen["lam"], chosen["max_iter"], 0.0)


def test_csv_numbers_are_the_metrics_of_the_written_reconstructions(smoke_run):
    out, _ = smoke_run
    rows = {(r["test"], r["test_set"], r["method"], r["seed"], r["metric"]): r for r in _csv_rows(out)}
    data = out / "data" / "2a_40dB.h5"
    arrays = read_split(data, "test", keys=("sigma", "gn"))
    gn = evaluate(arrays["gn"], arrays["sigma"])
    cnf = [evaluate_file(out / "recon" / f"cnf_2a_40dB_on_2a_40dB_seed{k}.h5", data, "test")[0] for k in range(SEEDS)]
    ensemble, _ = evaluate_file(out / "recon" / "cnf-ens_2a_40dB_on_2a_40dB.h5", data, "test")
    for metric in METRICS:
        assert float(rows[("T1", "2a_40dB", "GN", "-", metric)]["mean"]) == pytest.approx(gn[metric].mean)
        for k in range(SEEDS):
            assert float(rows[("T1", "2a_40dB", "CNF", str(k), metric)]["std"]) == pytest.approx(cnf[k][metric].std)
        means = [c[metric].mean for c in cnf]
        pooled = rows[("T1", "2a_40dB", "CNF", "all", metric)]
        assert float(pooled["mean"]) == pytest.approx(np.mean(means))
        assert float(pooled["std"]) == pytest.approx(np.std(means, ddof=1))
        assert float(rows[("T1", "2a_40dB", "CNF ens", "-", metric)]["mean"]) == pytest.approx(ensemble[metric].mean)
    with open(out / "metrics_per_sample.csv", newline="") as f:
        per_image = [r for r in csv.DictReader(f) if r["test"] == "T1" and r["test_set"] == "2a_40dB"
                     and r["method"] == "CNF"]
    assert len(per_image) == SEEDS * len(arrays["sigma"])
    assert np.mean([float(r["SSIM"]) for r in per_image if r["seed"] == "1"]) == pytest.approx(cnf[1]["SSIM"].mean)
    # Test 3's GN row is the same reconstruction as Test 1's
    assert rows[("T3", "2a_40dB", "GN", "-", "MSE")]["mean"] == rows[("T1", "2a_40dB", "GN", "-", "MSE")]["mean"]


def test_an_ensemble_pools_the_samples_of_its_seeds(smoke_run):
    out, _ = smoke_run
    run = load_config("smoke")["run"]
    members = [read_recon(out / "recon" / f"cnf_4a_40dB_on_4a_40dB_seed{k}.h5") for k in range(SEEDS)]
    recon, std = read_recon(out / "recon" / "cnf-ens_4a_40dB_on_4a_40dB.h5")
    np.testing.assert_allclose(recon, np.mean([m[0] for m in members], axis=0), rtol=1e-6, atol=1e-7)
    # the pooled std: within-seed spreads plus the spread of the seed means, over all K x n samples
    n = run["cnf_samples"]
    means = np.stack([m[0] for m in members]).astype(np.float64)
    within = sum((n - 1) * m[1].astype(np.float64) ** 2 for m in members)
    between = n * ((means - means.mean(axis=0)) ** 2).sum(axis=0)
    np.testing.assert_allclose(std, np.sqrt((within + between) / (SEEDS * n - 1)), rtol=1e-5, atol=1e-7)
    assert std.max() > 0
    attrs = recon_attrs(out / "recon" / "cnf-ens_4a_40dB_on_4a_40dB.h5")
    member_attrs = [recon_attrs(out / "recon" / f"cnf_4a_40dB_on_4a_40dB_seed{k}.h5") for k in range(SEEDS)]
    assert attrs["n_samples"] == SEEDS * n and attrs["nfe"] == sum(a["nfe"] for a in member_attrs)


def test_intervals_csv_and_the_verdicts_read_the_bootstrap(smoke_run):
    from dgm_eit.report import INTERVAL_COLUMNS

    out, _ = smoke_run
    with open(out / "intervals.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == INTERVAL_COLUMNS
        rows = list(reader)
    cfg = load_config("smoke")
    methods = select_methods(cfg["run"]["methods"], ensembles=True)
    assert len(rows) == 6 * len(methods)
    report = (out / "report.md").read_text()
    verdicts = report.split("## Does every generative model beat GN on MSE?")[1].split("## ")[0]
    words = {"better": "yes", "worse": "**no** (worse)", "tied": "**tied**"}
    for r in rows:
        low, change, high = float(r["ci_low"]), float(r["mse_vs_gn_percent"]), float(r["ci_high"])
        assert low <= change <= high
        assert int(r["resamples"]) == cfg["run"]["bootstrap_resamples"] and int(r["images"]) == cfg["data"]["n_test"]
        if r["method"] == "GN":
            assert (low, change, high) == (0.0, 0.0, 0.0) and r["verdict"] == "reference" and r["win_rate"] == ""
            continue
        assert int(r["seeds"]) == (1 if r["method"].endswith(" ens") else SEEDS)
        expected = "better" if high < 0 else "worse" if low > 0 else "tied"
        assert r["verdict"] == expected and 0.0 <= float(r["win_rate"]) <= 1.0
        assert f"{r['method']} {words[expected]} {change:+.0f}% [{low:+.0f}, {high:+.0f}]" in verdicts
    # ranks: 1 + the number of methods whose whole interval lies below
    t1 = [r for r in rows if r["test"] == "T1" and r["test_set"] == "2a_40dB"]
    for r in t1:
        below = sum(float(o["ci_high"]) < float(r["ci_low"]) for o in t1 if o is not r)
        assert int(r["rank"]) == 1 + below


def test_report_and_csv_measure_the_calibration_of_every_std_map(smoke_run):
    from dgm_eit.report import CALIBRATION_FIGURE

    out, _ = smoke_run
    cfg = load_config("smoke")
    methods = select_methods(cfg["run"]["methods"], ensembles=True)
    with_std = {m.name for m in methods if m.std_map}
    assert with_std == {"CNF", "CSD*", "CVAE ens", "CNF ens", "CSD* ens", "CSD-guided ens"}
    rows = _csv_rows(out)
    calibrated = {r["method"] for r in rows if r["metric"] in CALIBRATION}
    assert calibrated == with_std
    csv_rows = {(r["method"], r["seed"], r["metric"]): r for r in rows
                if (r["test"], r["test_set"]) == ("T1", "2a_40dB")}
    figures = {}
    for method, seed, metric in csv_rows:
        figures.setdefault((method, seed), set()).add(metric)
    scaled = {"CNF", "CSD*"}   # a seed's model that draws several samples; the ensembles pool them unscaled
    for (method, _), names in figures.items():
        assert names == set(METRICS) | (set(CALIBRATION) if method in with_std else set()) | (
            {*SCALED_COVERAGE, "std_scale"} if method in scaled else set())
    # the CSV's figures are those of the written reconstructions
    truth = read_split(out / "data" / "2a_40dB.h5", "test", keys=("sigma",))["sigma"]
    per_seed = [evaluate_calibration(*read_recon(out / "recon" / f"cnf_2a_40dB_on_2a_40dB_seed{k}.h5"), truth)
                for k in range(SEEDS)]
    for name in ("coverage90", "std_err_corr_pixels"):
        assert float(csv_rows[("CNF", "1", name)]["mean"]) == pytest.approx(per_seed[1][name].mean)
        assert float(csv_rows[("CNF", "all", name)]["mean"]) == pytest.approx(np.mean([c[name].mean for c in per_seed]))
    ensemble = evaluate_calibration(*read_recon(out / "recon" / "cnf-ens_2a_40dB_on_2a_40dB.h5"), truth)
    assert float(csv_rows[("CNF ens", "-", "coverage90")]["mean"]) == pytest.approx(ensemble["coverage90"].mean)

    report = (out / "report.md").read_text()
    section = report.split("## Uncertainty calibration")[1].split("\n## ")[0]
    assert "Gaussian" in section
    table = [line.split(" | ") for line in section.splitlines() if re.match(r"\| T\d ", line)]
    assert len(table) == 6 * len(with_std)
    for cells in table:
        assert cells[1].split(" (")[0] in with_std
        assert re.fullmatch(r"\d+\.\d% ± \d+\.\d", cells[2]) or cells[1].split(" (")[0].endswith(" ens")
        assert "confident" in cells[7] or cells[7].startswith("calibrated")
    t1 = {cells[1]: cells for cells in table if cells[0] == "| T1 2a_40dB"}
    coverage = float(csv_rows[("CNF", "all", "coverage90")]["mean"])
    assert t1["CNF"][2].startswith(f"{100 * coverage:.1f}% ± ")
    scaled_coverage = float(csv_rows[("CNF", "all", "coverage90_scaled")]["mean"])
    scale = float(csv_rows[("CNF", "all", "std_scale")]["mean"])
    assert re.fullmatch(rf"{100 * scaled_coverage:.1f}% ± \d+\.\d \(s = {scale:.2f} ± \d+\.\d\d\)", t1["CNF"][3])
    assert t1["CNF ens"][3] == "-"   # ensembles are not scaled
    samples = cfg["run"]["cnf_samples"]
    assert t1["CNF"][4] == f"{100 * calibrated_sampler_coverage(0.9, samples):.0f}% ({samples})"
    assert f"![Uncertainty calibration]({CALIBRATION_FIGURE.as_posix()})" in section
    assert (out / CALIBRATION_FIGURE).stat().st_size > 5000


def test_noise_levels_share_phantoms(smoke_run):
    out, _ = smoke_run
    hi = read_split(out / "data" / "4a_40dB.h5", "train", keys=("sigma", "v"))
    lo = read_split(out / "data" / "4a_25dB.h5", "train", keys=("sigma", "v"))
    np.testing.assert_array_equal(hi["sigma"], lo["sigma"])
    assert not np.allclose(hi["v"], lo["v"])


def test_rerun_reuses_stages_and_a_lost_stage_is_redone_identically(smoke_run, capsys):
    out, _ = smoke_run
    before = (out / "metrics.csv").read_text()
    lost = out / "recon" / "csd_4a_40dB_on_2a_25dB_seed1.h5"
    lost.unlink()
    capsys.readouterr()
    assert main(["run", "--out", str(out), *ARGS]) == 0
    log = capsys.readouterr().err
    ran = [line[8:] for line in log.splitlines() if line.startswith(("[run]", "[queue]"))]
    assert ran == ["reconstruct csd (4a_40dB) on 2a_25dB, seed 1"]
    assert "[reuse] train score on 4a_40dB, seed 1" in log and "[reuse] pool csd-ens (4a_40dB) on 2a_25dB" in log
    assert lost.exists()
    assert (out / "metrics.csv").read_text() == before


def test_each_model_chooses_its_settings_once_per_validation_set(smoke_run, capsys):
    """Test 3 tests the 4-anomaly models on 2-anomaly data at the noise levels of Test 1 and 2:
    their t0 and std scale come from the validation data Tests 1-2 already chose them on, so
    the tables share one choice file, and a damaged one is redone the same."""
    out, _ = smoke_run
    t1 = out / "recon" / "csd_4a_40dB_on_4a_40dB_seed0.h5"
    t3 = out / "recon" / "csd_4a_40dB_on_2a_40dB_seed0.h5"
    with h5py.File(t1) as a, h5py.File(t3) as b:
        assert (a.attrs["t0"], a.attrs["std_scale"]) == (b.attrs["t0"], b.attrs["std_scale"])
    exp = _experiment(out)
    tables = [(m, train, data, k) for m, train, data in exp.reconstructions() if exp.chooses(m) for k in range(SEEDS)]
    choices = {exp.layout.choice(m.key, train, exp.tuning_set(m, train, data), k) for m, train, data, k in tables}
    assert set((out / "choices").glob("*.json")) == choices and len(choices) < len(tables)
    stages = json.loads((out / "stages.json").read_text())
    assert stages["choose csd (4a_40dB) on 4a_40dB validation, seed 0"]["status"] == "done"
    assert not any("on 2a_40dB validation" in name and "4a_40dB)" in name for name in stages)
    choice = out / "choices" / "csd_4a_40dB_on_4a_40dB_seed0.json"
    chosen = choice.read_bytes()
    before = read_recon(t3)[0]
    choice.write_text('{"settings": {"t0"')
    t3.unlink()
    capsys.readouterr()
    assert main(["run", "--out", str(out), *ARGS]) == 0
    log = capsys.readouterr().err
    ran = [line[8:] for line in log.splitlines() if line.startswith(("[run]", "[queue]"))]
    assert ran == ["choose csd (4a_40dB) on 4a_40dB validation, seed 0", "reconstruct csd (4a_40dB) on 2a_40dB, seed 0"]
    assert f"[redo]  {choice}: it is not a readable choice file" in log
    assert choice.read_bytes() == chosen
    with h5py.File(t3) as f:
        assert f.attrs["t0"] == json.loads(chosen)["settings"]["t0"]
    np.testing.assert_array_equal(read_recon(t3)[0], before)


def test_a_different_config_is_refused_for_the_same_directory(smoke_run, capsys):
    out, _ = smoke_run
    assert main(["run", "--out", str(out), *ARGS, "--set", "data.n_train=40"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.n_train: 48 -> 40" in err[0]
    other_seed = ["--seed" if a == "--seed" else "1" if a == "0" else a for a in ARGS]
    assert main(["run", "--out", str(out), *other_seed]) == 2
    assert "made with --seed 0, not 1" in capsys.readouterr().err


def test_paper_reference_table_is_complete():
    assert set(PAPER_RESULTS) == {1, 2, 3, 4, 5, 6}
    for table, rows in PAPER_RESULTS.items():
        assert {"CVAE", "CNF", "CSD*"} <= set(rows)
        for values in rows.values():
            assert set(values) == set(METRICS)
    # the paper's text: CNF is 65.6% better than GN in Table 1 (0.0011 vs 0.0032)
    assert paper_mse_change(1, "CNF") == pytest.approx(-65.6, abs=0.1)
    assert paper_mse_change(5, "GN") is None


def test_unknown_test_or_method_is_refused(tmp_path):
    with pytest.raises(ValueError, match="run.tests"):
        Experiment(load_config("smoke", ["run.tests=[\"T9\"]"]), tmp_path)
    with pytest.raises(ValueError, match="run.methods"):
        Experiment(load_config("smoke", ["run.methods=[\"gn\", \"gan\"]"]), tmp_path)


def test_plan_trains_conditional_models_per_set_and_one_prior_per_anomaly_count(tmp_path):
    full = Experiment(load_config("smoke"), tmp_path)
    assert [d.label for d in full.datasets()] == ["2a_40dB", "2a_25dB", "4a_40dB", "4a_25dB"]
    runs = {(m, d.label) for m, d, k in full.training_runs()}
    assert runs == {(m, d) for m in ("cvae", "cnf") for d in ("2a_40dB", "2a_25dB", "4a_40dB", "4a_25dB")} | {
        ("score", "2a_40dB"), ("score", "4a_40dB")}
    assert {k for _, _, k in full.training_runs()} == {0}
    assert len(full.reconstructions()) == 4 * 6
    only_t1 = Experiment(load_config("smoke", ['run.tests=["T1"]', 'run.methods=["gn", "csd"]', "run.seeds=3"]),
                         tmp_path)
    assert [d.label for d in only_t1.datasets()] == ["2a_40dB", "4a_40dB"]
    # every seed of every model, seed 0 of all first
    assert [(m, d.label, k) for m, d, k in only_t1.training_runs()] == [
        ("score", s, k) for k in range(3) for s in ("2a_40dB", "4a_40dB")]
    assert [m.key for m in only_t1.methods] == ["gn", "csd", "csd-ens"]
    assert len(only_t1.reconstructions()) == 2 * 2


def test_every_training_run_gets_its_own_seed_by_a_stated_rule():
    import hashlib

    from dgm_eit.runtime import training_seed

    exp = Experiment(load_config("smoke", ["run.seeds=3"]), "/nonexistent", seed=5)
    seeds = [exp.training_seed(m, d, k) for m, d, k in exp.training_runs()]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**48 for s in seeds)
    digest = hashlib.sha256(b"5/cnf/2a_40dB/1").digest()[:6]
    assert training_seed(5, "cnf", "2a_40dB", 1) == int.from_bytes(digest, "big")
    assert exp.training_seed("cnf", DataSpec(2, 40.0), 1) == training_seed(5, "cnf", "2a_40dB", 1)
    assert training_seed(6, "cnf", "2a_40dB", 1) != training_seed(5, "cnf", "2a_40dB", 1)


def test_bad_seed_counts_are_refused_before_any_file(tmp_path):
    with pytest.raises(ValueError, match=r"run.seeds must be an integer >= 1"):
        Experiment(load_config("smoke", ["run.seeds=0"]), tmp_path / "x")
    for bad in ("1.5", "true"):
        with pytest.raises(ValueError, match="run.seeds"):
            load_config("smoke", [f"run.seeds={bad}"])
    assert not (tmp_path / "x").exists()


def test_csd_settings_are_chosen_on_the_validation_split_of_each_tables_training_data(smoke_run):
    from dgm_eit.experiments import config_for
    from dgm_eit.results import recon_attrs
    from dgm_eit.tuning import tune_on_validation

    out, _ = smoke_run
    cfg = load_config("smoke")
    run = cfg["run"]
    exp = _experiment(out)
    two_hi, two_lo, four_hi, four_lo = DataSpec(2, 40.0), DataSpec(2, 25.0), DataSpec(4, 40.0), DataSpec(4, 25.0)
    csd = get_method("csd")
    assert exp.tuning_set(csd, two_hi, two_hi) == two_hi     # T1
    assert exp.tuning_set(csd, two_hi, two_lo) == two_lo     # T2: the 25 dB set CVAE and CNF learn from
    # T3: the training anomaly count at the test noise level, never the 2-anomaly distribution
    assert exp.tuning_set(csd, four_hi, two_hi) == four_hi
    assert exp.tuning_set(csd, four_hi, two_lo) == four_lo
    best, rows = tune_on_validation(exp.layout.run("score", four_hi, 1), exp.layout.data(four_lo),
                                    config_for(cfg, two_lo), t0s=run["csd_tune_t0"],
                                    steps=run["csd_tune_steps"], n_images=run["csd_tune_images"],
                                    seed=exp.training_seed("score", four_hi, 1), sampler=run["csd_sampler"])
    assert len(rows) == len(run["csd_tune_t0"]) * len(run["csd_tune_steps"])
    assert best["t0"] == min(rows, key=lambda r: r["mse"])["t0"]
    attrs = recon_attrs(exp.layout.recon("csd", four_hi, two_lo, 1))
    assert (attrs["t0"], attrs["n_steps"]) == (best["t0"], best["n_steps"])
    section = (out / "report.md").read_text().split("### T3: trained on 4 anomalies, 40 dB, tested on 2 anomalies, "
                                                     "25 dB")[1].split("###")[0]
    assert re.search(rf"t0 = [\d./ ]*{best['t0']:g}[\d./ ]*, {best['n_steps']} reverse steps \(per seed\), chosen on "
                     r"the validation split of 4a_25dB", section)


def _printed_commands(block: str) -> dict[str, str]:
    """``{comment: command}`` of a block of ``# comment`` lines, each followed by its command."""
    lines = [line for line in block.strip().splitlines() if line.strip()]
    return {c[2:]: cmd for c, cmd in zip(lines, lines[1:]) if c.startswith("# ") and cmd.startswith("dgm-eit ")}


def _remake(out: Path, command: str, monkeypatch) -> Path:
    """Run a printed command where the report says to (the output directory); the file it wrote."""
    import shlex

    argv = shlex.split(command)
    assert argv[:2] == ["dgm-eit", "reconstruct"]
    monkeypatch.chdir(out)
    assert main(argv[1:]) == 0
    return out / argv[argv.index("--out") + 1]


def test_the_printed_command_remakes_a_row_bit_for_bit(smoke_run, monkeypatch):
    """Test 2's CSD* row (the prior trained at 40 dB; sampler dds, t0 and steps chosen on
    validation, samples drawn from the seed): seed 0's command under the table remakes the
    run's file and its numbers; remake.sh's command of CNF's seed 1 does the same."""
    from dgm_eit.results import recon_attrs

    out, _ = smoke_run
    title = "### T2: 2 anomalies, 25 dB"
    section = (out / "report.md").read_text().split(title)[1].split("\n### ")[0]
    block = section.split("<summary>Commands that remake this table's rows</summary>")[1].split("</details>")[0]
    commands = _printed_commands(block.split("```sh")[1].split("```")[0])
    assert list(commands) == ["CVAE", "CNF", "CSD* (2a_40dB)", "CSD-guided (2a_40dB)"]
    csd = commands["CSD* (2a_40dB)"]
    attrs = recon_attrs(out / "recon" / "csd_2a_40dB_on_2a_25dB_seed0.h5")
    for option in ("--sampler dds", f"--t0 {attrs['t0']!r}", f"--steps {attrs['n_steps']}", "--samples 2",
                   f"--seed {_experiment(out).training_seed('score', DataSpec(2, 40.0), 0)}"):
        assert f" {option} " in f"{csd} "
    assert "GN needs no command" in block
    assert "A seed ensemble pools its method's seed files" in block
    assert "CSD* ens (2a_40dB) `recon/csd_2a_40dB_on_2a_25dB_seed0.h5`, `recon/csd_2a_40dB_on_2a_25dB_seed1.h5`" in block
    rows = {(r["test"], r["test_set"], r["method"], r["seed"], r["metric"]): r for r in _csv_rows(out)}
    data = out / "data" / "2a_25dB.h5"
    script = _printed_commands((out / "remake.sh").read_text())
    assert len(script) == 6 * 4 * SEEDS
    for command, own, row in [
            (csd, "csd_2a_40dB_on_2a_25dB_seed0.h5", ("T2", "2a_25dB", "CSD*", "0", "MSE")),
            (script["T2: 2 anomalies, 25 dB: CNF, seed 1"], "cnf_2a_25dB_on_2a_25dB_seed1.h5",
             ("T2", "2a_25dB", "CNF", "1", "MSE"))]:
        remade = _remake(out, command, monkeypatch)
        assert remade == out / "remade" / own
        for mine, theirs in zip(read_recon(remade), read_recon(out / "recon" / own)):
            assert theirs is not None and np.array_equal(mine, theirs)
        assert evaluate_file(remade, data, "test")[0]["MSE"].mean == float(rows[row]["mean"])


def test_test3_alone_still_simulates_the_set_that_tunes_csd(tmp_path):
    cfg = load_config("smoke")
    cfg["run"]["tests"] = ["T3"]
    assert DataSpec(4, 25.0) in Experiment(cfg, tmp_path / "run").datasets()
    cfg["run"]["csd_tune_t0"] = []
    # the std maps' scale is chosen on the same validation set
    assert cfg["run"]["calibration_images"] > 0
    assert DataSpec(4, 25.0) in Experiment(cfg, tmp_path / "run2").datasets()
    cfg["run"]["calibration_images"] = 0
    assert DataSpec(4, 25.0) not in Experiment(cfg, tmp_path / "run3").datasets()


def test_bad_tuning_grid_is_refused(tmp_path):
    cfg = load_config("smoke")
    cfg["run"]["csd_tune_t0"] = [0.3, 1.5]
    with pytest.raises(ValueError, match="csd_tune_t0"):
        Experiment(cfg, tmp_path / "run")


def test_a_run_interrupted_in_its_second_seed_resumes_and_keeps_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["run", "--out", str(out), "--profile", "smoke", "--seed", "0", "--set", "train.progress=false",
            "--set", 'run.tests=["T1"]', "--set", 'run.methods=["gn", "cvae"]']
    assert main(base + ["--seeds", "1"]) == 0
    first = {p: p.read_bytes() for p in sorted(out.glob("runs/*/seed0/model.safetensors"))
             + sorted(out.glob("recon/*_seed0.h5"))}
    assert len(first) == 4
    capsys.readouterr()
    # the second seed's trainings stop after their first optimiser step, as a kill would stop them
    assert main(base + ["--seeds", "2", "--set", "run.train_max_minutes=1e-9"]) == 1
    log = capsys.readouterr().err
    assert "[reuse] train cvae on 2a_40dB, seed 0" in log and "[reuse] reconstruct cvae (2a_40dB) on 2a_40dB, seed 0" in log
    assert "training paused" in log
    paused = out / "runs" / "cvae_2a_40dB" / "seed1"
    assert (paused / "checkpoints" / "last.pt").is_file() and not (paused / "done").exists()
    assert main(base + ["--seeds", "2"]) == 0
    log = capsys.readouterr().err
    ran = {line[8:] for line in log.splitlines() if line.startswith(("[run]", "[queue]"))}
    assert ran == {"train cvae on 2a_40dB, seed 1", "train cvae on 4a_40dB, seed 1",
                   "reconstruct cvae (2a_40dB) on 2a_40dB, seed 1", "reconstruct cvae (4a_40dB) on 4a_40dB, seed 1",
                   "pool cvae-ens (2a_40dB) on 2a_40dB", "pool cvae-ens (4a_40dB) on 4a_40dB"}
    assert all(path.read_bytes() == data for path, data in first.items())
    with open(out / "metrics.csv", newline="") as f:
        assert {r["seed"] for r in csv.DictReader(f) if r["method"] == "CVAE"} == {"0", "1", "all"}


def test_an_ensemble_of_other_seeds_is_pooled_again(smoke_run):
    """Raising --seeds must not score the ensemble pooled from the earlier seeds."""
    out, code = smoke_run
    assert code == 0
    now, more = _experiment(out), Experiment(load_config("smoke", [f"run.seeds={SEEDS + 1}"]), out)
    ensembles = [r for r in now.reconstructions() if r[0].ensemble]
    assert ensembles
    for method, train, data in ensembles:
        job = now._ensemble_job(method, train, data)
        assert job.done() and not more._ensemble_job(method, train, data).done()
        assert not job.kwargs["out"].exists()   # the stale file is gone, so a crash cannot leave it scored
        job.fn(**job.kwargs)                    # what the run does next: pool this run's seeds
        assert job.done() and len(json.loads(recon_attrs(job.kwargs["out"])["members"])) == SEEDS


def test_bench_seeds_prints_each_seeds_change_against_gn_and_keeps_the_studys_report(smoke_run, capsys):
    out, code = smoke_run
    assert code == 0
    report = (out / "report.md").read_bytes()
    capsys.readouterr()
    assert main(["bench", "seeds", "--profile", "smoke", "--out", str(out), "--seeds", str(SEEDS), "--tests", "T1",
                 "--set", "train.progress=false", "--json"]) == 0
    printed = capsys.readouterr()
    assert (out / "report.md").read_bytes() == report     # the study's report covers T2 and T3 too
    assert "report.md left as it was" in printed.err
    rows = json.loads(printed.out.strip().splitlines()[-1])["rows"]
    # the same numbers as the study's metrics.csv: each seed's mean MSE against GN's
    mse = {(r["test_set"], r["method"], r["seed"]): float(r["mean"]) for r in _csv_rows(out)
           if r["test"] == "T1" and r["metric"] == "MSE"}
    trained = {(test_set, method) for test_set, method, seed in mse if seed == "0"}
    assert {(r["test_set"], r["method"]) for r in rows} == trained and len(trained) >= 6
    for r in rows:
        gn = mse[(r["test_set"], "GN", "-")]
        expected = [100 * (mse[(r["test_set"], r["method"], str(k))] / gn - 1) for k in range(SEEDS)]
        assert np.allclose(r["per_seed"], expected, rtol=1e-6)
        assert r["std"] == pytest.approx(np.std(expected, ddof=1))
        assert r["std_low"] < r["std"] < r["std_high"]
        assert r["verdict"] == ("met" if r["std_high"] <= 3 else "missed" if r["std_low"] > 3 else "undecided")
        assert r["ensemble"] is not None


def test_one_runner_skips_what_a_failed_stage_feeds_and_a_plan_may_stop_there(tmp_path, monkeypatch):
    """Both studies are plans of ``stages.StudyPlan``: every step's jobs through one runner, a job
    whose input did not complete skipped and named, the rest run; a plan may stop at the step."""
    from dgm_eit.errors import InputError
    from dgm_eit.stages import STEPS, StageJob, StudyPlan

    monkeypatch.delenv("DGM_EIT_DEBUG", raising=False)
    made = set()

    def job(name, needs=(), fails=False, here=False):
        def make():
            if fails:
                raise ValueError("broken")
            made.add(name)
        return StageJob(name, lambda: name in made, make, {}, needs=needs, here=here)

    class Plan(StudyPlan):
        def data_jobs(self):
            return [job("data a", here=True), job("data b", fails=True, here=True)]

        def training_jobs(self):
            return [job("train a", ("data a",)), job("train b", ("data b",))]

        def choice_jobs(self):
            return []

        def evaluation_jobs(self):
            return [job("test a", ("train a",)), job("test b", ("train a", "train b"), here=True)]

        def report(self, ok, seconds):
            return ok, seconds

    cfg = load_config("smoke", ["run.jobs=1"])
    ok, seconds = Plan(cfg, tmp_path / "study", seed=0, device="cpu", log=print).run()
    assert ok == {"data a": True, "data b": False, "train a": True, "train b": False, "test a": True, "test b": False}
    assert list(seconds) == list(STEPS) and made == {"data a", "train a", "test a"}
    records = json.loads((tmp_path / "study" / "stages.json").read_text())
    assert records["data b"]["status"] == "failed" and records["test a"]["status"] == "done"
    assert records["train b"] == {"status": "skipped", "message": "data b did not complete"}
    assert records["test b"] == {"status": "skipped", "message": "train b did not complete"}

    class Stopping(Plan):
        stops_at_failure = True

    with pytest.raises(InputError, match="stage 'data b' did not complete .failed: ValueError: broken."):
        Stopping(cfg, tmp_path / "study", seed=0, device="cpu", log=print).run()
