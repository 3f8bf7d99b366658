import numpy as np
import pytest
from scipy.ndimage import uniform_filter

from dgm_eit.errors import InputError
from dgm_eit.metrics import METRICS, SSIM_SETTINGS, evaluate, per_sample, summarize


def _truth() -> np.ndarray:
    truth = np.zeros((16, 16))
    truth[4:12, 4:12] = 1.0
    truth[6:9, 6:9] = 2.0
    return truth


def _ssim_by_hand(pred: np.ndarray, truth: np.ndarray, data_range: float) -> float:
    """Wang et al. 2004 with a 7x7 uniform window and sample covariance, written out."""
    win = 7
    n = win * win
    mean = lambda a: uniform_filter(a, size=win)  # noqa: E731
    ux, uy = mean(truth), mean(pred)
    cov = n / (n - 1)
    vx = cov * (mean(truth * truth) - ux * ux)
    vy = cov * (mean(pred * pred) - uy * uy)
    vxy = cov * (mean(truth * pred) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean())


def test_ssim_settings_are_pinned():
    assert SSIM_SETTINGS == {"win_size": 7, "gaussian_weights": False, "use_sample_covariance": True,
                             "K1": 0.01, "K2": 0.03}


def test_known_values_of_a_smooth_perturbation():
    truth = _truth()
    pred = truth + 0.1 * np.sin(np.arange(16))[None, :]
    values = per_sample(pred, truth)
    err = 0.1 * np.sin(np.arange(16))
    assert values["MSE"][0] == pytest.approx(np.mean(err**2))
    assert values["MSE"][0] == pytest.approx(0.00491877443, rel=1e-8)
    assert values["PSNR"][0] == pytest.approx(10 * np.log10(4.0 / np.mean(err**2)))
    assert values["PSNR"][0] == pytest.approx(29.1020309, rel=1e-6)
    assert values["SSIM"][0] == pytest.approx(_ssim_by_hand(pred, truth, 2.0), rel=1e-9)
    assert values["SSIM"][0] == pytest.approx(0.9919406, rel=1e-6)
    assert values["RE"][0] == pytest.approx(16 * np.abs(err).sum() / truth.sum())
    assert values["AE"][0] == pytest.approx(np.abs(err).mean())
    assert values["DR"][0] == pytest.approx((pred.max() - pred.min()) / 2.0)


def test_ssim_uses_the_ground_truth_range_not_the_prediction_range():
    truth = _truth()
    rng = np.random.default_rng(0)
    pred = 3.0 * truth + 0.05 * rng.normal(size=truth.shape)
    got = per_sample(pred, truth)["SSIM"][0]
    assert got == pytest.approx(_ssim_by_hand(pred, truth, 2.0), rel=1e-9)
    assert got != pytest.approx(_ssim_by_hand(pred, truth, float(pred.max() - pred.min())), rel=1e-3)


def test_perfect_and_offset_reconstructions():
    truth = np.stack([_truth(), 0.5 * _truth() + 1.0])
    perfect = per_sample(truth, truth)
    np.testing.assert_allclose(perfect["MSE"], 0.0)
    assert np.all(np.isinf(perfect["PSNR"]))
    np.testing.assert_allclose(perfect["SSIM"], 1.0)
    np.testing.assert_allclose(perfect["RE"], 0.0)
    np.testing.assert_allclose(perfect["DR"], 1.0)

    shifted = per_sample(truth + 0.1, truth)
    np.testing.assert_allclose(shifted["MSE"], 0.01)
    np.testing.assert_allclose(shifted["AE"], 0.1)
    np.testing.assert_allclose(shifted["DR"], 1.0)
    np.testing.assert_allclose(shifted["RE"], 0.1 * 256 / truth.sum(axis=(1, 2)))
    np.testing.assert_allclose(shifted["PSNR"], 10 * np.log10(np.array([4.0, 1.0]) / 0.01))


def test_summary_is_mean_and_population_std():
    truth = np.stack([_truth()] * 3)
    pred = truth + np.array([0.0, 0.1, 0.2])[:, None, None]
    summary = evaluate(pred, truth)
    assert set(summary) == set(METRICS)
    assert summary["AE"].mean == pytest.approx(0.1)
    assert summary["AE"].std == pytest.approx(np.std([0.0, 0.1, 0.2]))
    assert summary["AE"].n == 3
    assert summarize({"X": np.array([1.0, 3.0])})["X"].format(2) == "2.00 ± 1.00"


def test_channel_axis_and_single_image_are_accepted():
    truth = _truth()
    assert per_sample(truth[None, None], truth)["MSE"].shape == (1,)


@pytest.mark.parametrize("pred, match", [
    (np.full((16, 16), np.nan), "NaN"),
    (np.zeros((15, 16)), "shape"),
    (np.zeros((2, 16, 16)), "shape"),
    (np.zeros(16), r"\(N,H,W\)"),
])
def test_bad_input_is_refused(pred, match):
    with pytest.raises(InputError, match=match):
        per_sample(pred, _truth())


def test_constant_ground_truth_is_refused():
    with pytest.raises(InputError, match="constant"):
        per_sample(np.ones((16, 16)), np.ones((16, 16)))
