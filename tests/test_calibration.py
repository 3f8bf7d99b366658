"""Calibration of std maps (issue 24): coverage of the Gaussian central intervals, the std-error
correlations, their rows in metrics.csv and the report's section, on constructed posteriors
whose calibration is known."""

from __future__ import annotations

import csv
import math
import warnings

import numpy as np
import pytest

from dgm_eit.data.phantoms import disk_mask
from dgm_eit.errors import InputError
from dgm_eit.metrics import (CALIBRATION, COVERAGE, COVERAGE_LEVELS, METRICS, calibrated_sampler_coverage,
                             coverage_name, evaluate_calibration, pearson, per_sample)
from dgm_eit.results import DataSpec, MethodResult, RunResult, Setting, SettingResult

SIZE = 32
IMAGES = 200   # ~160,000 disk pixels: a binomial share of 90% is known to ±0.1 points


def _truth(n: int = IMAGES, seed: int = 0) -> np.ndarray:
    from conftest import _circle_images

    return _circle_images(np.random.default_rng(seed), n, SIZE).astype(np.float64)


def _posterior(truth: np.ndarray, *, width: float = 1.0, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, reported std)`` of a Gaussian posterior the truth is a draw of, with the std it
    reports ``width`` times its true one (1: calibrated; 0.5: too narrow)."""
    rng = np.random.default_rng(seed)
    std = rng.uniform(0.05, 0.3, size=truth.shape)
    mean = truth - std * rng.standard_normal(truth.shape)
    return mean, width * std


def _coverage_curve(figures) -> np.ndarray:
    return np.array([figures[name].mean for name in COVERAGE])


def test_names_and_levels():
    assert COVERAGE_LEVELS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    assert COVERAGE == ("coverage10", "coverage20", "coverage30", "coverage40", "coverage50", "coverage60",
                        "coverage70", "coverage80", "coverage90", "coverage95")
    assert coverage_name(0.9) == "coverage90"
    assert CALIBRATION == (*COVERAGE, "std_err_corr_pixels", "std_err_corr_images")


def test_a_calibrated_posterior_covers_its_nominal_levels():
    truth = _truth()
    mean, std = _posterior(truth)
    figures = evaluate_calibration(mean, std, truth)
    assert set(figures) == set(CALIBRATION)
    assert figures["coverage90"].mean == pytest.approx(0.90, abs=0.015)
    # the calibration curve lies on the diagonal
    np.testing.assert_allclose(_coverage_curve(figures), COVERAGE_LEVELS, atol=0.015)
    assert figures["coverage90"].n == IMAGES and figures["coverage90"].std > 0


def test_too_narrow_and_too_wide_std_maps_cover_less_and_more():
    truth = _truth()
    narrow = evaluate_calibration(*_posterior(truth, width=0.5), truth)
    # P(|Z| <= 1.645 / 2) = 58.9%
    assert narrow["coverage90"].mean == pytest.approx(0.589, abs=0.015)
    assert np.all(_coverage_curve(narrow) < np.array(COVERAGE_LEVELS) - 0.03)
    wide = evaluate_calibration(*_posterior(truth, width=2.0), truth)
    assert wide["coverage90"].mean == pytest.approx(0.999, abs=0.005)
    assert np.all(_coverage_curve(wide) > np.array(COVERAGE_LEVELS))


def test_only_disk_pixels_count_and_a_zero_std_covers_only_an_exact_pixel():
    truth = _truth(4)
    inside = disk_mask(SIZE)
    mean = truth.copy()
    mean[:, ~inside] += 100.0          # outside the disk: ignored, however wrong
    std = np.zeros_like(truth)
    assert evaluate_calibration(mean, std, truth)["coverage90"].mean == 1.0
    # std 0 and an error: never covered, at every level
    rows, cols = np.nonzero(inside)
    half = len(rows) // 2
    mean[:, rows[:half], cols[:half]] += 0.01
    figures = evaluate_calibration(mean, std, truth)
    np.testing.assert_allclose(_coverage_curve(figures), (len(rows) - half) / len(rows))


def test_correlations_follow_where_the_errors_are():
    truth = _truth()
    rng = np.random.default_rng(2)
    std = rng.uniform(0.05, 0.3, size=truth.shape) * rng.uniform(0.5, 2.0, size=(IMAGES, 1, 1))
    noise = rng.standard_normal(truth.shape)
    tracking = evaluate_calibration(truth - std * noise, std, truth)
    assert tracking["std_err_corr_pixels"].mean > 0.3 and tracking["std_err_corr_images"].mean > 0.8
    # the errors where the std is small: both correlations turn negative
    backwards = evaluate_calibration(truth - (0.7 - std) * noise, std, truth)
    assert backwards["std_err_corr_pixels"].mean < -0.2 and backwards["std_err_corr_images"].mean < -0.5
    assert math.isnan(tracking["std_err_corr_pixels"].std) and tracking["std_err_corr_pixels"].n == IMAGES


def test_a_constant_std_has_no_correlation_and_no_warnings():
    truth = _truth(8)
    mean, _ = _posterior(truth)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures = evaluate_calibration(mean, np.full_like(truth, 0.1), truth)
        assert math.isnan(figures["std_err_corr_pixels"].mean) and math.isnan(figures["std_err_corr_images"].mean)
        assert math.isnan(pearson([1.0, 2.0], [0.1, 0.1])) and math.isnan(pearson([3.0], [1.0]))
        # 0.1 is not a binary fraction: centring it could leave rounding noise, which is not spread
        assert math.isnan(pearson(np.full(1001, 0.1), np.arange(1001.0)))
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.5]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1])


def test_bad_std_maps_are_refused():
    truth = _truth(2)
    with pytest.raises(InputError, match="negative"):
        evaluate_calibration(truth, -np.ones_like(truth), truth)
    with pytest.raises(InputError, match="same shape"):
        evaluate_calibration(truth, np.ones_like(truth[:1]), truth)
    with pytest.raises(InputError, match="NaN"):
        evaluate_calibration(truth, np.full_like(truth, np.nan), truth)


def test_the_calibrated_sampler_reference_is_what_few_samples_cover():
    assert calibrated_sampler_coverage(0.9, 4) == pytest.approx(0.7624, abs=1e-4)
    assert calibrated_sampler_coverage(0.9, 64) == pytest.approx(0.8924, abs=1e-4)
    assert calibrated_sampler_coverage(0.9, 10**6) == pytest.approx(0.9, abs=1e-4)
    assert math.isnan(calibrated_sampler_coverage(0.9, 1))
    # a sampler of the true posterior: 4 draws give the mean and std (ddof 1), the truth is a fifth
    rng = np.random.default_rng(3)
    draws = rng.standard_normal((5, 40, SIZE, SIZE))
    truth = draws[0] + 2.0
    samples = draws[1:] + 2.0
    figures = evaluate_calibration(samples.mean(axis=0), samples.std(axis=0, ddof=1), truth)
    assert figures["coverage90"].mean == pytest.approx(calibrated_sampler_coverage(0.9, 4), abs=0.015)


# ---------------------------------------------------------------------------------------
# metrics.csv rows and the report's section, from records (no study run)


def _run_result(tmp_path) -> RunResult:
    truth = _truth(12)
    setting = Setting("T1", DataSpec(2, 40.0), DataSpec(2, 40.0), 1)
    calibrated, narrow, wide = (_posterior(truth, width=w, seed=s) for w, s in ((1.0, 4), (0.5, 5), (2.0, 6)))
    seeds = [_posterior(truth, width=0.5, seed=7), narrow]
    sr = SettingResult(setting, methods=[
        MethodResult("gn", "GN", None, [per_sample(0.9 * truth, truth)]),
        MethodResult("cnf", "CNF", setting.train, [per_sample(m, truth) for m, _ in seeds], seeded=True,
                     calibration=[evaluate_calibration(m, s, truth) for m, s in seeds], posterior_samples=4),
        MethodResult("cnf-ens", "CNF ens", setting.train, [per_sample(wide[0], truth)],
                     calibration=[evaluate_calibration(*wide, truth)], posterior_samples=8),
        MethodResult("csd-ens", "CSD* ens", setting.train, [per_sample(calibrated[0], truth)],
                     calibration=[evaluate_calibration(*calibrated, truth)], posterior_samples=None),
    ])
    return RunResult({}, 0, tmp_path, [sr], [], {}, 0.0)


def test_metrics_csv_rows_hold_the_calibration_of_std_map_methods_only(tmp_path):
    result = _run_result(tmp_path)
    rows = result.records()
    by_method = {}
    for r in rows:
        by_method.setdefault((r["method"], r["seed"]), []).append(r["metric"])
    assert by_method[("GN", "-")] == list(METRICS)
    for key in (("CNF", 0), ("CNF", 1), ("CNF", "all"), ("CNF ens", "-"), ("CSD* ens", "-")):
        assert by_method[key] == [*METRICS, *CALIBRATION]
    cnf = result.settings[0].get("cnf")
    row = {(r["seed"], r["metric"]): r for r in rows if r["method"] == "CNF"}
    per_seed = [c["coverage90"].mean for c in cnf.calibration]
    assert float(row[(1, "coverage90")]["mean"]) == per_seed[1] and row[(1, "coverage90")]["n"] == 12
    assert float(row[("all", "coverage90")]["mean"]) == pytest.approx(np.mean(per_seed))
    assert float(row[("all", "coverage90")]["std"]) == pytest.approx(np.std(per_seed, ddof=1))
    assert row[("all", "coverage90")]["n"] == 2
    assert row[(0, "std_err_corr_pixels")]["std"] == "nan"


def test_report_section_and_figure(tmp_path):
    from PIL import Image

    from dgm_eit.config import load_config
    from dgm_eit.figures import DPI
    from dgm_eit.report import CALIBRATION_FIGURE, calibration_section, confidence, write_outputs

    assert confidence(0.59) == "over-confident (intervals too narrow)"
    assert confidence(0.87) == "slightly over-confident (intervals too narrow)"
    assert confidence(0.999) == "under-confident (intervals too wide)"
    assert confidence(math.nan) == "-"
    result = _run_result(tmp_path)
    text = calibration_section(result)
    lines = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| T1 2a_40dB |")}
    assert set(lines) == {"CNF", "CNF ens", "CSD* ens"}
    assert "± " in lines["CNF"].split(" | ")[2] and "76% (4)" in lines["CNF"]
    assert lines["CNF"].endswith("| over-confident (intervals too narrow) |")
    assert lines["CNF ens"].endswith("| under-confident (intervals too wide) |") and "84% (8)" in lines["CNF ens"]
    assert "slightly" in lines["CSD* ens"] and "| - |" in lines["CSD* ens"]
    assert f"![Uncertainty calibration]({CALIBRATION_FIGURE.as_posix()})" in text

    result.cfg = load_config("smoke")
    paths = write_outputs(result)
    report = paths["report"].read_text()
    assert "## Uncertainty calibration" in report and text in report
    assert Image.open(tmp_path / CALIBRATION_FIGURE).info["dpi"][0] == pytest.approx(DPI, abs=0.1)
    with open(paths["metrics"], newline="") as f:
        metrics = {(r["method"], r["metric"]) for r in csv.DictReader(f)}
    assert ("CNF ens", "coverage90") in metrics and ("GN", "coverage90") not in metrics

    # without std maps: the section says so, and there is no figure
    for sr in result.settings:
        sr.methods = sr.methods[:1]
    (tmp_path / CALIBRATION_FIGURE).unlink()
    assert "No method of this run wrote std maps" in calibration_section(result)
    assert "calibration" not in write_outputs(result) and not (tmp_path / CALIBRATION_FIGURE).exists()


# ---------------------------------------------------------------------------------------
# the std scale chosen on validation data (run.calibration_images)

@pytest.mark.parametrize("width", [0.5, 1.0, 2.0])
def test_the_validation_scale_undoes_a_wrong_width(width):
    from dgm_eit.metrics import std_scale_for_coverage

    truth = _truth()
    mean, std = _posterior(truth, width=width)
    scale = std_scale_for_coverage(mean, std, truth, 0.9)
    # reported width x scale = the true std: the scale is the inverse of the error in width
    assert scale * width == pytest.approx(1.0, rel=0.03)
    assert evaluate_calibration(mean, scale * std, truth)["coverage90"].mean == pytest.approx(0.9, abs=0.002)


def test_a_scale_chosen_on_validation_calibrates_other_images():
    from dgm_eit.metrics import SCALED_COVERAGE, scaled_coverage, std_scale_for_coverage

    val, test = _truth(seed=0), _truth(seed=5)
    scale = std_scale_for_coverage(*_posterior(val, width=0.4, seed=2), val, 0.9)
    mean, std = _posterior(test, width=0.4, seed=3)
    assert evaluate_calibration(mean, std, test)["coverage90"].mean < 0.5   # over-confident as it comes
    figures = scaled_coverage(mean, std, test, scale, IMAGES)
    assert set(figures) == {*SCALED_COVERAGE, "std_scale"}
    assert figures["coverage90_scaled"].mean == pytest.approx(0.9, abs=0.01)
    assert figures["std_scale"].mean == scale and figures["std_scale"].n == IMAGES


def test_the_scale_is_the_smallest_that_covers_the_level():
    from dgm_eit.metrics import std_scale_for_coverage

    truth = np.zeros((1, SIZE, SIZE))
    n = int(disk_mask(SIZE).sum())
    errors = np.zeros((1, SIZE, SIZE))
    errors[0][disk_mask(SIZE)] = np.arange(1, n + 1) / n   # distinct errors 1/n ... 1
    std = np.ones_like(errors) / 1.6448536269514722      # z std = 1
    scale = std_scale_for_coverage(errors, std, truth, 0.9)
    assert scale == pytest.approx(math.ceil(0.9 * n) / n)
    assert evaluate_calibration(errors, scale * std, truth)["coverage90"].mean >= 0.9
    assert evaluate_calibration(errors, 0.999 * scale * std, truth)["coverage90"].mean < 0.9


def test_no_scale_covers_pixels_of_std_zero_with_an_error():
    from dgm_eit.metrics import std_scale_for_coverage

    truth = _truth(20)
    mean, std = _posterior(truth)
    std[:, :, : SIZE // 2] = 0.0    # half the disk claims certainty and is wrong
    with pytest.raises(InputError, match="no std scale covers 90%"):
        std_scale_for_coverage(mean, std, truth, 0.9)
