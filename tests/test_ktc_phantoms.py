import math

import numpy as np
import pytest

from dgm_eit.data.phantoms import Anomaly, Phantom, element_quadrature_points
from dgm_eit.errors import InputError
from dgm_eit.ktc.phantoms import Cross, KTCPhantomSampler, Polygon, class_map, phantom_sampler
from dgm_eit.physics import disk_mesh

CFG = dict(shapes=["circle", "ellipse", "rectangle", "polygon", "cross"], count_min=1, count_max=4,
           size_min=0.15, size_max=0.35, centre_max=0.7, gap=0.05, rim=0.05, aspect_min=0.4,
           p_conductive=0.5, resistive_min=0.001, resistive_max=0.1, conductive_min=5.0,
           conductive_max=100.0, max_tries=2000, quadrature=4, supersample=1)


def _sampler(**changes):
    return KTCPhantomSampler({**CFG, **changes})


def _grid(n=1000, lo=-1.0, hi=1.0):
    c = lo + (np.arange(n) + 0.5) * (hi - lo) / n
    x, y = np.meshgrid(c, c)
    return x, y, ((hi - lo) / n) ** 2


def _shoelace(v):
    v = np.asarray(v)
    return 0.5 * abs(np.dot(v[:, 0], np.roll(v[:, 1], -1)) - np.dot(v[:, 1], np.roll(v[:, 0], -1)))


def _shape(obj):
    if isinstance(obj, Anomaly):
        return "circle" if obj.a == obj.b else "ellipse"
    if isinstance(obj, Cross):
        return "cross"
    d = [math.hypot(x - obj.cx, y - obj.cy) for x, y in obj.vertices]
    # a rectangle's corners all lie on its bounding circle; the irregular polygon's jitter
    return "rectangle" if len(d) == 4 and max(d) - min(d) < 1e-9 else "polygon"


@pytest.mark.parametrize("vertices", [
    ((-0.5, -0.3), (0.6, -0.4), (0.3, 0.5), (-0.4, 0.4)),  # convex quadrilateral
    ((-0.6, -0.6), (0.6, -0.6), (0.6, -0.2), (-0.2, -0.2), (-0.2, 0.6), (-0.6, 0.6)),  # L shape
    ((0.0, -0.5), (0.5, 0.5), (0.0, 0.1), (-0.5, 0.5)),  # arrowhead (non-convex)
])
def test_polygon_area_and_points(vertices):
    x, y, cell = _grid()
    poly = Polygon(vertices, 0.01)
    assert poly.contains(x, y).sum() * cell == pytest.approx(_shoelace(vertices), rel=0.01)
    assert poly.area == pytest.approx(_shoelace(vertices))
    assert poly.bounding_radius == pytest.approx(max(math.hypot(a - poly.cx, b - poly.cy) for a, b in vertices))
    assert not poly.contains(np.array(0.95), np.array(0.0))


def test_polygon_points_of_l_shape():
    poly = Polygon(((-0.6, -0.6), (0.6, -0.6), (0.6, -0.2), (-0.2, -0.2), (-0.2, 0.6), (-0.6, 0.6)), 50.0)
    x = np.array([-0.4, 0.4, -0.4, 0.3, 0.0, 0.7])
    y = np.array([0.4, -0.4, -0.4, 0.3, 0.0, -0.5])
    assert poly.contains(x, y).tolist() == [True, True, True, False, False, False]
    assert poly.contains(x[:, None], y[None, :]).shape == (6, 6)  # broadcasts


def test_cross_area_and_points():
    x, y, cell = _grid()
    cross = Cross(0.1, -0.05, 1.0, 0.3, 0.4, 20.0)
    assert cross.contains(x, y).sum() * cell == pytest.approx(2 * 1.0 * 0.3 - 0.3**2, rel=0.01)
    c, s = math.cos(0.4), math.sin(0.4)
    along, across = np.array([c, s]), np.array([-s, c])
    centre = np.array([0.1, -0.05])
    inside = [centre, centre + 0.45 * along, centre - 0.45 * across, centre + 0.1 * along + 0.1 * across]
    outside = [centre + 0.3 * (along + across), centre + 0.55 * along, centre + 0.45 * along + 0.2 * across]
    pts = np.array(inside + outside)
    assert cross.contains(pts[:, 0], pts[:, 1]).tolist() == [True] * 4 + [False] * 3
    assert cross.bounding_radius == pytest.approx(math.hypot(0.5, 0.15))


@pytest.fixture(scope="module")
def samples():
    sampler = _sampler()
    rng = np.random.default_rng(123)
    return [sampler.sample(rng) for _ in range(200)]


def test_sampler_counts_shapes_values(samples):
    counts = [len(ph.anomalies) for ph in samples]
    assert set(counts) == set(range(CFG["count_min"], CFG["count_max"] + 1))
    objs = [o for ph in samples for o in ph.anomalies]
    assert {_shape(o) for o in objs} == set(CFG["shapes"])
    conductive = [o.value > 1 for o in objs]
    for o in objs:
        lo, hi = ((CFG["conductive_min"], CFG["conductive_max"]) if o.value > 1
                  else (CFG["resistive_min"], CFG["resistive_max"]))
        assert lo <= o.value <= hi
        assert CFG["size_min"] - 1e-12 <= o.bounding_radius <= CFG["size_max"] + 1e-12
    n, p = len(objs), CFG["p_conductive"]
    assert abs(np.mean(conductive) - p) <= 4.5 * math.sqrt(p * (1 - p) / n)
    assert all(ph.background == 1.0 for ph in samples)


def test_sampler_rim_and_gap(samples):
    x, y, _ = _grid(300)
    r = np.hypot(x, y)
    for ph in samples:
        for k, o in enumerate(ph.anomalies):
            assert math.hypot(o.cx, o.cy) <= CFG["centre_max"] + 1e-12
            inside = o.contains(x, y)
            assert inside.any()
            assert r[inside].max() <= 1 - CFG["rim"] + 1e-9  # a shape never leaves its bounding circle...
            assert np.hypot(x - o.cx, y - o.cy)[inside].max() <= o.bounding_radius + 1e-9
            for q in ph.anomalies[k + 1:]:  # ...so gap between the circles keeps the objects apart
                least = o.bounding_radius + q.bounding_radius + CFG["gap"]
                assert math.hypot(o.cx - q.cx, o.cy - q.cy) >= least - 1e-12


def test_only_crosses_and_all_conductive():
    sampler = _sampler(shapes=["cross"], p_conductive=1.0)
    rng = np.random.default_rng(5)
    objs = [o for _ in range(30) for o in sampler.sample(rng).anomalies]
    assert all(isinstance(o, Cross) and o.value >= CFG["conductive_min"] for o in objs)


def test_determinism():
    sampler = phantom_sampler({"phantom": dict(CFG)})
    a = sampler.sample(np.random.default_rng(42)).rasterise(64)
    b = sampler.sample(np.random.default_rng(42)).rasterise(64)
    c = sampler.sample(np.random.default_rng(43)).rasterise(64)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    rng1, rng2 = np.random.default_rng(9), np.random.default_rng(9)
    assert [sampler.sample(rng1) for _ in range(10)] == [sampler.sample(rng2) for _ in range(10)]


def test_class_map():
    ph = Phantom((Anomaly(-0.5, 0.0, 0.3, 0.3, 0.0, 0.01),
                  Polygon(((0.2, -0.2), (0.7, -0.2), (0.7, 0.3), (0.2, 0.3)), 30.0)), 1.0)
    cm = class_map(ph, 32)
    assert cm.dtype == np.uint8 and cm.shape == (32, 32)
    assert cm[16, 8] == 1 and cm[15, 23] == 2 and cm[16, 16] == 0
    assert cm[0, 0] == 0  # outside the disk
    image = ph.rasterise(32)
    assert np.array_equal(cm == 1, (image > 0) & (image < 1))
    assert np.array_equal(cm == 2, image > 1)
    mask = np.zeros((32, 32), dtype=bool)
    mask[:, :16] = True
    assert set(np.unique(class_map(ph, 32, mask)[:, 16:])) == {0}


def test_on_mesh_elements(samples):
    mesh = disk_mesh(n_electrodes=16, h0=0.1)
    qp = element_quadrature_points(mesh.nodes, mesh.elements, 4)
    corners = mesh.nodes[mesh.elements]  # (m, 3, 2)
    square = Polygon(((-0.7, -0.3), (-0.1, -0.3), (-0.1, 0.3), (-0.7, 0.3)), 0.005)
    cross = Cross(0.45, 0.0, 0.9, 0.4, 0.0, 40.0)
    values = Phantom((square, cross), 1.0).on_elements(qp)
    deep_square = square.contains(corners[..., 0], corners[..., 1]).all(axis=1)
    deep_bar = ((np.abs(corners[..., 0] - 0.45) <= 0.45) & (np.abs(corners[..., 1]) <= 0.2)).all(axis=1)
    assert deep_square.sum() >= 2 and deep_bar.sum() >= 2
    assert np.all(values[deep_square] == 0.005) and np.all(values[deep_bar] == 40.0)
    for ph in samples[:20] + [Phantom((square, cross), 1.0)]:
        values = ph.on_elements(qp)
        far = np.ones(len(values), dtype=bool)
        for o in ph.anomalies:
            far &= (np.hypot(qp[..., 0] - o.cx, qp[..., 1] - o.cy) > o.bounding_radius + 1e-9).all(axis=1)
        assert far.sum() > 0 and np.all(values[far] == 1.0)
        levels = [1.0] + [o.value for o in ph.anomalies]
        assert min(levels) - 1e-12 <= values.min() and values.max() <= max(levels) + 1e-12


@pytest.mark.parametrize("key,value", [
    ("shapes", ["circle", "star"]), ("shapes", []), ("shapes", "circle"), ("shapes", ["cross", "cross"]),
    ("count_min", 0), ("count_max", 0), ("count_min", 2.5), ("size_min", 0.0), ("size_min", 0.5),
    ("size_max", "big"), ("centre_max", -0.1), ("gap", -0.01), ("rim", -0.1), ("aspect_min", 0.0),
    ("aspect_min", 1.5), ("p_conductive", 1.5), ("p_conductive", -0.1), ("resistive_min", 0.0),
    ("resistive_max", 1.0), ("resistive_min", 0.2), ("conductive_min", 1.0), ("conductive_max", 2.0),
    ("max_tries", 0), ("quadrature", 0), ("supersample", 0), ("conductive_max", math.nan),
])
def test_bad_values(key, value):
    with pytest.raises(InputError, match=rf"phantom\.{key}"):
        _sampler(**{key: value})


@pytest.mark.parametrize("key", sorted(CFG))
def test_missing_key(key):
    p = {k: v for k, v in CFG.items() if k != key}
    with pytest.raises(InputError, match=rf"phantom\.{key} is missing"):
        KTCPhantomSampler(p)


def test_impossible_sizes_and_placement():
    with pytest.raises(InputError, match=r"phantom\.size_min.*phantom\.rim"):
        _sampler(size_min=0.6, size_max=0.7, rim=0.4)
    with pytest.raises(InputError, match=r"phantom\.count_max"):
        _sampler(count_min=4, count_max=4, size_min=0.45, size_max=0.45, centre_max=0.3)
    # not refused up front, but the draw budget runs out (two objects need two draws)
    sampler = _sampler(count_min=2, count_max=2, max_tries=1)
    with pytest.raises(InputError, match=r"phantom\.max_tries"):
        sampler.sample(np.random.default_rng(0))
