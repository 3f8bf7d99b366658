import numpy as np
import pytest
import scipy.sparse as sp

from dgm_eit.errors import InputError
from dgm_eit.physics import ForwardModel, Protocol, disk_mesh, make_protocol, pyeit_like_mesh

ADJ = make_protocol("adjacent", 16)


def _two_anomalies(mesh):
    c = mesh.centroids
    sigma = np.ones(mesh.n_elements)
    sigma[np.hypot(c[:, 0] - 0.4, c[:, 1] - 0.2) < 0.25] = 0.5
    sigma[np.hypot(c[:, 0] + 0.3, c[:, 1] + 0.35) < 0.2] = 1.5
    return sigma


def _full_stiffness(mesh, sigma):
    """Ungrounded P1 stiffness matrix, assembled element by element (independent of fem.py)."""
    n = mesh.n_nodes
    K = np.zeros((n, n))
    for tri, s in zip(mesh.elements, sigma):
        p = mesh.nodes[tri]
        B = np.array([[p[1, 0] - p[0, 0], p[2, 0] - p[0, 0]], [p[1, 1] - p[0, 1], p[2, 1] - p[0, 1]]])
        area = 0.5 * abs(np.linalg.det(B))
        grads = np.linalg.solve(B.T, np.array([[-1.0, 1, 0], [-1.0, 0, 1]])).T  # (3, 2)
        K[np.ix_(tri, tri)] += s * area * grads @ grads.T
    return K


def test_homogeneous_disk_matches_the_analytic_point_source_solution():
    # unit currents in at boundary point a and out at b on a homogeneous unit disk:
    # u(x) = (1 / (pi sigma)) * log(|x - b| / |x - a|)
    errors = []
    for h0 in (0.1, 0.05):
        mesh = disk_mesh(16, h0)
        fm = ForwardModel(mesh, ADJ)
        v = fm.forward(np.full(mesh.n_elements, 2.0))
        e = mesh.nodes[np.concatenate(mesh.electrode_nodes)]
        exact = []
        for k in range(ADJ.n_meas):
            inj = ADJ.injections[ADJ.meas_excitation[k]]
            a, b = e[np.argmax(inj)], e[np.argmin(inj)]
            with np.errstate(divide="ignore", invalid="ignore"):
                u = np.log(np.hypot(*(e - b).T) / np.hypot(*(e - a).T)) / (np.pi * 2.0)
            u[inj != 0] = 0.0  # singular at the current electrodes, which are never measured
            exact.append(ADJ.measurements[k] @ u)
        exact = np.array(exact)
        errors.append(np.linalg.norm(v - exact) / np.linalg.norm(exact))
    assert errors[1] < errors[0] < 0.05


def test_voltages_scale_inversely_with_conductivity_and_batch_matches_single():
    mesh = disk_mesh(16, 0.1)
    fm = ForwardModel(mesh, ADJ)
    sigma = _two_anomalies(mesh)
    v = fm.forward(sigma)
    np.testing.assert_allclose(fm.forward(3.0 * sigma), v / 3.0, rtol=1e-10)
    batch = np.stack([sigma, 2 * sigma, np.ones_like(sigma)])
    vb = fm.forward(batch)
    assert vb.shape == (3, 208)
    np.testing.assert_allclose(vb[1], fm.forward(2 * sigma), rtol=1e-12)
    np.testing.assert_allclose(vb[0], v, rtol=1e-12)


def test_point_fields_solve_the_ungrounded_system_so_currents_balance():
    mesh = disk_mesh(16, 0.1)
    fm = ForwardModel(mesh, ADJ)
    sigma = _two_anomalies(mesh)
    K = _full_stiffness(mesh, sigma)
    np.testing.assert_allclose(fm.system_matrix(sigma).toarray(),
                               np.delete(np.delete(K, mesh.ref_node, 0), mesh.ref_node, 1), atol=1e-12)
    phi = fm.node_fields(sigma)
    electrodes = np.concatenate(mesh.electrode_nodes)
    for i, inj in enumerate(ADJ.injections):
        flux = K @ (phi @ inj)
        expected = np.zeros(mesh.n_nodes)
        expected[electrodes] = inj
        # the grounded node (and every interior node) receives no net current
        np.testing.assert_allclose(flux, expected, atol=1e-10)
    assert abs(ADJ.injections.sum()) == 0


@pytest.mark.parametrize("model", ["point", "cem"])
def test_jacobian_matches_finite_differences(model):
    mesh = disk_mesh(16, 0.15, model, 0.15)
    fm = ForwardModel(mesh, ADJ, model, contact_impedance=0.05)
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.5, 2.0, mesh.n_elements)
    v, J = fm.jacobian(sigma)
    np.testing.assert_allclose(v, fm.forward(sigma), rtol=1e-12)
    assert J.shape == (208, mesh.n_elements)
    for e in rng.choice(mesh.n_elements, 6, replace=False):
        h = 1e-6 * sigma[e]
        up, down = sigma.copy(), sigma.copy()
        up[e] += h
        down[e] -= h
        fd = (fm.forward(up) - fm.forward(down)) / (2 * h)
        np.testing.assert_allclose(J[:, e], fd, rtol=1e-5, atol=1e-7 * np.abs(J).max())
    # direction derivative over all elements at once
    d = rng.normal(size=mesh.n_elements) * sigma
    fd = (fm.forward(sigma + 1e-7 * d) - fm.forward(sigma - 1e-7 * d)) / 2e-7
    np.testing.assert_allclose(J @ d, fd, rtol=1e-5, atol=1e-8 * np.abs(fd).max())


def _full_pattern_protocol(L):
    """Every adjacent current pattern, measured with every adjacent pattern: Z[i, j]."""
    patterns = np.array([np.eye(L)[i] - np.eye(L)[(i + 1) % L] for i in range(L - 1)])
    E = len(patterns)
    return Protocol(patterns, np.tile(patterns, (E, 1)), np.repeat(np.arange(E), E)), E


def test_cem_transfer_impedance_is_reciprocal():
    mesh = disk_mesh(16, 0.1, "cem", 0.2)
    protocol, E = _full_pattern_protocol(16)
    # a different contact impedance on every electrode: reciprocity must still hold
    fm = ForwardModel(mesh, protocol, "cem", contact_impedance=np.linspace(0.01, 0.05, 16))
    rng = np.random.default_rng(1)
    sigma = rng.uniform(0.3, 3.0, mesh.n_elements)
    Z = fm.forward(sigma).reshape(E, E).T  # Z[i, j]: pattern i measured under current pattern j
    assert np.linalg.norm(Z - Z.T) / np.linalg.norm(Z) <= 1e-10
    assert np.all(np.linalg.eigvalsh(0.5 * (Z + Z.T)) > 0)  # positive definite: power is dissipated


def test_cem_contact_currents_equal_the_injected_currents_and_sum_to_zero():
    z = 0.03
    mesh = disk_mesh(16, 0.1, "cem", 0.2)
    fm = ForwardModel(mesh, ADJ, "cem", contact_impedance=z)
    sigma = _two_anomalies(mesh)
    phi = fm.node_fields(sigma)
    R = fm.transfer_matrix(sigma)
    for inj in ADJ.injections[:4]:
        u, U = phi @ inj, R @ inj
        currents = []
        for l, edges in enumerate(mesh.electrode_edges):
            i, j = edges[:, 0], edges[:, 1]
            h = np.hypot(*(mesh.nodes[i] - mesh.nodes[j]).T)
            # (1/z) * integral over the arc of (U_l - u), u linear on each edge
            currents.append(np.sum(h * (U[l] - 0.5 * (u[i] + u[j]))) / z)
        np.testing.assert_allclose(currents, inj, atol=1e-10)
        assert abs(sum(currents)) < 1e-10


def test_cem_tends_to_the_point_model_as_electrodes_shrink():
    diffs = []
    for width in (0.2, 0.1, 0.05, 0.005):
        mesh = disk_mesh(16, 0.1, "cem", width)
        sigma = _two_anomalies(mesh)
        centres = [e[len(e) // 2] for e in mesh.electrode_nodes]
        point = ForwardModel(pyeit_like_mesh(mesh.nodes, mesh.elements, centres, mesh.ref_node), ADJ)
        vp = point.forward(sigma)
        vc = ForwardModel(mesh, ADJ, "cem", contact_impedance=0.01).forward(sigma)
        diffs.append(np.linalg.norm(vc - vp) / np.linalg.norm(vp))
    assert diffs[0] > diffs[1] > diffs[2] > diffs[3]
    assert diffs[3] < 1e-3 < diffs[0]


def test_bad_conductivities_and_voltages_are_refused():
    mesh = disk_mesh(16, 0.1)
    fm = ForwardModel(mesh, ADJ)
    m = mesh.n_elements
    with pytest.raises(InputError, match="positive"):
        fm.forward(np.r_[np.ones(m - 1), 0.0])
    with pytest.raises(InputError, match="positive"):
        fm.jacobian(-np.ones(m))
    with pytest.raises(InputError, match="NaN"):
        fm.forward(np.r_[np.ones(m - 1), np.nan])
    with pytest.raises(InputError, match=rf"shape \({m},\)"):
        fm.forward(np.ones(m + 1))
    with pytest.raises(InputError, match="shape"):
        fm.forward(np.ones((2, 2, m)))
    with pytest.raises(InputError, match="208"):
        fm.check_voltages(np.ones(207))
    with pytest.raises(ValueError):
        fm.forward("abc")


def test_models_that_do_not_fit_the_mesh_are_refused():
    with pytest.raises(InputError, match="protocol uses 8 electrodes but the mesh has 16"):
        ForwardModel(disk_mesh(16, 0.1), make_protocol("adjacent", 8))
    with pytest.raises(InputError, match="electrode_model='cem'"):
        ForwardModel(disk_mesh(16, 0.1), ADJ, "cem")
    with pytest.raises(InputError, match="contact impedance"):
        ForwardModel(disk_mesh(16, 0.1, "cem", 0.2), ADJ, "cem", contact_impedance=0.0)
    with pytest.raises(InputError, match="one per electrode"):
        ForwardModel(disk_mesh(16, 0.1, "cem", 0.2), ADJ, "cem", contact_impedance=[0.1, 0.2])


def test_assembly_pattern_is_reused():
    mesh = disk_mesh(16, 0.1)
    fm = ForwardModel(mesh, ADJ)
    A1 = fm.system_matrix(np.ones(mesh.n_elements))
    A2 = fm.system_matrix(_two_anomalies(mesh))
    assert sp.isspmatrix_csc(A1)
    np.testing.assert_array_equal(A1.indices, A2.indices)
    np.testing.assert_array_equal(A1.indptr, A2.indptr)


def test_sparse_lu_fallback_gives_the_same_fields():
    mesh = disk_mesh(16, 0.1, "cem", 0.2)
    sigma = _two_anomalies(mesh)
    band = ForwardModel(mesh, ADJ, "cem")
    lu = ForwardModel(mesh, ADJ, "cem")
    lu._use_band = False  # what very large meshes use
    np.testing.assert_allclose(lu.jacobian(sigma)[1], band.jacobian(sigma)[1], rtol=1e-9, atol=1e-12)


def _reference_jacobian(fm, sigma):
    """``(v, J)`` the straightforward way: a dense solve of the grounded system for every
    excitation and every measurement pattern (as a current pattern, by reciprocity), then
    ``J[k, e] = -area_e grad u_exc(k) . grad w_k`` element by element."""
    mesh = fm.mesh
    A = fm.system_matrix(sigma).toarray()
    n, L = mesh.n_nodes, mesh.n_electrodes
    keep = np.flatnonzero(np.arange(A.shape[0] + 1) != mesh.ref_node)  # unknowns left after grounding
    if fm.electrode_model == "point":
        targets = np.array([e[0] for e in mesh.electrode_nodes])
    else:
        targets = n + np.arange(L)

    def potentials(patterns):
        """(rows, n_full) potentials (grounded node 0) for current patterns (rows, L)."""
        rhs = np.zeros((A.shape[0] + 1, len(patterns)))
        rhs[targets] = patterns.T
        full = np.zeros_like(rhs)
        full[keep] = np.linalg.solve(A, rhs[keep])
        return full.T

    P = fm.protocol
    u = potentials(P.injections)            # excitation fields
    w = potentials(P.measurements)          # adjoint fields of the measurement patterns
    v = np.array([u[P.meas_excitation[k]][targets] @ P.measurements[k] for k in range(P.n_meas)])
    J = np.zeros((P.n_meas, mesh.n_elements))
    for e, tri in enumerate(mesh.elements):
        p = mesh.nodes[tri]
        B = np.array([[p[1, 0] - p[0, 0], p[2, 0] - p[0, 0]], [p[1, 1] - p[0, 1], p[2, 1] - p[0, 1]]])
        area = 0.5 * abs(np.linalg.det(B))
        grads = np.linalg.solve(B.T, np.array([[-1.0, 1, 0], [-1.0, 0, 1]])).T  # (3, 2)
        gu = u[:, tri] @ grads           # (E, 2)
        gw = w[:, tri] @ grads           # (M, 2)
        J[:, e] = -area * np.einsum("kd,kd->k", gu[P.meas_excitation], gw)
    return v, J


@pytest.mark.parametrize("model", ["point", "cem"])
def test_fast_jacobian_matches_a_straightforward_reference(model):
    mesh = disk_mesh(16, 0.15, model, 0.15)
    fm = ForwardModel(mesh, ADJ, model, contact_impedance=0.05)
    sigma = np.random.default_rng(4).uniform(0.5, 2.0, mesh.n_elements)
    v_ref, J_ref = _reference_jacobian(fm, sigma)
    v, J = fm.jacobian(sigma)
    assert J.flags.c_contiguous
    np.testing.assert_allclose(v, v_ref, rtol=1e-10, atol=1e-12 * np.abs(v_ref).max())
    np.testing.assert_allclose(J, J_ref, rtol=1e-9, atol=1e-11 * np.abs(J_ref).max())
    # forward alone (electrode potentials as Y^T Y, no back substitution) gives the same v
    fm.clear_cache()
    np.testing.assert_allclose(fm.forward(sigma), v_ref, rtol=1e-10, atol=1e-12 * np.abs(v_ref).max())
    np.testing.assert_allclose(fm.transfer_matrix(sigma), fm._solve_fields(sigma)[fm._electrode_rows], rtol=1e-10)


def test_jacobian_of_a_protocol_with_scattered_rows_matches_the_reference():
    # measurement rows not grouped by excitation: the general (non-slice) path
    protocol, E = _full_pattern_protocol(8)
    order = np.random.default_rng(5).permutation(protocol.n_meas)
    shuffled = Protocol(protocol.injections, protocol.measurements[order], protocol.meas_excitation[order])
    mesh = disk_mesh(8, 0.2)
    fm = ForwardModel(mesh, shuffled)
    sigma = _two_anomalies(mesh)
    v_ref, J_ref = _reference_jacobian(fm, sigma)
    v, J = fm.jacobian(sigma)
    np.testing.assert_allclose(v, v_ref, rtol=1e-10, atol=1e-12 * np.abs(v_ref).max())
    np.testing.assert_allclose(J, J_ref, rtol=1e-9, atol=1e-11 * np.abs(J_ref).max())


def test_a_model_with_cached_fields_pickles_and_gives_the_same_answers():
    import pickle

    mesh = disk_mesh(16, 0.2)
    fm = ForwardModel(mesh, ADJ)
    sigma = _two_anomalies(mesh)
    v, J = fm.jacobian(sigma)
    clone = pickle.loads(pickle.dumps(fm))
    clone.clear_cache()
    np.testing.assert_array_equal(clone.forward(sigma), fm.forward(sigma))
    np.testing.assert_array_equal(clone.jacobian(sigma)[1], J)


def test_fem_calls_run_on_one_blas_thread_and_restore_the_setting():
    from threadpoolctl import threadpool_info, threadpool_limits

    from dgm_eit.physics.fem import blas_threads

    seen = []
    with threadpool_limits(2, user_api="blas"):
        with blas_threads(1):
            seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
        after = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    assert all(n == 1 for n in seen[0]) and seen[0]
    assert all(n == 2 for n in after)


@pytest.mark.parametrize("with_pyeit", [True, False])
def test_bench_fem_prints_the_documented_json(capsys, monkeypatch, with_pyeit):
    import json
    import sys

    from dgm_eit.cli import main
    from dgm_eit.commands.bench import FEM_KEYS

    if with_pyeit:
        pytest.importorskip("pyeit")
    else:
        monkeypatch.setitem(sys.modules, "pyeit", None)  # import pyeit now fails
    assert main(["bench", "fem", "--json", "--h0", "0.2", "--repeat", "1", "--pyeit-repeat", "1",
                 "--threads", "1", "--seed", "3", "--profile", "smoke", "--gn-images", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert tuple(result) == FEM_KEYS
    assert result["nodes"] > 50 and result["ours_forward_ms"] > 0 and result["ours_gn10_s"] > 0
    # the BLAS and thread report
    assert result["threads"] == 1 and result["blas"]
    assert all({"internal_api", "version", "num_threads"} <= set(b) for b in result["blas"])
    assert all(b["num_threads"] == 1 for b in result["blas"])
    assert any(line.startswith("BLAS: ") for line in out)
    # Gauss-Newton per image on the profile's own mesh, with its [gn] settings
    line = next(line for line in out if line.startswith("Gauss-Newton per image on the profile's mesh"))
    assert "smoke" in line and " ms per image" in line
    assert result["profile"] == "smoke" and result["profile_nodes"] > 100
    assert result["ours_gn_profile_ms"] > 0 and result["ours_gn_profile_cold_ms"] > 0
    assert result["ours_gn_profile_cpu_ms"] > 0 and result["profile_gn_images"] == 1
    assert result["profile_gn"]["max_iter"] >= result["profile_gn_iterations"] >= 1
    if with_pyeit:
        assert result["max_rel_err_v"] <= 1e-8 and result["max_rel_err_jac"] <= 1e-8
        assert result["speedup_forward"] > 0 and result["gn10_lamb_pyeit"] == 0.01
    else:
        assert result["pyeit_forward_ms"] is None and result["speedup_gn"] is None
