import math

import numpy as np
import pytest

from dgm_eit.config import load_config
from dgm_eit.data.noise import add_noise, measured_snr_db, noise_std
from dgm_eit.data.phantoms import (Anomaly, Phantom, PhantomSampler, element_quadrature_points,
                                   phantom_sampler, pixel_centres)
from dgm_eit.errors import InputError


def _phantom_cfg(**changes):
    cfg = load_config("smoke")
    cfg["phantom"].update(changes)
    return cfg


def _check_geometry(phantom, p):
    for k, a in enumerate(phantom.anomalies):
        assert math.hypot(a.cx, a.cy) <= p["centre_max"] + 1e-12
        assert p["radius_min"] <= a.bounding_radius <= p["radius_max"]
        for b in phantom.anomalies[k + 1:]:
            assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.bounding_radius + b.bounding_radius + p["gap"] - 1e-12


@pytest.mark.parametrize("anomalies,values", [(2, [0.5, 1.5]), (4, [0.01, 0.1, 0.5, 1.5])])
def test_paper_circles(anomalies, values):
    cfg = _phantom_cfg()
    cfg["data"]["anomalies"] = anomalies
    sampler = phantom_sampler(cfg)
    rng = np.random.default_rng(0)
    radii, centres = [], []
    for _ in range(300):
        ph = sampler.sample(rng)
        assert [a.value for a in ph.anomalies] == values
        assert all(a.a == a.b for a in ph.anomalies)
        _check_geometry(ph, cfg["phantom"])
        radii += [a.a for a in ph.anomalies]
        centres += [math.hypot(a.cx, a.cy) for a in ph.anomalies]
    # uniform radii fill their range; centres reach out towards centre_max
    assert min(radii) < 0.16 and max(radii) > 0.24
    assert max(centres) > 0.7


def test_ellipses_and_random_kinds():
    cfg = _phantom_cfg(kind="ellipses", aspect_min=0.5)
    ph_list = [phantom_sampler(cfg).sample(np.random.default_rng(i)) for i in range(50)]
    for ph in ph_list:
        _check_geometry(ph, cfg["phantom"])
        for a in ph.anomalies:
            assert 0.5 * a.a - 1e-12 <= a.b <= a.a
    assert any(a.b < 0.9 * a.a for ph in ph_list for a in ph.anomalies)

    cfg = _phantom_cfg(kind="random", count_min=0, count_max=5, sigma_min=0.1, sigma_max=3.0)
    sampler = phantom_sampler(cfg)
    counts, values = set(), []
    for i in range(200):
        ph = sampler.sample(np.random.default_rng(i))
        _check_geometry(ph, cfg["phantom"])
        counts.add(len(ph.anomalies))
        values += [a.value for a in ph.anomalies]
    assert counts == set(range(6))
    assert 0.1 <= min(values) and max(values) <= 3.0
    assert min(values) < 0.2 and max(values) > 2.0


def test_same_generator_state_same_phantom():
    sampler = phantom_sampler(_phantom_cfg())
    a = sampler.sample(np.random.default_rng([3, 0, 7]))
    b = sampler.sample(np.random.default_rng([3, 0, 7]))
    c = sampler.sample(np.random.default_rng([3, 0, 8]))
    assert a == b and a != c


@pytest.mark.parametrize("changes,anomalies,match", [
    ({"radius_min": 0.3, "radius_max": 0.2}, 2, "radius_min <= phantom.radius_max"),
    ({"centre_max": 0.9}, 2, "cross the boundary"),
    ({"radius_min": 0.24, "gap": 0.6}, 4, "cannot fit"),
    ({"kind": "squares"}, 2, "phantom.kind"),
    ({"conductivities": [0.5, -1.0]}, 2, "positive"),
    ({"conductivities": [0.5]}, 2, "has 1 values but data.anomalies=2"),
    ({}, 3, "set phantom.conductivities"),
    ({"kind": "random", "count_min": 3, "count_max": 1}, 2, "count_min"),
])
def test_bad_parameters_are_refused(changes, anomalies, match):
    cfg = _phantom_cfg(**changes)
    with pytest.raises(InputError, match=match):
        PhantomSampler(cfg["phantom"], anomalies)


def test_rejection_budget_gives_up_with_input_error():
    # passes the packing bound (4 centres 1.04-1.06 apart fit, barely) but random placement fails
    cfg = _phantom_cfg(radius_min=0.24, gap=0.56, max_tries=300)
    sampler = PhantomSampler(cfg["phantom"], 4)
    with pytest.raises(InputError, match="could not place 4 non-overlapping anomalies"):
        sampler.sample(np.random.default_rng(0))


def test_rasterise_centre_sampling_and_mask():
    ph = Phantom((Anomaly(0.3, -0.2, 0.25, 0.25, 0.0, 1.5),), background=1.0)
    size = 64
    img = ph.rasterise(size)
    x, y = pixel_centres(size)
    inside = x**2 + y**2 <= 1
    assert img.shape == (size, size)
    assert np.all(img[~inside] == 0)
    assert set(np.unique(img[inside])) == {1.0, 1.5}
    # row 0 is the top: the anomaly at y = -0.2 sits in the lower half
    rows = np.nonzero(img == 1.5)[0]
    assert rows.mean() > size / 2
    assert np.all(((x - 0.3) ** 2 + (y + 0.2) ** 2 <= 0.25**2) == (img == 1.5))
    # supersampling: the anomaly's mass matches its area more closely than pixel counting
    pixel_area = (2 / size) ** 2
    area = math.pi * 0.25**2
    smooth = ph.rasterise(size, supersample=4)
    assert abs(((smooth - 1.0) * inside).sum() / 0.5 * pixel_area - area) < 0.01 * area
    assert np.all(smooth[~inside] == 0)
    with pytest.raises(InputError, match="disk mask"):
        ph.rasterise(size, inside=np.ones((3, 3), bool))


def test_element_quadrature_gives_area_fractions():
    from dgm_eit.physics import disk_mesh

    mesh = disk_mesh(n_electrodes=16, h0=0.1)
    for k in (1, 2, 4):
        q = element_quadrature_points(mesh.nodes, mesh.elements, k)
        assert q.shape == (mesh.n_elements, k * k, 2)
        np.testing.assert_allclose(q.mean(axis=1), mesh.centroids, atol=1e-12)
    q = element_quadrature_points(mesh.nodes, mesh.elements, 6)
    ph = Phantom((Anomaly(-0.2, 0.1, 0.3, 0.15, 0.7, 2.0),), background=1.0)
    values = ph.on_elements(q)
    assert values.min() >= 1.0 and values.max() <= 2.0
    cut = (values > 1.0) & (values < 2.0)
    assert cut.any()  # edge elements get fractions, not a staircase
    mass = np.sum(mesh.areas * (values - 1.0))
    assert abs(mass - math.pi * 0.3 * 0.15) < 0.01 * math.pi * 0.3 * 0.15


def test_noise_hits_the_snr_in_expectation():
    rng = np.random.default_rng(0)
    v = rng.uniform(0.01, 0.15, size=(4000, 208))
    for snr in (40.0, 25.0):
        noisy = add_noise(v, snr, np.random.default_rng(1))
        measured = measured_snr_db(v, noisy)
        power_ratio = np.sum(v**2, axis=1) / np.sum((noisy - v) ** 2, axis=1)
        assert abs(10 * np.log10(1 / np.mean(1 / power_ratio)) - snr) < 0.02
        assert abs(measured.mean() - snr) < 0.05
        assert 0.2 < measured.std() < 0.6  # about 4.3 * sqrt(2/208) dB
    np.testing.assert_allclose(noise_std(v[:1], 20.0), np.linalg.norm(v[0]) / math.sqrt(208) / 10)
    with pytest.raises(InputError, match="snr_db"):
        add_noise(v, float("inf"), rng)
