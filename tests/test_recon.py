import numpy as np
import pytest

from dgm_eit.config import load_config
from dgm_eit.errors import InputError
from dgm_eit.physics import ForwardModel, PixelGrid, disk_mesh, make_protocol
from dgm_eit.recon import gauss_newton, gn_config, linear_difference
from dgm_eit.recon.gauss_newton import regularised_step, smoothness_matrix

ADJ = make_protocol("adjacent", 16)


def _phantom(grid):
    img = np.where(grid.inside, 1.0, 0.0)
    img[(grid.x - 0.35) ** 2 + (grid.y - 0.25) ** 2 < 0.25**2] = 0.5
    img[(grid.x + 0.3) ** 2 + (grid.y + 0.35) ** 2 < 0.22**2] = 1.5
    return img


@pytest.fixture(scope="module")
def problem():
    """Noiseless data simulated on a finer mesh than the inversion mesh (no inverse crime)."""
    inv, fine = disk_mesh(16, 0.1), disk_mesh(16, 0.075)
    fm, fine_fm = ForwardModel(inv, ADJ), ForwardModel(fine, ADJ)
    grid, fine_grid = PixelGrid(inv, 32), PixelGrid(fine, 32)
    truth = _phantom(grid)
    v = fine_fm.forward(fine_grid.to_elements(truth).astype(np.float64))
    return fm, grid, truth, v


@pytest.mark.parametrize("method,lam", [("lm", 0.5), ("kotre", 0.5), ("tikhonov", 0.5), ("smooth", 2.0)])
def test_gauss_newton_decreases_the_residual_and_beats_one_step(problem, method, lam):
    fm, grid, truth, v = problem
    res = gauss_newton(fm, v, method=method, lam=lam, max_iter=8, grid=grid)
    assert res.n_iter >= 2 and len(res.history) == res.n_iter + 1
    assert all(b < a for a, b in zip(res.history, res.history[1:]))
    assert res.history[-1] < 0.1 * res.history[0]
    assert np.all(res.sigma > 0) and res.image.shape == (32, 32)
    v_ref = fm.forward(np.ones(fm.n_elements))
    one_step = linear_difference(fm, v, v_ref, lam=lam, method=method)
    # error against the truth averaged onto the inversion mesh (area-weighted), so the
    # comparison is not dominated by the mesh's staircase at the anomaly edges
    target, areas = grid.to_elements(truth), fm.mesh.areas
    gn_err = np.sum(areas * (res.sigma - target) ** 2)
    one_err = np.sum(areas * (one_step - target) ** 2)
    assert gn_err < 0.9 * one_err
    # the anomalies are found with the right sign
    assert res.image[truth == 0.5].mean() < 1.0 < res.image[truth == 1.5].mean()


def test_data_space_and_element_space_steps_agree():
    rng = np.random.default_rng(0)
    # wide (M < m: data space) and tall (M > m: element space) problems
    for M, m in ((20, 50), (50, 20)):
        J = rng.normal(size=(M, m)) * rng.uniform(0.1, 2.0, m)
        r = rng.normal(size=M)
        jtj = J.T @ J
        for method in ("lm", "kotre", "tikhonov"):
            d = regularised_step(J, r, method, 0.3, p=0.4)
            R = {"lm": np.diag(np.diag(jtj)), "kotre": np.diag(np.diag(jtj) ** 0.4), "tikhonov": np.eye(m)}[method]
            R = R * (np.diag(jtj).mean() / np.diag(R).mean())
            np.testing.assert_allclose(d, np.linalg.solve(jtj + 0.3 * R, J.T @ r), rtol=1e-8)
        # the smoothness prior (a path-graph Laplacian here) goes through data space too
        Lap = 2 * np.eye(m) - np.eye(m, k=1) - np.eye(m, k=-1)
        Lap[0, 0] = Lap[-1, -1] = 1
        R = Lap / np.diag(Lap).mean() + 1e-3 * np.eye(m)
        R = R * (np.diag(jtj).mean() / np.diag(R).mean())
        d = regularised_step(J, r, "smooth", 0.3, laplacian=Lap)
        np.testing.assert_allclose(d, np.linalg.solve(jtj + 0.3 * R, J.T @ r), rtol=1e-7)


def _reference_gauss_newton(fm, v, method, lam, p=0.5, max_iter=6, tol=1e-4, max_halvings=6, max_step=2.0,
                            min_sigma=1e-4, laplacian=None):
    """Gauss-Newton on log(sigma) as the module doc states it, the plain way: Jx = J diag(sigma),
    the step from the element-space normal equations with a dense solve, a step limit and a
    halving line search."""
    sigma = np.ones(fm.n_elements)
    v_model, J = fm.jacobian(sigma)
    res = np.linalg.norm(v - v_model)
    for _ in range(max_iter):
        Jx = J * sigma
        jtj = Jx.T @ Jx
        dg = np.diag(jtj)
        if method == "smooth":
            R = laplacian.toarray() / laplacian.diagonal().mean() + 1e-3 * np.eye(fm.n_elements)
        else:
            R = np.diag({"lm": dg, "kotre": dg ** p, "tikhonov": np.ones_like(dg)}[method])
        R = R * (dg.mean() / np.diag(R).mean())
        dx = np.linalg.solve(jtj + lam * R, Jx.T @ (v - v_model))
        t = min(1.0, max_step / np.abs(dx).max())
        for _ in range(max_halvings + 1):
            trial = np.maximum(sigma * np.exp(np.clip(t * dx, -30, 30)), min_sigma)
            trial_res = np.linalg.norm(v - fm.forward(trial))
            if trial_res < res:
                break
            t *= 0.5
        else:
            break
        change = (res - trial_res) / res
        sigma, res = trial, trial_res
        if abs(change) < tol:
            break
        v_model, J = fm.jacobian(sigma)
    return sigma


@pytest.mark.parametrize("method,lam", [("kotre", 3.0), ("lm", 0.5), ("tikhonov", 0.5), ("smooth", 2.0)])
def test_gauss_newton_matches_a_straightforward_reference(problem, method, lam):
    from dgm_eit.recon.gauss_newton import clear_start_cache

    fm, _, _, v = problem
    noisy = v + np.random.default_rng(2).normal(size=v.shape) * 1e-2 * np.abs(v).mean()
    ref = _reference_gauss_newton(fm, noisy, method, lam, laplacian=smoothness_matrix(fm.mesh))
    clear_start_cache(fm)
    cold = gauss_newton(fm, noisy, method=method, lam=lam)
    warm = gauss_newton(fm, noisy, method=method, lam=lam)  # the start at sigma0 = 1 is reused
    np.testing.assert_allclose(cold.sigma, ref, rtol=1e-8)
    np.testing.assert_array_equal(warm.sigma, cold.sigma)
    assert cold.n_iter >= 3
    # other data after a cached start: still the reference's answer
    other = noisy[::-1].copy() * 0.5 + v * 0.5
    np.testing.assert_allclose(gauss_newton(fm, other, method=method, lam=lam).sigma,
                               _reference_gauss_newton(fm, other, method, lam, laplacian=smoothness_matrix(fm.mesh)),
                               rtol=1e-8)


def test_scaled_step_equals_the_step_of_the_scaled_jacobian():
    rng = np.random.default_rng(3)
    for M, m in ((20, 50), (50, 20)):
        J = rng.normal(size=(M, m))
        s = rng.uniform(0.2, 3.0, m)
        r = rng.normal(size=M)
        for method in ("lm", "kotre", "tikhonov"):
            expected = regularised_step(J * s, r, method, 0.7)
            J_copy = J.copy()
            np.testing.assert_allclose(regularised_step(J_copy, r, method, 0.7, col_scale=s, overwrite_j=True),
                                       expected, rtol=1e-10)
            np.testing.assert_allclose(regularised_step(J, r, method, 0.7, col_scale=s), expected, rtol=1e-10)
        # batched right-hand sides share one factorisation
        R = rng.normal(size=(M, 3))
        np.testing.assert_allclose(regularised_step(J, R, "kotre", 0.7, col_scale=s)[:, 1],
                                   regularised_step(J * s, R[:, 1], "kotre", 0.7), rtol=1e-10)


def test_smoothness_prior_is_an_element_graph_laplacian():
    mesh = disk_mesh(16, 0.1)
    Lap = smoothness_matrix(mesh)
    np.testing.assert_allclose(Lap @ np.ones(mesh.n_elements), 0.0, atol=1e-12)
    degrees = Lap.diagonal()
    assert degrees.min() >= 1 and degrees.max() <= 3


def test_linear_difference_batches(problem):
    fm, _, _, v = problem
    v_ref = fm.forward(np.ones(fm.n_elements))
    batch = linear_difference(fm, np.stack([v, v_ref]), v_ref, lam=0.1)
    np.testing.assert_allclose(batch[0], linear_difference(fm, v, v_ref, lam=0.1), rtol=1e-10)
    np.testing.assert_allclose(batch[1], 1.0, atol=1e-12)


def test_gn_config_reads_every_profile_and_follows_the_noise_level():
    for profile in ("smoke", "quick", "paper"):
        kwargs = gn_config(load_config(profile))
        assert kwargs["method"] in ("lm", "kotre", "tikhonov", "smooth") and kwargs["lam"] > 0
    cfg = load_config("smoke", ["gn.lam=2", "gn.lam_snr_ref_db=40", "data.snr_db=20"])
    assert gn_config(cfg)["lam"] == pytest.approx(20.0)
    cfg = load_config("smoke", ["gn.lam=2", "gn.lam_snr_ref_db=0", "data.snr_db=20"])
    assert gn_config(cfg)["lam"] == pytest.approx(2.0)
    # an older config without the newer keys gets gauss_newton's defaults
    old = gn_config({"gn": {"method": "lm", "lam": 0.5}})
    assert old["lam"] == 0.5 and old["max_iter"] == 6 and old["line_search"] is True
    with pytest.raises(InputError, match="unknown Gauss-Newton method"):
        gn_config({"gn": {"method": "newton"}})


def test_bad_reconstruction_requests_are_refused(problem):
    fm, _, _, v = problem
    with pytest.raises(InputError, match="unknown Gauss-Newton method 'newton'"):
        gauss_newton(fm, v, method="newton")
    with pytest.raises(InputError, match="208"):
        gauss_newton(fm, v[:-1])
    with pytest.raises(InputError, match="NaN"):
        gauss_newton(fm, np.full(208, np.nan))
    with pytest.raises(InputError, match="sigma0"):
        gauss_newton(fm, v, sigma0=0.0)
    with pytest.raises(InputError, match="lam"):
        gauss_newton(fm, v, lam=-1.0)
    with pytest.raises(InputError, match="v_ref"):
        linear_difference(fm, v, v[:10])


def test_max_step_limits_each_log_conductivity_change(problem):
    fm, _, _, v = problem
    res = gauss_newton(fm, v, method="kotre", lam=0.5, max_iter=3, max_step=0.05, tol=0.0)
    assert res.n_iter == 3
    assert np.max(np.abs(np.log(res.sigma))) <= 3 * 0.05 + 1e-12
    free = gauss_newton(fm, v, method="kotre", lam=0.5, max_iter=3, tol=0.0)
    assert np.max(np.abs(np.log(free.sigma))) > 0.15


def test_proximal_gauss_newton_step_follows_the_data_as_far_as_the_prior_allows():
    from dgm_eit.physics import ForwardModel, PixelGrid, disk_mesh, make_protocol
    from dgm_eit.recon.consistency import ProximalGaussNewton, noise_std_from_snr

    mesh = disk_mesh(16, 0.1)
    fm = ForwardModel(mesh, make_protocol("adjacent", 16))
    grid = PixelGrid(mesh, size=16)
    truth = np.where(grid.inside, 1.0, 0.0) + 0.5 * (np.hypot(grid.x - 0.3, grid.y) < 0.3)
    v = fm.forward(grid.to_elements(truth))[None]
    start = np.where(grid.inside, 1.0, 0.0)[None]
    prox = ProximalGaussNewton(fm, grid)

    def misfit(image):
        return float(np.linalg.norm(v[0] - fm.forward(grid.to_elements(image[0]))))

    noise = noise_std_from_snr(v, 60.0)
    assert noise.shape == (1,) and noise[0] == pytest.approx(np.linalg.norm(v) * 1e-3 / np.sqrt(v.shape[1]))
    wide = prox.step(start, v, noise, prior_std=10.0)
    assert misfit(wide) < 0.2 * misfit(start)
    assert np.all(wide[0][~grid.inside] == 0)
    # a prior far narrower than the noise keeps the image
    narrow = prox.step(start, v, noise, prior_std=1e-9)
    np.testing.assert_allclose(narrow, start, atol=1e-6)
    # a chord step (the first image's Jacobian) still moves towards the data
    chord = prox.step(wide, v, noise, prior_std=10.0, refresh=False)
    assert misfit(chord) < misfit(wide)
    capped = ProximalGaussNewton(fm, grid, max_step=0.01).step(start, v, noise, prior_std=10.0)
    assert np.abs(capped - start).max() == pytest.approx(0.01)
