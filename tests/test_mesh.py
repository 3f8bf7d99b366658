import numpy as np
import pytest

from dgm_eit.errors import InputError
from dgm_eit.physics import Protocol, disk_mesh, make_protocol, pyeit_like_mesh
from dgm_eit.physics.mesh import _signed_areas


def test_point_electrodes_start_at_angle_zero_and_run_counter_clockwise():
    mesh = disk_mesh(16, 0.1)
    xy = mesh.nodes[np.concatenate(mesh.electrode_nodes)]
    np.testing.assert_allclose(np.hypot(*xy.T), 1.0, atol=1e-12)
    angles = np.mod(np.arctan2(xy[:, 1], xy[:, 0]), 2 * np.pi)
    np.testing.assert_allclose(angles, 2 * np.pi * np.arange(16) / 16, atol=1e-12)


def test_elements_are_counter_clockwise_and_cover_the_disk():
    mesh = disk_mesh(16, 0.1)
    assert np.all(_signed_areas(mesh.nodes, mesh.elements) > 0)
    # the polygon inscribed in the unit circle through the boundary nodes
    nb = int(np.sum(np.isclose(np.hypot(*mesh.nodes.T), 1.0)))
    polygon_area = 0.5 * nb * np.sin(2 * np.pi / nb)
    assert mesh.areas.sum() == pytest.approx(polygon_area, rel=1e-12)
    assert np.all(np.hypot(*mesh.nodes.T) <= 1 + 1e-12)


def test_paper_sized_mesh_and_boundary_refinement():
    mesh = disk_mesh(16, 0.05)
    # the paper's h0 = 0.05 mesh had 731 nodes / 1338 triangles (inferred from its figures)
    assert 650 <= mesh.n_nodes <= 820
    assert 1200 <= mesh.n_elements <= 1500
    r = np.hypot(*mesh.centroids.T)
    size = np.sqrt(mesh.areas)
    assert size[r > 0.9].mean() < 0.7 * size[r < 0.5].mean()


def test_mesh_is_deterministic_and_cached():
    a = disk_mesh(16, 0.08)
    assert disk_mesh(16, 0.08) is a
    assert disk_mesh(n_electrodes=16.0, h0="0.08", electrode_model="point", electrode_width=0.3) is a
    disk_mesh.cache_clear()
    b = disk_mesh(16, 0.08)
    assert b is not a
    np.testing.assert_array_equal(a.nodes, b.nodes)
    np.testing.assert_array_equal(a.elements, b.elements)
    assert a.ref_node == b.ref_node
    with pytest.raises(ValueError):
        a.nodes[0, 0] = 3.0  # shared through the cache, so read-only


def test_cem_arcs_have_the_requested_width_and_are_resolved_by_edges():
    width = 0.3
    mesh = disk_mesh(16, 0.1, "cem", width)
    for k, (nodes, edges) in enumerate(zip(mesh.electrode_nodes, mesh.electrode_edges)):
        xy = mesh.nodes[nodes]
        angles = np.unwrap(np.arctan2(xy[:, 1], xy[:, 0]))
        centre = 2 * np.pi * k / 16
        assert np.angle(np.exp(1j * (angles[0] - centre))) == pytest.approx(-width / 2, abs=1e-12)
        assert angles[-1] - angles[0] == pytest.approx(width, abs=1e-12)
        np.testing.assert_array_equal(edges[:, 1], edges[1:, 0].tolist() + [edges[-1, 1]])
        # each arc edge is an edge of exactly one element (a boundary edge)
        element_edges = {tuple(sorted(e)) for tri in mesh.elements for e in ((tri[0], tri[1]), (tri[1], tri[2]), (tri[2], tri[0]))}
        assert all(tuple(sorted(e)) in element_edges for e in edges)
        assert mesh.ref_node not in nodes


def test_bad_mesh_requests_are_refused():
    with pytest.raises(InputError, match="do not fit"):
        disk_mesh(16, 0.1, "cem", 0.5)
    with pytest.raises(InputError, match="electrode model"):
        disk_mesh(16, 0.1, "gap")
    with pytest.raises(InputError, match="n_electrodes"):
        disk_mesh(1, 0.1)
    with pytest.raises(InputError, match="h0"):
        disk_mesh(16, -0.1)
    nodes = np.array([[0, 0], [1, 0], [0, 1], [1, 1.0]])
    elements = np.array([[0, 1, 2], [1, 3, 2]])
    with pytest.raises(InputError, match="not in the mesh"):
        pyeit_like_mesh(nodes, elements, [1, 7], ref_node=0)
    with pytest.raises(InputError, match="lies on an electrode"):
        pyeit_like_mesh(nodes, elements, [1, 2], ref_node=1)


def test_wrapped_mesh_fixes_clockwise_elements():
    nodes = np.array([[0, 0], [1, 0], [0, 1], [1, 1.0]])
    mesh = pyeit_like_mesh(nodes, np.array([[0, 2, 1], [1, 3, 2]]), [1, 2], ref_node=0)
    assert np.all(_signed_areas(mesh.nodes, mesh.elements) > 0)
    np.testing.assert_allclose(mesh.areas, 0.5)


def test_adjacent_protocol_has_208_measurements_without_current_electrodes():
    p = make_protocol("adjacent", 16)
    assert (p.n_exc, p.n_meas, p.n_electrodes) == (16, 208, 16)
    np.testing.assert_array_equal(np.bincount(p.meas_excitation), np.full(16, 13))
    for k in range(p.n_meas):
        inj = p.injections[p.meas_excitation[k]]
        assert np.all(inj[p.measurements[k] != 0] == 0)
    np.testing.assert_array_equal(p.injections.sum(axis=1), 0)
    np.testing.assert_array_equal(p.measurements.sum(axis=1), 0)
    # first excitation drives electrode 0 -> 1; its first measurement is U[3] - U[2]
    np.testing.assert_array_equal(p.injections[0, :3], [1, -1, 0])
    assert p.measurements[0, 3] == 1 and p.measurements[0, 2] == -1


def test_opposite_and_custom_protocols():
    p = make_protocol("opposite", 16)
    assert p.n_exc == 16 and p.n_meas == 16 * 12
    assert p.injections[0, 0] == 1 and p.injections[0, 8] == -1
    custom = Protocol(np.array([[1.0, 0, -1, 0]]), np.eye(4) - np.roll(np.eye(4), 1, axis=1), np.zeros(4, int))
    assert custom.n_meas == 4


def test_bad_protocols_are_refused():
    with pytest.raises(InputError, match="unknown protocol 'ajacent'"):
        make_protocol("ajacent", 16)
    with pytest.raises(InputError, match="sum to zero"):
        Protocol(np.array([[1.0, 0, 0, 0]]), np.ones((1, 4)), np.zeros(1, int))
    with pytest.raises(InputError, match="meas_excitation"):
        Protocol(np.array([[1.0, -1, 0, 0]]), np.ones((1, 4)), np.array([3]))
    with pytest.raises(InputError, match="electrodes"):
        Protocol(np.array([[1.0, -1, 0, 0]]), np.ones((1, 5)), np.zeros(1, int))
