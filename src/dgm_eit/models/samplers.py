"""Reverse-process samplers of the score prior, chosen by name.

Predictors and correctors sit in registries as in score_sde_pytorch; sampler factories
combine them. Every sampler is called as

    x, nfe = sampler(score_fn, shape, generator=g, init=None, likelihood=None)

with ``score_fn(x, t)`` the score of normalised images ``x`` (B,1,H,W) at times ``t`` (B,),
``init`` a starting image (normalised, like ``x``) for the samplers that start from one
(``csd``; ``dps`` when ``t0 < 1``) and ``likelihood(x0) -> (B,)`` the data misfit
``||v - F(x0)||`` that ``dps`` descends. ``nfe`` counts forward evaluations of the network per
image (``dps`` also back-propagates through each one). All randomness comes from
``generator``, so a seed fixes the result.

Time grids follow the reference code: ``n_steps`` points from the start time down to
``sde.eps``, one predictor step per point (plus the corrector steps), the last one going to
the noise-free state (score_sde's ``noise_removal``). The reference CSD* (insertion at step
550 of 1000) is ``csd`` with ``t0=0.45, n_steps=450, corrector_steps=1``: 900 NFE.
"""

from __future__ import annotations

from typing import Callable

import torch

from dgm_eit.errors import InputError
from dgm_eit.models.sde import SDE, VESDE, _broadcast

PREDICTORS: dict[str, type] = {}
CORRECTORS: dict[str, type] = {}
SAMPLERS: dict[str, Callable] = {}


def register(registry: dict, name: str):
    def wrap(obj):
        registry[name] = obj
        return obj
    return wrap


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    # draw on the generator's device so a CPU generator also seeds a CUDA run
    where = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=where).to(x.device)


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=-1)


# ------------------------------------------------------------------ predictors
class Predictor:
    """One step of the reverse process from ``t`` to ``t_next`` (``None``: the noise-free end)."""

    def __init__(self, sde: SDE, score_fn):
        self.sde = sde
        self.score_fn = score_fn

    def step(self, x, t, t_next, generator, score=None):
        """Return ``(x, x_mean, nfe)``; ``score`` at ``(x, t)`` may be passed in to save an evaluation."""
        raise NotImplementedError

    def _score(self, x, t, score):
        """``(score, nfe)``: the given score, or one network evaluation."""
        return (score, 0) if score is not None else (self.score_fn(x, t), 1)


@register(PREDICTORS, "reverse_diffusion")
class ReverseDiffusionPredictor(Predictor):
    """Reverse the discretised forward chain: ``x <- x - f + G^2 s + G z`` (ancestral for VE)."""

    def step(self, x, t, t_next, generator, score=None):
        score, nfe = self._score(x, t, score)
        f, g = self.sde.discretize(x, t, t_next)
        g = _broadcast(g, x)
        x_mean = x - f + g**2 * score
        if t_next is None:
            return x_mean, x_mean, nfe
        return x_mean + g * _noise(x, generator), x_mean, nfe


@register(PREDICTORS, "euler_maruyama")
class EulerMaruyamaPredictor(Predictor):
    def step(self, x, t, t_next, generator, score=None):
        score, nfe = self._score(x, t, score)
        tt = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        dt = (0.0 if t_next is None else float(t_next)) - float(t)
        drift, diffusion = self.sde.sde(x, tt)
        drift = drift - _broadcast(diffusion**2, x) * score
        x_mean = x + drift * dt
        if t_next is None:
            return x_mean, x_mean, nfe
        return x_mean + _broadcast(diffusion, x) * (-dt) ** 0.5 * _noise(x, generator), x_mean, nfe


@register(PREDICTORS, "none")
class NonePredictor(Predictor):
    def step(self, x, t, t_next, generator, score=None):
        return x, x, 0


# ------------------------------------------------------------------ correctors
class Corrector:
    def __init__(self, sde: SDE, score_fn, snr: float, n_steps: int):
        self.sde, self.score_fn, self.snr, self.n_steps = sde, score_fn, float(snr), int(n_steps)

    def step(self, x, t, generator):
        """Return ``(x, x_mean, nfe)``."""
        raise NotImplementedError


@register(CORRECTORS, "langevin")
class LangevinCorrector(Corrector):
    """Annealed Langevin MCMC at fixed ``t``, step size set by the signal-to-noise ratio ``snr``.

    The step size uses each image's own gradient norm (score_sde averages it over the batch),
    so an image's result does not depend on the other images of its batch.
    """

    def step(self, x, t, generator):
        x_mean = x
        tt = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        alpha = _broadcast(self.sde.langevin_alpha(tt, x), x)
        for _ in range(self.n_steps):
            grad = self.score_fn(x, tt)
            z = _noise(x, generator)
            ratio = self.snr * _per_sample_norm(z) / _per_sample_norm(grad).clamp_min(1e-12)
            step = _broadcast(2 * ratio**2, x) * alpha
            x_mean = x + step * grad
            x = x_mean + torch.sqrt(2 * step) * z
        return x, x_mean, self.n_steps


@register(CORRECTORS, "none")
class NoneCorrector(Corrector):
    def step(self, x, t, generator):
        return x, x, 0


# ------------------------------------------------------------------ time grids
def time_grid(sde: SDE, t_start: float, n_steps: int) -> list[float]:
    """``n_steps`` times from ``t_start`` down to ``sde.eps``, evenly spaced (the reference grid)."""
    if n_steps < 1:
        raise InputError(f"a sampler needs n_steps >= 1, got {n_steps}")
    if t_start <= sde.eps or n_steps == 1:
        return [float(t_start)]
    return torch.linspace(float(t_start), sde.eps, int(n_steps), dtype=torch.float64).tolist()


def _check_t0(t0: float) -> float:
    t0 = float(t0)
    if not 0.0 <= t0 <= 1.0:
        raise InputError(f"insertion time t0 must lie in [0, 1], got {t0}")
    return t0


def _check_count(name: str, value, minimum: int = 0) -> int:
    if int(value) != value or int(value) < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _start(sde: SDE, t0: float, init, mode: str, shape, generator, device, dtype):
    """State at ``t0``: prior noise at t0 = 1 without ``init``, else ``init`` as is or diffused."""
    if init is None:
        if t0 < 1.0:
            raise InputError(f"starting below t=1 (t0={t0}) needs an initial image")
        return sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
    if tuple(init.shape) != tuple(shape):
        raise InputError(f"initial image has shape {tuple(init.shape)}, expected {tuple(shape)}")
    mean, std = sde.marginal_prob(init, torch.full((shape[0],), t0, dtype=init.dtype, device=init.device))
    if mode == "replace":
        return mean.clone()   # the image itself for VE; scaled by s(t0) for VP
    if mode == "ccdf":
        return mean + _broadcast(std, init) * _noise(init, generator)
    raise InputError(f"unknown insertion mode {mode!r}; choose replace or ccdf")


# ------------------------------------------------------------------ solvers
def _run_pc(sde, score_fn, x, times, generator, predictor, corrector, snr, corrector_steps,
            guidance=None):
    """Predictor-corrector loop over ``times``; returns the last mean (no noise) and the NFE.

    ``guidance(x, t) -> (score, step, nfe)`` (DPS) supplies the predictor's score and a step
    subtracted after the predictor update."""
    pred = PREDICTORS[predictor](sde, score_fn)
    corr = CORRECTORS[corrector](sde, score_fn, snr, corrector_steps)
    nfe = 0
    for i, t in enumerate(times):
        t_next = times[i + 1] if i + 1 < len(times) else None
        x, _, n = corr.step(x, t, generator)
        nfe += n
        if guidance is None:
            x, x_mean, n = pred.step(x, t, t_next, generator)
            nfe += n
        else:
            score, grad, n = guidance(x, t)
            x, x_mean, _ = pred.step(x, t, t_next, generator, score=score)
            nfe += n
            x = x - grad
            x_mean = x_mean - grad
    return x_mean, nfe


def _run_heun(sde, score_fn, x, times):
    """Probability-flow ODE with Heun's method over ``times``, then one Tweedie denoise.

    For VE the grid is Karras et al.'s (rho = 7) in sigma; NFE = 2 (n - 1) + 1.
    """
    nfe = 0
    reverse = sde.reverse(score_fn, probability_flow=True)

    def velocity(x, t):
        drift, _ = reverse.sde(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
        return drift

    for t, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t
        d = velocity(x, t)
        x_euler = x + dt * d
        d_next = velocity(x_euler, t_next)
        x = x + dt * 0.5 * (d + d_next)
        nfe += 2
    t_last = torch.full((x.shape[0],), times[-1], dtype=x.dtype, device=x.device)
    x = sde.denoise(x, score_fn(x, t_last), t_last)
    return x, nfe + 1


def karras_grid(sde: SDE, t_start: float, n_steps: int, rho: float = 7.0) -> list[float]:
    """Times whose noise levels follow EDM's schedule (dense near sigma_min) for a VE SDE;
    the evenly spaced grid otherwise."""
    if not isinstance(sde, VESDE) or n_steps < 2 or t_start <= sde.eps:
        return time_grid(sde, t_start, n_steps)
    s_hi = float(sde.sigma(torch.tensor(float(t_start), dtype=torch.float64)))
    s_lo = float(sde.sigma(torch.tensor(sde.eps, dtype=torch.float64)))
    ramp = torch.linspace(0, 1, n_steps, dtype=torch.float64)
    sig = (s_hi ** (1 / rho) + ramp * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
    times = sde.time_of_sigma(sig).tolist()
    times[0], times[-1] = float(t_start), sde.eps
    return times


# ------------------------------------------------------------------ sampler factories
def _check_names(predictor, corrector):
    if predictor not in PREDICTORS:
        raise InputError(f"unknown predictor {predictor!r}; choose one of {', '.join(PREDICTORS)}")
    if corrector not in CORRECTORS:
        raise InputError(f"unknown corrector {corrector!r}; choose one of {', '.join(CORRECTORS)}")


def _solver(sde, solver, n_steps, predictor, corrector, snr, corrector_steps):
    """Run ``solver`` ("pc" or "ode") from ``(x, t_start)``; returns ``run(score_fn, x, t_start, generator)``."""
    n_steps = _check_count("n_steps", n_steps, minimum=1)
    corrector_steps = _check_count("corrector_steps", corrector_steps)
    if corrector_steps == 0:
        corrector = "none"
    _check_names(predictor, corrector)
    if solver == "pc":
        def run(score_fn, x, t_start, generator):
            return _run_pc(sde, score_fn, x, time_grid(sde, t_start, n_steps), generator,
                           predictor, corrector, snr, corrector_steps)
    elif solver == "ode":
        def run(score_fn, x, t_start, generator):
            return _run_heun(sde, score_fn, x, karras_grid(sde, t_start, n_steps))
    else:
        raise InputError(f"unknown solver {solver!r}; choose pc or ode")
    return run


@register(SAMPLERS, "pc")
def pc_sampler(sde: SDE, n_steps: int = 1000, predictor: str = "reverse_diffusion",
               corrector: str = "langevin", snr: float = 0.16, corrector_steps: int = 1, **_):
    """Unconditional predictor-corrector sampling from the prior at t = 1."""
    return _from_prior(sde, _solver(sde, "pc", n_steps, predictor, corrector, snr, corrector_steps))


def _from_prior(sde: SDE, run):
    """A sampler that draws x_1 from the prior and hands it to ``run`` (a ``_solver``)."""

    @torch.no_grad()
    def sample(score_fn, shape, *, generator=None, init=None, likelihood=None, consistency=None, device=None,
               dtype=torch.float32):
        x = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
        return run(score_fn, x, 1.0, generator)

    return sample


@register(SAMPLERS, "ode")
def ode_sampler(sde: SDE, n_steps: int = 18, **_):
    """Few-step deterministic sampling: probability-flow ODE, Heun, EDM time steps."""
    return _from_prior(sde, _solver(sde, "ode", n_steps, "none", "none", 0.0, 0))


@register(SAMPLERS, "csd")
def csd_sampler(sde: SDE, t0: float = 0.45, n_steps: int = 450, mode: str = "replace",
                solver: str = "pc", predictor: str = "reverse_diffusion", corrector: str = "langevin",
                snr: float = 0.056, corrector_steps: int = 1, **_):
    """CSD*: the initial image (Gauss-Newton) becomes the state at ``t0`` (``mode="replace"``,
    the reference code) or is diffused to it first (``mode="ccdf"``); the reverse process
    then runs ``n_steps`` to the end with ``solver`` (pc | ode). ``t0 = 0`` returns the image."""
    t0 = _check_t0(t0)
    if mode not in ("replace", "ccdf"):
        raise InputError(f"unknown insertion mode {mode!r}; choose replace or ccdf")
    run = _solver(sde, solver, n_steps, predictor, corrector, snr, corrector_steps)

    @torch.no_grad()
    def sample(score_fn, shape, *, generator=None, init=None, likelihood=None, consistency=None, device=None,
               dtype=torch.float32):
        if init is None:
            raise InputError("the csd sampler needs an initial image (the Gauss-Newton image)")
        if t0 == 0.0:
            # t = 0 is the data itself: nothing to diffuse, nothing to reverse
            return init.clone(), 0
        x = _start(sde, t0, init, mode, shape, generator, init.device, init.dtype)
        return run(score_fn, x, t0, generator)

    return sample


@register(SAMPLERS, "dps")
def dps_sampler(sde: SDE, zeta: float = 1.0, t0: float = 1.0, n_steps: int = 1000,
                mode: str = "replace", predictor: str = "reverse_diffusion",
                corrector: str = "langevin", snr: float = 0.056, corrector_steps: int = 0, **_):
    """Diffusion posterior sampling (Chung et al. 2023): each reverse step adds
    ``-zeta * grad_x ||v - F(x0_hat(x_t))||`` with Tweedie's ``x0_hat``; from the prior at
    ``t0 = 1`` or from the initial image at ``t0 < 1`` (inserted as in ``csd``)."""
    t0 = _check_t0(t0)
    zeta = float(zeta)
    if zeta < 0:
        raise InputError(f"guidance weight zeta must be >= 0, got {zeta}")
    n_steps = _check_count("n_steps", n_steps, minimum=1)
    corrector_steps = _check_count("corrector_steps", corrector_steps)
    if corrector_steps == 0:
        corrector = "none"
    _check_names(predictor, corrector)

    def sample(score_fn, shape, *, generator=None, init=None, likelihood=None, consistency=None, device=None,
               dtype=torch.float32):
        if likelihood is None:
            raise InputError("the dps sampler needs the measurement misfit (voltages and EIT operator)")
        if init is not None:
            device, dtype = init.device, init.dtype
        if t0 == 0.0:
            if init is None:
                raise InputError("dps from t0 = 0 needs an initial image")
            return init.clone(), 0
        with torch.no_grad():
            x = _start(sde, t0, init if t0 < 1.0 else None, mode, shape, generator, device, dtype)
        guidance = measurement_guidance(sde, score_fn, likelihood, zeta)
        with torch.no_grad():
            return _run_pc(sde, score_fn, x, time_grid(sde, t0, n_steps), generator, predictor,
                           corrector, snr, corrector_steps, guidance=guidance)

    return sample


@register(SAMPLERS, "dds")
def dds_sampler(sde: SDE, t0: float = 0.4, n_steps: int = 25, mode: str = "replace", eta: float = 1.0, **_):
    """CSD* with data consistency (decomposed diffusion sampling, Chung et al. 2024): from the
    initial image at ``t0`` (inserted as in ``csd``), every step denoises the state (Tweedie),
    moves the denoised image towards the measurements (``consistency(x0, t)``, e.g. proximal
    Gauss-Newton steps), and re-noises it to the next time, DDIM-style: the network's own noise
    estimate mixed with fresh noise, ``eta`` = 1 all fresh. The last step returns the corrected
    denoised image. NFE = ``n_steps``."""
    t0 = _check_t0(t0)
    n_steps = _check_count("n_steps", n_steps, minimum=1)
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise InputError(f"eta must lie in [0, 1], got {eta}")
    if mode not in ("replace", "ccdf"):
        raise InputError(f"unknown insertion mode {mode!r}; choose replace or ccdf")

    @torch.no_grad()
    def sample(score_fn, shape, *, generator=None, init=None, likelihood=None, consistency=None, device=None,
               dtype=torch.float32):
        if init is None:
            raise InputError("the dds sampler needs an initial image (the Gauss-Newton image)")
        if consistency is None:
            raise InputError("the dds sampler needs the measurements (voltages and EIT operator)")
        if t0 == 0.0:
            return consistency(init.clone(), sde.eps), 0
        x = _start(sde, t0, init, mode, shape, generator, init.device, init.dtype)
        times = time_grid(sde, t0, n_steps)
        for i, t in enumerate(times):
            tt = torch.full((shape[0],), float(t), dtype=x.dtype, device=x.device)
            x0 = sde.denoise(x, score_fn(x, tt), tt)
            corrected = consistency(x0, t)
            if i + 1 == len(times):
                return corrected, len(times)
            nt = torch.full_like(tt, times[i + 1])
            s, sigma, s_next, sigma_next = (_broadcast(f.to(x.dtype), x) for f in (
                sde.scale(tt), sde.sigma(tt), sde.scale(nt), sde.sigma(nt)))
            z_hat = (x / s - x0) / sigma
            z = (1 - eta**2) ** 0.5 * z_hat + eta * _noise(x, generator)
            x = s_next * (corrected + sigma_next * z)
        raise AssertionError("unreachable")

    return sample


def measurement_guidance(sde: SDE, score_fn, likelihood, zeta: float):
    """``guidance(x, t) -> (score, zeta * grad_x misfit(x0_hat(x)), nfe)`` for the DPS step."""

    def guidance(x, t):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            tt = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
            score = score_fn(xg, tt)
            misfit = likelihood(sde.denoise(xg, score, tt))
            (grad,) = torch.autograd.grad(misfit.sum(), xg)
        return score.detach(), zeta * grad, 1

    return guidance


def get_sampler(name: str, sde: SDE, **options):
    """The sampler registered as ``name`` (pc | ode | csd | dps), configured by ``options``."""
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name](sde, **options)
