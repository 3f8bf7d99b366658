"""Forward noising processes of the score model (Song et al. 2021, "Score-based generative
modeling through stochastic differential equations").

An :class:`SDE` describes ``dx = f(x, t) dt + g(t) dw`` on ``t in [0, 1]`` through the few
things the trainer and the samplers need: the perturbation kernel ``p_t(x_t | x_0)``
(:meth:`marginal_prob`), the drift and diffusion (:meth:`sde`), the reverse-time SDE or
probability-flow ODE (:meth:`reverse`), and samples of the prior ``p_1``, plus the
unified view of Karras et al. 2022, ``x_t = s(t) (x_0 + sigma(t) z)`` (:meth:`scale`,
:meth:`sigma`), which lets one network serve both :class:`VESDE` (s = 1; the paper's
choice) and :class:`VPSDE`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dgm_eit.errors import InputError

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _broadcast(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B,1,...,1) so per-sample scalars multiply images."""
    return values.reshape(values.shape + (1,) * (x.dim() - values.dim()))


def _as_time(t, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    return t


class SDE:
    """Base class: subclasses implement the five methods below; ``t`` is (B,) or a scalar."""

    #: end of the reverse process: samplers stop at ``t = eps`` and then denoise once
    eps: float = 1e-5

    def __init__(self, n_steps: int, eps: float):
        if int(n_steps) < 1:
            raise InputError(f"SDE needs at least one discretisation step, got N={n_steps}")
        if not 0 < eps < 1:
            raise InputError(f"{type(self).__name__} end time eps must lie in (0, 1), got {eps}")
        self.N = int(n_steps)
        self.eps = float(eps)

    def sigma(self, t) -> torch.Tensor:
        """Noise-to-signal ratio of ``x_t`` (the network's conditioning): ``x_t / scale(t)``
        is the data plus Gaussian noise of this std (Karras et al. 2022's unified view)."""
        raise NotImplementedError

    def scale(self, t) -> torch.Tensor:
        """Mean coefficient ``s(t)`` of ``x_t = s(t) (x_0 + sigma(t) z)``: 1 for VE."""
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    def sde(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift ``f(x, t)`` (like x) and diffusion ``g(t)`` (B,)."""
        raise NotImplementedError

    def marginal_prob(self, x0: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (like x0) and std (B,) of ``p_t(x_t | x_0)``."""
        raise NotImplementedError

    def prior_sampling(self, shape, generator: torch.Generator | None = None,
                       device=None, dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, score: torch.Tensor, t) -> torch.Tensor:
        """Tweedie's estimate ``E[x_0 | x_t]`` from the score at ``x_t``."""
        raise NotImplementedError

    def discretize(self, x: torch.Tensor, t, t_next) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward transition from ``t_next`` up to ``t`` as ``x + f + G z``: (f, G (B,)).

        ``t_next=None`` means the noise-free end state. The default is Euler-Maruyama;
        an SDE with an exact discrete chain (VE: ancestral sampling) overrides it.
        """
        t = _as_time(t, x)
        dt = t - (_as_time(t_next, x) if t_next is not None else torch.zeros_like(t))
        drift, diffusion = self.sde(x, t)
        return drift * _broadcast(dt, x), diffusion * torch.sqrt(dt)

    def langevin_alpha(self, t, x: torch.Tensor) -> torch.Tensor:
        """Step-size factor of the Langevin corrector (1 for VE, 1 - beta_t for VP)."""
        return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """``dx = [f - g^2 score] dt + g dw`` (``probability_flow``: ``[f - g^2 score / 2] dt``)."""

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool):
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = probability_flow

    def sde(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        t = _as_time(t, x)
        drift, diffusion = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        drift = drift - _broadcast(diffusion**2, x) * score * weight
        diffusion = torch.zeros_like(diffusion) if self.probability_flow else diffusion
        return drift, diffusion


class VESDE(SDE):
    """Variance exploding SDE: ``x_t = x_0 + sigma(t) z``, ``sigma(t) = s_min (s_max/s_min)^t``.

    ``sigma_max`` should be about the largest distance between two training images
    (Song & Ermon 2020, technique 1), so that ``p_1`` covers the data; see the ``[score]``
    section of the profiles for the values chosen per image size.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, n_steps: int = 1000,
                 eps: float = 1e-5):
        super().__init__(n_steps, eps)
        if not 0 < sigma_min < sigma_max:
            raise InputError(f"VE SDE needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def time_of_sigma(self, sigma) -> torch.Tensor:
        """Inverse of :meth:`sigma` (used to place a sampler's start by noise level)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.log(sigma / self.sigma_min) / self._log_ratio

    def sde(self, x, t):
        t = _as_time(t, x)
        diffusion = self.sigma(t) * math.sqrt(2 * self._log_ratio)
        return torch.zeros_like(x), diffusion

    def marginal_prob(self, x0, t):
        return x0, self.sigma(_as_time(t, x0))

    def prior_sampling(self, shape, generator=None, device=None, dtype=torch.float32):
        where = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device) * self.sigma_max

    def denoise(self, x, score, t):
        return x + _broadcast(self.sigma(_as_time(t, x)) ** 2, x) * score

    def discretize(self, x, t, t_next):
        # SMLD's ancestral chain: the noise variance added between two levels is the
        # difference of their variances; the end state has none.
        t = _as_time(t, x)
        sigma = self.sigma(t)
        sigma_next = self.sigma(_as_time(t_next, x)) if t_next is not None else torch.zeros_like(sigma)
        return torch.zeros_like(x), torch.sqrt((sigma**2 - sigma_next**2).clamp_min(0))

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, N={self.N}, eps={self.eps})"


class VPSDE(SDE):
    """Variance preserving SDE (DDPM's continuous limit): ``dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw``,
    ``beta(t) = beta_min + t (beta_max - beta_min)``; the prior is N(0, I)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, n_steps: int = 1000,
                 eps: float = 1e-3):
        super().__init__(n_steps, eps)
        if not 0 < beta_min < beta_max:
            raise InputError(f"VP SDE needs 0 < beta_min < beta_max, got {beta_min} and {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _log_scale(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def scale(self, t) -> torch.Tensor:
        return torch.exp(self._log_scale(t))

    def sigma(self, t) -> torch.Tensor:
        # std / scale = sqrt(1 - s^2) / s, computed stably for small t
        return torch.sqrt(torch.expm1(-2 * self._log_scale(t)))

    def beta(self, t) -> torch.Tensor:
        return self.beta_min + torch.as_tensor(t) * (self.beta_max - self.beta_min)

    def sde(self, x, t):
        t = _as_time(t, x)
        beta = self.beta(t)
        return -0.5 * _broadcast(beta, x) * x, torch.sqrt(beta)

    def marginal_prob(self, x0, t):
        t = _as_time(t, x0)
        s = self.scale(t)
        return _broadcast(s, x0) * x0, s * self.sigma(t)

    def prior_sampling(self, shape, generator=None, device=None, dtype=torch.float32):
        where = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)

    def denoise(self, x, score, t):
        t = _as_time(t, x)
        s = self.scale(t)
        std = s * self.sigma(t)
        return (x + _broadcast(std**2, x) * score) / _broadcast(s, x)

    def discretize(self, x, t, t_next):
        # DDPM's chain between the two levels: x_t = sqrt(1 - b) x_next + sqrt(b) z with
        # 1 - b = (s(t) / s(t_next))^2; the end state t_next = 0 has s = 1
        t = _as_time(t, x)
        log_next = self._log_scale(_as_time(t_next, x)) if t_next is not None else torch.zeros_like(t)
        keep = torch.exp(2 * (self._log_scale(t) - log_next))
        return _broadcast(torch.sqrt(keep) - 1, x) * x, torch.sqrt((1 - keep).clamp_min(0))

    def langevin_alpha(self, t, x):
        return (1 - self.beta(_as_time(t, x)) / self.N).to(x.dtype)

    def __repr__(self) -> str:
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, N={self.N}, eps={self.eps})"


SDES = {"ve": VESDE, "vp": VPSDE}


def make_sde(cfg: dict) -> SDE:
    """The SDE of a ``[score]`` config section: ``sde`` (ve | vp), ``n_scales``, ``eps`` and
    ``sigma_min``/``sigma_max`` (ve) or ``beta_min``/``beta_max`` (vp)."""
    name = cfg.get("sde", "ve")
    if name not in SDES:
        raise InputError(f"unknown SDE {name!r}; choose one of {', '.join(SDES)}")
    if name == "vp":
        return VPSDE(beta_min=cfg.get("beta_min", 0.1), beta_max=cfg.get("beta_max", 20.0),
                     n_steps=cfg["n_scales"], eps=cfg.get("eps", 1e-3))
    return VESDE(sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"],
                 n_steps=cfg["n_scales"], eps=cfg.get("eps", 1e-5))
