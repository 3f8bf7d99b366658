"""The tank's nuisances (dgm_eit.ktc.nuisance): electrode places, contact impedances and the
water's drift drawn per simulated sample, on a coarse tank mesh."""

from __future__ import annotations

import numpy as np
import pytest

from dgm_eit.config import load_config
from dgm_eit.datasets import ktc2023 as ktc
from dgm_eit.errors import InputError
from dgm_eit.ktc import nuisance
from dgm_eit.ktc.simulate import KTCSimulator

SMALL = ["tank.sim_h0=0.006", "tank.h0=0.008", "data.image_size=16", "linear.tune_prior_std=[]",
         "linear.tune_corr_length=[]"]
ALL = ["tank.electrode_shift=0.004", "tank.contact_max=0.001", "tank.drift_std=0.01"]


def simulator(*extra) -> KTCSimulator:
    return KTCSimulator(load_config("ktc", SMALL + list(extra)))


@pytest.fixture(scope="module")
def plain():
    return simulator()


@pytest.fixture(scope="module")
def with_all():
    return simulator(*ALL)


def test_off_by_default_and_for_a_study_made_before_the_keys(plain):
    assert not plain.nuisances.active
    cfg = load_config("ktc", SMALL)
    for key in nuisance.KEYS:
        del cfg["tank"][key]
    older = KTCSimulator(cfg)
    assert not older.nuisances.active
    a, b = plain.measure(0, "train", 2), older.measure(0, "train", 2)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # and the clean data are the fine model's difference of the phantom, as before the keys
    _, phantom = plain.phantom(0, "train", 2)
    expected = plain.tank.fine.forward(plain.tank.sigma_bg * phantom.on_elements(plain.quad_points)) - plain.tank.u_water
    np.testing.assert_array_equal(a["v_clean"], expected)


def test_a_sample_with_nuisances_is_paired_with_the_plain_one_and_reproducible(plain, with_all):
    a, b = plain.measure(0, "val", 5), with_all.measure(0, "val", 5)
    np.testing.assert_array_equal(a["sigma"], b["sigma"])       # the same phantom ...
    np.testing.assert_array_equal(a["mask"], b["mask"])         # ... level ...
    np.testing.assert_allclose((a["v"] - a["v_clean"])[a["mask"]], (b["v"] - b["v_clean"])[b["mask"]], atol=1e-12)
    change = np.linalg.norm(b["v_clean"] - a["v_clean"]) / np.linalg.norm(a["v_clean"])
    assert 1e-3 < change < 0.5                                   # ... and only the model's errors differ
    again = simulator(*ALL).measure(0, "val", 5)
    for key in b:
        np.testing.assert_array_equal(b[key], again[key])
    assert not np.array_equal(b["v_clean"], with_all.measure(0, "val", 6)["v_clean"])


def test_the_drift_scales_the_target_frame_water(plain):
    sim = simulator("tank.drift_std=0.01")
    from dgm_eit.data.storage import sample_rng

    drift = sim.nuisances.draw(sample_rng(0, "train", 1, nuisance.STREAM))["drift"]
    assert drift != 0
    _, phantom = plain.phantom(0, "train", 1)
    tank = plain.tank
    sigma = tank.sigma_bg * phantom.on_elements(plain.quad_points)
    expected = tank.fine.forward(sigma * (1 + drift)) - tank.u_water
    np.testing.assert_allclose(sim.measure(0, "train", 1)["v_clean"], expected, rtol=1e-9, atol=1e-12)


def test_the_draws_have_the_configured_spread(with_all):
    from dgm_eit.data.storage import sample_rng

    draws = [with_all.nuisances.draw(sample_rng(3, "train", i, nuisance.STREAM)) for i in range(400)]
    shifts = np.stack([d["shifts"] for d in draws]) * ktc.TANK_RADIUS
    assert np.sqrt(np.mean(shifts**2)) == pytest.approx(0.004, rel=0.1)
    # a smooth pattern: neighbours move nearly together
    assert np.corrcoef(shifts[:, 0], shifts[:, 1])[0, 1] > 0.9
    z = np.stack([d["contact_impedance"] for d in draws])
    z0 = with_all.tank.contact_impedance
    assert z.min() >= z0 and z.max() <= 0.001
    # log-uniform: the median of log z halfway between its ends
    assert np.median(np.log(z)) == pytest.approx((np.log(z0) + np.log(0.001)) / 2, abs=0.5)
    drift = np.array([d["drift"] for d in draws])
    assert np.std(drift) == pytest.approx(0.01, rel=0.15) and abs(np.mean(drift)) < 0.002


def test_moved_electrodes_turn_each_electrode_by_its_shift(plain):
    mesh = plain.tank.fine.mesh
    same = nuisance.moved_electrodes(mesh, np.zeros(mesh.n_electrodes))
    np.testing.assert_allclose(same.nodes, mesh.nodes, atol=1e-15)
    shifts = np.linspace(-0.03, 0.03, mesh.n_electrodes)
    moved = nuisance.moved_electrodes(mesh, shifts)

    def centre_angles(m):
        return np.array([np.angle(np.exp(1j * np.arctan2(*m.nodes[n][:, ::-1].T)).mean()) for n in m.electrode_nodes])

    turned = np.angle(np.exp(1j * (centre_angles(moved) - centre_angles(mesh))))
    np.testing.assert_allclose(turned, shifts, atol=1e-3)
    # nodes stay on their circles, and the centre does not move
    np.testing.assert_allclose(np.hypot(*moved.nodes.T), np.hypot(*mesh.nodes.T), atol=1e-15)


@pytest.mark.parametrize("setting, message", [
    ("tank.electrode_shift=-0.001", "tank.electrode_shift"),
    ("tank.drift_std=0.2", "tank.drift_std must be at most"),
    ("tank.contact_max=1e-9", "must exceed the fitted contact impedance"),
])
def test_bad_nuisance_settings_are_refused(setting, message):
    with pytest.raises(InputError, match=message):
        simulator(setting)
