"""``dgm-eit run --profile smoke`` end to end, once per test session (about a minute or two)."""

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from dgm_eit.cli import main
from dgm_eit.config import load_config
from dgm_eit.data.storage import read_split
from dgm_eit.experiments import Experiment
from dgm_eit.methods import get_method, select_methods
from dgm_eit.metrics import METRICS, evaluate
from dgm_eit.paper import PAPER_RESULTS, paper_mse_change, settings_for
from dgm_eit.report import CSV_COLUMNS
from dgm_eit.results import DataSpec, evaluate_file

ARGS = ["--profile", "smoke", "--seed", "0", "--set", "train.progress=false"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke_run") / "run"
    code = main(["run", "--out", str(out), *ARGS])
    return out, code


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
    methods = select_methods(cfg["run"]["methods"])
    assert len(rows) == len(settings) * len(methods) * len(METRICS)
    seen = {(r["test"], r["train_set"], r["test_set"], r["method"], r["metric"]) for r in rows}
    assert len(seen) == len(rows)
    for r in rows:
        assert int(r["n"]) == cfg["data"]["n_test"]
        assert np.isfinite(float(r["mean"])) and np.isfinite(float(r["std"]))
    # CSD* in Test 2 uses the prior trained on the 40 dB set; CVAE/CNF their own 25 dB set
    t2 = {r["method"]: r["train_set"] for r in rows if r["test"] == "T2" and r["test_set"] == "2a_25dB"}
    assert t2 == {"GN": "none", "CVAE": "2a_25dB", "CNF": "2a_25dB", "CSD*": "2a_40dB", "CSD-guided": "2a_40dB"}
    t3 = {r["method"]: r["train_set"] for r in rows if r["test"] == "T3" and r["test_set"] == "2a_25dB"}
    assert t3["CVAE"] == t3["CNF"] == t3["CSD*"] == "4a_40dB"

    report = (out / "report.md").read_text()
    header = "| Method | MSE | PSNR | SSIM | RE | AE | DR | MSE vs GN | paper MSE vs GN |"
    assert report.count(header) == 6
    for method in methods:
        assert len(re.findall(rf"^\| {re.escape(method.name)}( \(\w+\))? \|", report, re.M)) >= 6
    assert "## Efficiency" in report and "| CSD* | 2a_40dB |" in report
    figures = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", report)
    assert len(figures) == 6
    for rel in figures:
        assert (out / rel).stat().st_size > 5000
    assert "did not complete" not in report
    from dgm_eit.paper import PAPER_CITATION

    assert f"The study reproduced: {PAPER_CITATION}." in report


def test_report_states_the_gn_settings_each_test_set_chose_on_validation(smoke_run):
    from dgm_eit.data.storage import dataset_gn_settings

    out, _ = smoke_run
    report = (out / "report.md").read_text()
    exp = Experiment(load_config("smoke"), out)
    for s in exp.settings:
        settings = dataset_gn_settings(exp.layout.data(s.data))
        assert settings["tuned"] and settings["tuned_on"].startswith("val[:")
        line = (f"GN: kotre (p = 0.5), lam = {settings['lam']:.3g}, {settings['max_iter']} iterations, "
                f"{settings['mesh_nodes']}-node mesh (h0 = 0.1); lam and iterations chosen on {settings['tuned_on']}")
        section = report.split(f"### {s.title}")[1].split("###")[0]
        assert line in section
    # the models that read GN images for new voltages make them with the data set's settings
    from dgm_eit.runs import load_run

    _, cfg, _ = load_run(exp.layout.run("cnf", DataSpec(2, 25.0)))
    chosen = dataset_gn_settings(exp.layout.data(DataSpec(2, 25.0)))
    assert (cfg["gn"]["lam"], cfg["gn"]["max_iter"], cfg["gn"]["lam_snr_ref_db"]) == \
        (chosen["lam"], chosen["max_iter"], 0.0)


def test_csv_numbers_are_the_metrics_of_the_written_reconstructions(smoke_run):
    out, _ = smoke_run
    rows = {(r["test"], r["test_set"], r["method"], r["metric"]): r for r in _csv_rows(out)}
    data = out / "data" / "2a_40dB.h5"
    arrays = read_split(data, "test", keys=("sigma", "gn"))
    gn = evaluate(arrays["gn"], arrays["sigma"])
    cnf, _ = evaluate_file(out / "recon" / "cnf_2a_40dB_on_2a_40dB.h5", data, "test")
    for metric in METRICS:
        assert float(rows[("T1", "2a_40dB", "GN", metric)]["mean"]) == pytest.approx(gn[metric].mean)
        assert float(rows[("T1", "2a_40dB", "CNF", metric)]["std"]) == pytest.approx(cnf[metric].std)
    with open(out / "metrics_per_sample.csv", newline="") as f:
        per_image = [r for r in csv.DictReader(f) if r["test"] == "T1" and r["test_set"] == "2a_40dB"
                     and r["method"] == "CNF"]
    assert len(per_image) == len(arrays["sigma"])
    assert np.mean([float(r["SSIM"]) for r in per_image]) == pytest.approx(cnf["SSIM"].mean)
    # Test 3's GN row is the same reconstruction as Test 1's
    assert rows[("T3", "2a_40dB", "GN", "MSE")]["mean"] == rows[("T1", "2a_40dB", "GN", "MSE")]["mean"]


def test_noise_levels_share_phantoms(smoke_run):
    out, _ = smoke_run
    hi = read_split(out / "data" / "4a_40dB.h5", "train", keys=("sigma", "v"))
    lo = read_split(out / "data" / "4a_25dB.h5", "train", keys=("sigma", "v"))
    np.testing.assert_array_equal(hi["sigma"], lo["sigma"])
    assert not np.allclose(hi["v"], lo["v"])


def test_rerun_reuses_stages_and_a_lost_stage_is_redone_identically(smoke_run, capsys):
    out, _ = smoke_run
    before = (out / "metrics.csv").read_text()
    lost = out / "recon" / "csd_4a_40dB_on_2a_25dB.h5"
    lost.unlink()
    capsys.readouterr()
    assert main(["run", "--out", str(out), *ARGS]) == 0
    log = capsys.readouterr().err
    ran = [line[8:] for line in log.splitlines() if line.startswith(("[run]", "[queue]"))]
    assert ran == ["reconstruct csd (4a_40dB) on 2a_25dB"]
    assert "[reuse] train score on 4a_40dB" in log
    assert lost.exists()
    assert (out / "metrics.csv").read_text() == before


def test_a_different_config_is_refused_for_the_same_directory(smoke_run, capsys):
    out, _ = smoke_run
    assert main(["run", "--out", str(out), *ARGS, "--set", "data.n_train=40"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.n_train: 48 -> 40" in err[0]
    other_seed = [a if a != "0" else "1" for a in ARGS]
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
    runs = {(m, d.label) for m, d in full.training_runs()}
    assert runs == {(m, d) for m in ("cvae", "cnf") for d in ("2a_40dB", "2a_25dB", "4a_40dB", "4a_25dB")} | {
        ("score", "2a_40dB"), ("score", "4a_40dB")}
    assert len(full.reconstructions()) == 4 * 6
    only_t1 = Experiment(load_config("smoke", ['run.tests=["T1"]', 'run.methods=["gn", "csd"]']), tmp_path)
    assert [d.label for d in only_t1.datasets()] == ["2a_40dB", "4a_40dB"]
    assert {(m, d.label) for m, d in only_t1.training_runs()} == {("score", "2a_40dB"), ("score", "4a_40dB")}


def test_csd_settings_are_chosen_on_the_validation_split_of_each_tables_training_data(smoke_run):
    from dgm_eit.experiments import config_for
    from dgm_eit.results import recon_attrs
    from dgm_eit.tuning import tune_on_validation

    out, _ = smoke_run
    cfg = load_config("smoke")
    run = cfg["run"]
    exp = Experiment(cfg, out)
    two_hi, two_lo, four_hi, four_lo = DataSpec(2, 40.0), DataSpec(2, 25.0), DataSpec(4, 40.0), DataSpec(4, 25.0)
    csd = get_method("csd")
    assert exp.tuning_set(csd, two_hi, two_hi) == two_hi     # T1
    assert exp.tuning_set(csd, two_hi, two_lo) == two_lo     # T2: the 25 dB set CVAE and CNF learn from
    # T3: the training anomaly count at the test noise level, never the 2-anomaly distribution
    assert exp.tuning_set(csd, four_hi, two_hi) == four_hi
    assert exp.tuning_set(csd, four_hi, two_lo) == four_lo
    best, rows = tune_on_validation(exp.layout.run("score", four_hi), exp.layout.data(four_lo),
                                    config_for(cfg, two_lo), t0s=run["csd_tune_t0"],
                                    steps=run["csd_tune_steps"], n_images=run["csd_tune_images"], seed=0,
                                    sampler=run["csd_sampler"])
    assert len(rows) == len(run["csd_tune_t0"]) * len(run["csd_tune_steps"])
    assert best["t0"] == min(rows, key=lambda r: r["mse"])["t0"]
    attrs = recon_attrs(exp.layout.recon("csd", four_hi, two_lo))
    assert (attrs["t0"], attrs["n_steps"]) == (best["t0"], best["n_steps"])
    assert f"t0 = {best['t0']:g}, {best['n_steps']} reverse steps, chosen on the validation split of 4a_25dB" \
        in (out / "report.md").read_text()


def test_test3_alone_still_simulates_the_set_that_tunes_csd(tmp_path):
    cfg = load_config("smoke")
    cfg["run"]["tests"] = ["T3"]
    assert DataSpec(4, 25.0) in Experiment(cfg, tmp_path / "run").datasets()
    cfg["run"]["csd_tune_t0"] = []
    assert DataSpec(4, 25.0) not in Experiment(cfg, tmp_path / "run2").datasets()


def test_bad_tuning_grid_is_refused(tmp_path):
    cfg = load_config("smoke")
    cfg["run"]["csd_tune_t0"] = [0.3, 1.5]
    with pytest.raises(ValueError, match="csd_tune_t0"):
        Experiment(cfg, tmp_path / "run")
