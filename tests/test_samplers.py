"""Samplers against the exact score of Gaussian data, so correctness is checkable without a network."""

import pytest
import torch

from dgm_eit.errors import InputError
from dgm_eit.models.samplers import (CORRECTORS, PREDICTORS, SAMPLERS, get_sampler, karras_grid,
                                     measurement_guidance, time_grid)
from dgm_eit.models.sde import VESDE, VPSDE

MU, S = 0.5, 0.3          # data: every pixel ~ N(MU, S^2), independent
SHAPE = (3, 1, 4, 4)


@pytest.fixture(params=["ve", "vp"])
def sde(request):
    if request.param == "ve":
        return VESDE(sigma_min=0.01, sigma_max=20.0, n_steps=1000)
    return VPSDE(beta_min=0.1, beta_max=20.0, n_steps=1000)


def gaussian_score(sde):
    # x_t = s (x0 + sigma z) with x0 ~ N(MU, S^2): x_t ~ N(s MU, s^2 (S^2 + sigma^2))
    def score(x, t):
        s = sde.scale(t).to(x.dtype).reshape(-1, 1, 1, 1)
        var = s**2 * (S**2 + sde.sigma(t).to(x.dtype).reshape(-1, 1, 1, 1) ** 2)
        return -(x - s * MU) / var
    return score


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_registries_hold_the_named_parts():
    assert {"reverse_diffusion", "euler_maruyama", "none"} <= set(PREDICTORS)
    assert {"langevin", "none"} <= set(CORRECTORS)
    assert {"pc", "ode", "csd", "dps"} <= set(SAMPLERS)


@pytest.mark.parametrize("name,opts", [("pc", {"n_steps": 300, "snr": 0.16}),
                                       ("pc", {"n_steps": 300, "predictor": "euler_maruyama", "corrector_steps": 0}),
                                       ("ode", {"n_steps": 25})])
def test_prior_samplers_reach_the_data_distribution(sde, name, opts):
    sampler = get_sampler(name, sde, **opts)
    # 16x16 images: the Langevin step uses per-image norms, which are erratic in tiny dimensions
    x, nfe = sampler(gaussian_score(sde), (50, 1, 16, 16), generator=gen(0))
    assert float(x.mean()) == pytest.approx(MU, abs=0.03)
    assert float(x.std()) == pytest.approx(S, rel=0.1)
    expected = {"pc": opts["n_steps"] * (1 + opts.get("corrector_steps", 1)), "ode": 2 * opts["n_steps"] - 1}
    assert nfe == expected[name]


@pytest.mark.parametrize("name", ["pc", "ode", "csd"])
def test_samplers_keep_shapes_and_repeat_with_a_seed(sde, name):
    sampler = get_sampler(name, sde, n_steps=8, t0=0.5)
    init = torch.full(SHAPE, 0.2)
    a, nfe = sampler(gaussian_score(sde), SHAPE, generator=gen(1), init=init)
    b, _ = sampler(gaussian_score(sde), SHAPE, generator=gen(1), init=init)
    c, _ = sampler(gaussian_score(sde), SHAPE, generator=gen(2), init=init)
    assert a.shape == SHAPE and torch.isfinite(a).all()
    assert torch.equal(a, b)
    if name != "ode":   # the ODE from the same start would agree; its start here is noise
        assert not torch.equal(a, c)
    assert nfe > 0


def test_csd_at_t0_zero_returns_the_initial_image(sde):
    init = torch.randn(SHAPE, generator=gen(3))
    for mode in ("replace", "ccdf"):
        x, nfe = get_sampler("csd", sde, t0=0.0, n_steps=10, mode=mode)(
            gaussian_score(sde), SHAPE, generator=gen(0), init=init)
        assert torch.equal(x, init) and nfe == 0


def test_csd_approaches_the_initial_image_as_t0_goes_to_zero(sde):
    init = torch.randn(SHAPE, generator=gen(3))
    gaps = []
    for t0 in (0.5, 0.2, 0.05, 1e-5):
        x, _ = get_sampler("csd", sde, t0=t0, n_steps=20)(gaussian_score(sde), SHAPE, generator=gen(0), init=init)
        gaps.append(float((x - init).abs().max()))
    assert gaps == sorted(gaps, reverse=True)
    # without Langevin moves (whose size is set by snr, not by t) the last step only removes
    # noise of order sigma(t0)
    x, _ = get_sampler("csd", sde, t0=1e-5, n_steps=20, corrector_steps=0)(
        gaussian_score(sde), SHAPE, generator=gen(0), init=init)
    assert float((x - init).abs().max()) < float(sde.sigma(torch.tensor(1e-5, dtype=torch.float64)))


def test_csd_pulls_the_start_toward_the_prior_and_ccdf_forgets_it_from_high_t0(sde):
    init = torch.full((500, 1, 2, 2), 2.0)   # far out in the prior's tail
    x, _ = get_sampler("csd", sde, t0=0.5, n_steps=50)(gaussian_score(sde), init.shape, generator=gen(0), init=init)
    assert MU < float(x.mean()) < 2.0
    x, _ = get_sampler("csd", sde, t0=1.0, n_steps=200, mode="ccdf", snr=0.16)(
        gaussian_score(sde), init.shape, generator=gen(0), init=init)
    assert float(x.mean()) == pytest.approx(MU, abs=0.05)


def test_csd_nfe_counts_predictor_and_corrector_steps(sde):
    init = torch.zeros(SHAPE)
    for steps, corr, solver, expected in ((45, 1, "pc", 90), (45, 0, "pc", 45), (10, 1, "ode", 19)):
        _, nfe = get_sampler("csd", sde, t0=0.45, n_steps=steps, corrector_steps=corr, solver=solver)(
            gaussian_score(sde), SHAPE, generator=gen(0), init=init)
        assert nfe == expected


def test_time_grids_run_from_the_start_to_eps(sde):
    grid = time_grid(sde, 0.45, 450)
    assert len(grid) == 450 and grid[0] == pytest.approx(0.45) and grid[-1] == pytest.approx(sde.eps)
    grid = karras_grid(sde, 0.8, 12)
    assert len(grid) == 12 and grid[0] == pytest.approx(0.8) and grid[-1] == pytest.approx(sde.eps)
    assert all(a > b for a, b in zip(grid, grid[1:]))


def _linear_problem(batch: int, n_meas: int):
    """Images (batch,1,4,4), their measurements through a random linear operator, and the misfit."""
    A = torch.randn(16, n_meas, generator=gen(5))
    truth = MU + S * torch.randn(batch, 1, 4, 4, generator=gen(6))
    v = truth.reshape(batch, -1) @ A

    def misfit(x0):
        return torch.linalg.vector_norm(v - x0.reshape(x0.shape[0], -1) @ A, dim=-1)

    return truth, misfit


def test_guided_step_lowers_the_misfit_of_a_linear_operator(sde):
    truth, misfit = _linear_problem(2, 10)
    score = gaussian_score(sde)
    guidance = measurement_guidance(sde, score, misfit, zeta=0.02)
    x = truth + 0.3 * torch.randn(truth.shape, generator=gen(7))
    t = torch.full((2,), 0.3)
    _, grad, nfe = guidance(x, 0.3)
    before = misfit(sde.denoise(x, score(x, t), t))
    x_new = x - grad
    after = misfit(sde.denoise(x_new, score(x_new, t), t))
    assert nfe == 1 and (after < before).all()


def test_dps_sampler_fits_the_measurements_better_than_the_prior(sde):
    truth, misfit = _linear_problem(4, 6)
    kwargs = dict(n_steps=100, corrector_steps=0)
    free, _ = get_sampler("pc", sde, **kwargs)(gaussian_score(sde), truth.shape, generator=gen(0))
    guided, nfe = get_sampler("dps", sde, zeta=0.05, **kwargs)(gaussian_score(sde), truth.shape,
                                                                generator=gen(0), likelihood=misfit)
    assert nfe == 100
    assert float(misfit(guided).mean()) < 0.5 * float(misfit(free).mean())


def test_bad_options_are_refused(sde):
    with pytest.raises(InputError, match="unknown sampler 'magic'"):
        get_sampler("magic", sde)
    with pytest.raises(InputError, match="unknown predictor"):
        get_sampler("pc", sde, predictor="nope")
    with pytest.raises(InputError, match="t0 must lie in"):
        get_sampler("csd", sde, t0=1.5)
    with pytest.raises(InputError, match="insertion mode"):
        get_sampler("csd", sde, mode="paste")
    with pytest.raises(InputError, match="needs an initial image"):
        get_sampler("csd", sde)(gaussian_score(sde), SHAPE)
    with pytest.raises(InputError, match="misfit"):
        get_sampler("dps", sde)(gaussian_score(sde), SHAPE)
    with pytest.raises(InputError, match="n_steps"):
        get_sampler("pc", sde, n_steps=0)(gaussian_score(sde), SHAPE)


def test_dds_fits_the_measurements_and_repeats_with_a_seed(sde):
    A = torch.randn(16, 6, generator=gen(5))
    truth = MU + S * torch.randn(4, 1, 4, 4, generator=gen(6))
    v = truth.reshape(4, -1) @ A
    calls = []

    def consistency(x0, t):
        # exact projection onto {x : x A = v} (a proximal step with a vanishing prior weight)
        calls.append(t)
        flat = x0.reshape(4, -1)
        r = v - flat @ A
        return (flat + torch.linalg.solve(A.T @ A, r.T).T @ A.T).reshape(x0.shape)

    def misfit(x):
        return float(torch.linalg.vector_norm(v - x.reshape(4, -1) @ A, dim=-1).mean())

    init = torch.full(truth.shape, MU)
    sampler = get_sampler("dds", sde, t0=0.5, n_steps=12)
    a, nfe = sampler(gaussian_score(sde), truth.shape, generator=gen(1), init=init, consistency=consistency)
    b, _ = sampler(gaussian_score(sde), truth.shape, generator=gen(1), init=init, consistency=consistency)
    c, _ = sampler(gaussian_score(sde), truth.shape, generator=gen(2), init=init, consistency=consistency)
    free, _ = get_sampler("csd", sde, t0=0.5, n_steps=12)(gaussian_score(sde), truth.shape, generator=gen(1),
                                                           init=init)
    assert nfe == 12 and len(calls) == 3 * 12 and calls[0] == pytest.approx(0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert misfit(a) < 1e-3 * misfit(free)
    with pytest.raises(InputError, match="needs the measurements"):
        sampler(gaussian_score(sde), truth.shape, init=init)
    with pytest.raises(InputError, match="eta must lie"):
        get_sampler("dds", sde, eta=1.5)
