import math

import pytest
import torch

from dgm_eit.errors import InputError
from dgm_eit.models.sde import VESDE, VPSDE, make_sde


@pytest.fixture
def sde():
    return VESDE(sigma_min=0.01, sigma_max=30.0, n_steps=100)


def test_noise_schedule_runs_geometrically_from_sigma_min_to_sigma_max(sde):
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    sigma = sde.sigma(t)
    assert float(sigma[0]) == pytest.approx(0.01)
    assert float(sigma[-1]) == pytest.approx(30.0)
    ratios = sigma[1:] / sigma[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))
    assert torch.allclose(sde.time_of_sigma(sigma), t)


def test_diffusion_squared_is_the_rate_of_the_marginal_variance(sde):
    x = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    h = 1e-6
    _, std_hi = sde.marginal_prob(x, t + h)
    _, std_lo = sde.marginal_prob(x, t - h)
    rate = (std_hi**2 - std_lo**2) / (2 * h)
    drift, g = sde.sde(x, t)
    assert torch.equal(drift, torch.zeros_like(x))
    assert torch.allclose(g**2, rate, rtol=1e-5)


def test_discrete_chain_adds_the_variance_difference(sde):
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    f, g = sde.discretize(x, 0.6, 0.5)
    assert torch.equal(f, torch.zeros_like(x))
    expected = math.sqrt(float(sde.sigma(0.6)) ** 2 - float(sde.sigma(0.5)) ** 2)
    assert torch.allclose(g, torch.full((2,), expected, dtype=torch.float64))
    # to the noise-free end state the whole variance is removed
    _, g_end = sde.discretize(x, 0.3, None)
    assert torch.allclose(g_end, sde.sigma(torch.tensor(0.3, dtype=torch.float64)).expand(2))


def test_tweedie_denoiser_is_exact_for_gaussian_data(sde):
    # x0 ~ N(0, s^2): the posterior mean of x0 given x_t is x_t s^2 / (s^2 + sigma^2)
    s2 = 0.7**2
    x = torch.randn(5, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.full((5,), 0.4, dtype=torch.float64)
    var = s2 + sde.sigma(t)[:, None, None, None] ** 2
    x0 = sde.denoise(x, -x / var, t)
    assert torch.allclose(x0, x * s2 / var)


def test_prior_samples_are_reproducible_and_scaled(sde):
    a = sde.prior_sampling((4000,), generator=torch.Generator().manual_seed(3))
    b = sde.prior_sampling((4000,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert float(a.std()) == pytest.approx(30.0, rel=0.05)


def test_reverse_sde_subtracts_g_squared_times_score(sde):
    x = torch.ones(2, 1, 2, 2)
    rev = sde.reverse(lambda x, t: -x, probability_flow=False)
    ode = sde.reverse(lambda x, t: -x, probability_flow=True)
    drift, g = rev.sde(x, 0.5)
    drift_ode, g_ode = ode.sde(x, 0.5)
    _, g_fwd = sde.sde(x, 0.5)
    assert torch.allclose(drift, g_fwd[:, None, None, None] ** 2 * x)
    assert torch.allclose(drift_ode, 0.5 * drift)
    assert torch.equal(g_ode, torch.zeros_like(g_ode)) and torch.allclose(g, g_fwd)


def test_bad_parameters_are_refused():
    with pytest.raises(InputError, match="sigma_min < sigma_max"):
        VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(InputError, match="discretisation"):
        VESDE(n_steps=0)
    with pytest.raises(InputError, match="unknown SDE 'vp2'"):
        make_sde({"sde": "vp2", "sigma_min": 0.01, "sigma_max": 1.0, "n_scales": 10})


def test_vp_marginals_match_the_sde_and_the_unified_noise_level():
    vp = VPSDE(beta_min=0.1, beta_max=20.0, n_steps=1000)
    x0 = torch.ones(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    mean, std = vp.marginal_prob(x0, t)
    s = vp.scale(t)
    assert torch.allclose(std, s * vp.sigma(t))
    assert torch.allclose(std**2 + s**2, torch.ones(3, dtype=torch.float64))   # variance preserving
    # d(std^2)/dt = beta (1 - std^2) for dx = -beta x / 2 dt + sqrt(beta) dw
    h = 1e-6
    rate = (vp.marginal_prob(x0, t + h)[1] ** 2 - vp.marginal_prob(x0, t - h)[1] ** 2) / (2 * h)
    _, g = vp.sde(x0, t)
    assert torch.allclose(rate, g**2 * (1 - std**2), rtol=1e-5)
    # one discrete step from t_next to t reproduces the marginal variance growth
    f, G = vp.discretize(x0, 0.5, 0.4)
    keep = (vp.scale(torch.tensor(0.5, dtype=torch.float64)) / vp.scale(torch.tensor(0.4, dtype=torch.float64))) ** 2
    assert torch.allclose(f, (torch.sqrt(keep) - 1) * x0) and torch.allclose(G, torch.sqrt(1 - keep).expand(3))
    assert isinstance(make_sde({"sde": "vp", "sigma_min": 0.01, "sigma_max": 1.0, "n_scales": 10}), VPSDE)
