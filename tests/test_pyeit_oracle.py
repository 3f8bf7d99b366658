"""Our point-electrode FEM against pyEIT 1.2.4 on pyEIT's own mesh (test-only dependency)."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

from dgm_eit.physics import ForwardModel, make_protocol, pyeit_like_mesh

pyeit = pytest.importorskip("pyeit")


@pytest.fixture(scope="module")
def pyeit_setup():
    import pyeit.eit.protocol as pyeit_protocol
    import pyeit.mesh as pyeit_mesh
    from pyeit.eit.fem import EITForward

    state = np.random.get_state()
    np.random.seed(0)  # distmesh draws from numpy's global generator
    try:
        mesh = pyeit_mesh.create(16, h0=0.1)
    finally:
        np.random.set_state(state)
    protocol = pyeit_protocol.create(16, dist_exc=1, step_meas=1, parser_meas="std")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fwd = EITForward(mesh, protocol)
    wrapped = pyeit_like_mesh(mesh.node, mesh.element, mesh.el_pos)
    assert wrapped.ref_node == mesh.ref_node  # the same default ground as pyEIT's
    ours = ForwardModel(wrapped, make_protocol("adjacent", 16))
    return mesh, protocol, fwd, ours


def test_adjacent_protocol_matches_pyeit_ordering(pyeit_setup):
    _, protocol, _, ours = pyeit_setup
    p = ours.protocol
    np.testing.assert_array_equal(np.argmax(p.injections, 1), protocol.ex_mat[:, 0])
    np.testing.assert_array_equal(np.argmin(p.injections, 1), protocol.ex_mat[:, 1])
    pairs = protocol.meas_mat.reshape(-1, 2)  # (n, m): v = U[n] - U[m]
    np.testing.assert_array_equal(np.argmax(p.measurements, 1), pairs[:, 0])
    np.testing.assert_array_equal(np.argmin(p.measurements, 1), pairs[:, 1])
    np.testing.assert_array_equal(p.meas_excitation, np.repeat(np.arange(16), 13))


@pytest.mark.parametrize("kind", ["homogeneous", "random"])
def test_voltages_and_jacobian_match_pyeit(pyeit_setup, kind):
    mesh, _, fwd, ours = pyeit_setup
    assert ours.n_elements == mesh.n_elems and mesh.n_nodes > 300
    rng = np.random.default_rng(3)
    perm = np.ones(mesh.n_elems) if kind == "homogeneous" else rng.uniform(0.3, 3.0, mesh.n_elems)
    v_ref = fwd.solve_eit(perm)
    jac_ref, v0_ref = fwd.compute_jac(perm)
    v = ours.forward(perm)
    v2, J = ours.jacobian(perm)
    assert np.max(np.abs(v - v_ref)) <= 1e-8 * np.max(np.abs(v_ref))
    assert np.max(np.abs(v2 - v0_ref)) <= 1e-8 * np.max(np.abs(v0_ref))
    # pyEIT's Jacobian is -dv/dsigma; ours is +dv/dsigma
    assert np.max(np.abs(J + jac_ref)) <= 1e-8 * np.max(np.abs(jac_ref))


def test_opposite_protocol_matches_pyeit(pyeit_setup):
    import pyeit.eit.protocol as pyeit_protocol
    from pyeit.eit.fem import EITForward

    mesh, _, _, ours = pyeit_setup
    protocol = pyeit_protocol.create(16, dist_exc=8, step_meas=1, parser_meas="std")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v_ref = EITForward(mesh, protocol).solve_eit(np.ones(mesh.n_elems))
    v = ForwardModel(ours.mesh, make_protocol("opposite", 16)).forward(np.ones(mesh.n_elems))
    assert v.shape == v_ref.shape
    assert np.max(np.abs(v - v_ref)) <= 1e-8 * np.max(np.abs(v_ref))


def test_runtime_package_never_imports_pyeit():
    code = ("import sys, numpy as np; import dgm_eit.physics as p, dgm_eit.recon as r; "
            "m = p.disk_mesh(16, 0.1); f = p.ForwardModel(m, p.make_protocol('adjacent', 16)); "
            "r.gauss_newton(f, f.forward(np.ones(m.n_elements)), max_iter=1); "
            "p.PixelGrid(m, 8); assert 'pyeit' not in sys.modules, 'pyeit imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
