"""Reconstruction with the score prior: CSD*, CSD* with data consistency, guided CSD.

After deepinv's ``PosteriorDiffusion(data_fidelity, denoiser, sde, solver)``, a
:class:`PosteriorSampler` is put together from three parts:

* the score prior (:class:`~dgm_eit.models.score.ScoreModel`: network, SDE, normalisation);
* the EIT operator of the run's ``[mesh]`` (:func:`dgm_eit.physics.operator_from_config`),
  needed only by the samplers that read the voltages (``dps``, ``dds``);
* :class:`SamplingSettings`, resolved once from their sources into one typed record.

The samplers themselves (reverse-time solvers) live in :mod:`dgm_eit.models.samplers`:

* ``csd`` (CSD*, the paper's method): the Gauss-Newton image replaces the reverse process's
  state at time ``t0`` (``mode="replace"``, the reference code) or is forward-diffused to it
  (``mode="ccdf"``, Chung et al. 2022), then the reverse process runs to the end;
* ``dds`` (CSD* with data consistency): the same start, and every reverse step denoises the
  state, takes a proximal Gauss-Newton step on the measured voltages
  (:mod:`dgm_eit.recon.consistency`) and re-noises the result (Chung et al. 2024);
* ``dps``: every reverse step also descends ``||v - F(x0_hat(x_t))||`` through the
  differentiable EIT operator (Chung et al. 2023; the paper's general CSD, eq. 25);
* ``pc`` / ``ode``: unconditional samples of the prior (a check of the prior, not a
  reconstruction).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from typing import Mapping

import torch
from torch import nn

from dgm_eit.errors import InputError
from dgm_eit.models import samplers
from dgm_eit.recon.consistency import ProximalGaussNewton, noise_std_from_snr

# the samplers that read the voltages, and what to call them in messages
SAMPLERS_ON_VOLTAGES = {"dps": "guided sampling (dps)", "dds": "data-consistent sampling (dds)"}
# the samplers that start from the GN image at t0, and the settings a validation sweep
# chooses for them (dgm_eit.tuning; a reconstruction file records them)
TUNABLE_SAMPLERS = ("csd", "dds")
SETTING_KEYS = ("t0", "n_steps", "mode", "solver", "corrector_steps")


@dataclass(frozen=True)
class SamplingSettings:
    """How the score prior reconstructs: the keys of the ``[csd]`` section."""

    sampler: str = "csd"          # csd | dds | dps | pc | ode
    solver: str = "pc"            # inner sampler of csd: pc | ode
    t0: float = 0.45              # where the GN image enters the reverse process
    n_steps: int = 450            # reverse steps from t0 (or 1) to the end
    corrector_steps: int = 1      # Langevin steps per reverse step
    snr: float = 0.056            # the Langevin corrector's signal-to-noise ratio (not the measurements')
    mode: str = "replace"         # replace | ccdf
    zeta: float = 100.0           # dps: step on the gradient of the data misfit
    dps_init: str = "gn"          # dps: start from the GN image at t0, or from noise at t = 1
    n_samples: int = 1            # reverse runs per image; > 1 gives their mean and std
    eta: float = 1.0              # dds: share of fresh noise when re-noising
    dc_weight: float = 3.0        # dds: prior std of the data-consistency step, in units of the state's noise
    dc_steps: int = 1             # dds: proximal Gauss-Newton steps per reverse step
    dc_refresh: int = 0           # dds: a fresh Jacobian every this many steps (0: the first one's)

    @classmethod
    def resolve(cls, *sources: Mapping | None) -> "SamplingSettings":
        """Built-in defaults, then each source in turn, a later one winning; keys that are no
        setting, and None values, are passed over. Refuses settings no sampler can run."""
        names = {f.name for f in fields(cls)}
        values = {}
        for source in sources:
            values.update({k: v for k, v in (source or {}).items() if k in names and v is not None})
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.sampler not in samplers.SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
        if int(self.n_samples) < 1:
            raise InputError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.sampler == "dps" and self.dps_init not in ("gn", "noise"):
            raise InputError(f"dps_init must be gn or noise, got {self.dps_init!r}")
        if self.sampler == "dds" and not (float(self.dc_weight) > 0 and int(self.dc_steps) >= 1):
            raise InputError(f"dds needs dc_weight > 0 and dc_steps >= 1, got {float(self.dc_weight)} "
                             f"and {int(self.dc_steps)}")

    @property
    def starts_from_gn(self) -> bool:
        return self.sampler in ("csd", "dds") or (self.sampler == "dps" and self.dps_init == "gn")

    def make_sampler(self, sde):
        """The reverse-time sampler these settings describe."""
        name = self.sampler
        kwargs = {"n_steps": self.n_steps, "corrector_steps": self.corrector_steps, "snr": self.snr}
        if name == "csd":
            kwargs.update(t0=self.t0, mode=self.mode, solver=self.solver)
        elif name == "dds":
            kwargs = {"n_steps": self.n_steps, "t0": self.t0, "mode": self.mode, "eta": self.eta}
        elif name == "dps":
            kwargs.update(zeta=self.zeta, mode=self.mode, t0=self.t0 if self.dps_init == "gn" else 1.0)
        return samplers.get_sampler(name, sde, **kwargs)


@functools.lru_cache(maxsize=4)
def _operator(mesh_json: str, image_size: int) -> nn.Module:
    from dgm_eit.physics import operator_from_config

    return operator_from_config({"mesh": json.loads(mesh_json)}, image_size)


def posterior_sampler(prior, opts: Mapping) -> "PosteriorSampler":
    """The reconstructor behind ``ScoreModel.reconstruct(batch, **opts)``.

    ``opts``: settings by rising priority from the ``[csd]`` section (``opts["csd"]``, else
    ``opts["config"]["csd"]``) and explicit keys (``sampler=``, ``t0=`` ...); ``operator=`` an
    EIT operator, else the one of ``opts["config"]``'s ``[mesh]`` when the sampler reads the
    voltages; ``snr_db=`` the measurements' noise level, else ``opts["config"]``'s ``[data]``."""
    config = opts.get("config") if isinstance(opts.get("config"), dict) else {}
    section = opts.get("csd")
    if section is None:
        section = config.get("csd")
    settings = SamplingSettings.resolve(section, opts)
    operator = opts.get("operator")
    if operator is None and settings.sampler in SAMPLERS_ON_VOLTAGES:
        if "mesh" not in config:
            raise InputError(f"{SAMPLERS_ON_VOLTAGES[settings.sampler]} needs the EIT operator: pass operator= "
                             "or the run's full config as config=")
        operator = _operator(json.dumps(config["mesh"], sort_keys=True), prior.info.image_size)
    snr_db = opts.get("snr_db")
    if snr_db is None:
        snr_db = config.get("data", {}).get("snr_db")
    return PosteriorSampler(prior, settings, operator, snr_db)


class PosteriorSampler:
    """Images from measurements with a score prior (see the module doc).

    ``prior`` is a :class:`~dgm_eit.models.score.ScoreModel`; ``operator`` maps images
    (B,H,W) to voltages (an :class:`~dgm_eit.physics.EITOperator` or any module that does);
    ``snr_db`` is the measurements' noise level, which ``dds`` weighs them by; ``fidelity``
    replaces dds's data term (e.g. a linearised model, :mod:`dgm_eit.ktc.posterior`)."""

    def __init__(self, prior, settings: SamplingSettings, operator: nn.Module | None = None,
                 snr_db: float | None = None, fidelity=None):
        self.prior = prior
        self.settings = settings
        self.operator = operator
        self.snr_db = snr_db
        # dds's data term: any object with bind(voltages) -> step(images, prior_std) -> images;
        # by default proximal Gauss-Newton steps through ``operator``
        self.fidelity = fidelity

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        """``{"recon": (B,H,W), "nfe": int}``, plus ``"recon_std"`` when ``n_samples > 1``;
        ``nfe`` counts the network evaluations spent per image, all its samples together."""
        prior, settings = self.prior, self.settings
        n = int(settings.n_samples)
        sampler = settings.make_sampler(prior.sde)
        size = prior.info.image_size
        if not batch:
            raise InputError("empty batch: give 'gn' (csd) or 'v' and 'gn' (dps)")
        b = next(iter(batch.values())).shape[0]
        device = prior.sigma_mean.device
        init = likelihood = consistency = None
        name = settings.sampler
        if settings.starts_from_gn:
            if "gn" not in batch:
                raise InputError(f"sampler {name!r} starts from the Gauss-Newton image: the batch needs 'gn'")
            gn = prior.check_images(batch["gn"].to(device), "gn")
            init = prior.normalise_image(gn)[:, None].repeat_interleave(n, dim=0)
        if name in SAMPLERS_ON_VOLTAGES:
            if "v" not in batch:
                raise InputError(f"{SAMPLERS_ON_VOLTAGES[name]} needs the voltages: the batch needs 'v'")
            if batch["v"].shape[-1] != prior.info.n_meas:
                raise InputError(f"voltage vector has {batch['v'].shape[-1]} values, the model expects "
                                 f"{prior.info.n_meas}")
            if self.operator is None and not (name == "dds" and self.fidelity is not None):
                raise InputError(f"{SAMPLERS_ON_VOLTAGES[name]} needs the EIT operator: pass operator= "
                                 "or the run's full config as config=")
            v = batch["v"].to(device).repeat_interleave(n, dim=0)
            if name == "dps":
                likelihood = self.data_misfit(v)
            else:
                consistency = self._consistency(v)
        x, nfe = sampler(prior.score, (b * n, 1, size, size), generator=generator, init=init,
                         likelihood=likelihood, consistency=consistency, device=device)
        images = prior.denormalise_image(x[:, 0]) * prior.support
        images = images.reshape(b, n, size, size)
        out = {"recon": images.mean(dim=1), "nfe": int(nfe) * n}
        if n > 1:
            out["recon_std"] = images.std(dim=1)
        return out

    def data_misfit(self, v: torch.Tensor):
        """``misfit(x) = ||v - F(x)||`` per sample, ``x`` normalised images (B,1,H,W)."""
        prior, operator = self.prior, self.operator
        # the FEM needs positive conductivity; a crude x0_hat early on can dip below zero
        floor = 1e-3 * float(prior.sigma_mean.abs()) + 1e-6

        def misfit(x: torch.Tensor) -> torch.Tensor:
            image = prior.denormalise_image(x[:, 0]).clamp_min(floor)
            pred = operator(image.to(torch.float64))
            return torch.linalg.vector_norm(v.to(pred.dtype) - pred, dim=-1).to(x.dtype)

        return misfit

    def _consistency(self, v: torch.Tensor):
        """``consistency(x0, t)`` of the dds sampler: ``dc_steps`` steps of the data term on the
        denoised images, with a prior std of ``dc_weight`` times the state's noise level at ``t``
        (raw image units)."""
        prior, settings = self.prior, self.settings
        weight, steps = float(settings.dc_weight), int(settings.dc_steps)
        fidelity = self.fidelity or self._proximal_gauss_newton()
        step = fidelity.bind(v.detach().to("cpu", torch.float64).numpy())
        support = prior.support.cpu().numpy()

        def consistency(x0: torch.Tensor, t: float) -> torch.Tensor:
            images = prior.denormalise_image(x0[:, 0]).to("cpu", torch.float64).numpy() * support
            prior_std = weight * float(prior.sde.sigma(torch.tensor(float(t), dtype=torch.float64))) \
                * float(prior.sigma_std)
            for _ in range(steps):
                images = step(images, prior_std)
            out = torch.from_numpy(images).to(device=x0.device, dtype=x0.dtype)
            return prior.normalise_image(out)[:, None]

        return consistency

    def _proximal_gauss_newton(self) -> "ProximalFidelity":
        if self.snr_db is None:
            raise InputError("data-consistent sampling (dds) needs the measurements' noise level: pass snr_db=")
        # no pixel moves by more than the mean conductivity in one step (a trust region)
        mean = float(self.prior.sigma_mean.abs())
        prox = ProximalGaussNewton(self.operator.fm, self.operator.grid, min_sigma=1e-3 * mean + 1e-6, max_step=mean)
        return ProximalFidelity(prox, float(self.snr_db), int(self.settings.dc_refresh))


class ProximalFidelity:
    """dds's data term through the FEM: proximal Gauss-Newton steps
    (:class:`~dgm_eit.recon.consistency.ProximalGaussNewton`) weighted by white noise of
    ``snr_db``; a fresh Jacobian every ``refresh_every`` steps (0: the first step's, throughout)."""

    def __init__(self, prox: ProximalGaussNewton, snr_db: float, refresh_every: int = 0):
        self.prox, self.snr_db, self.refresh_every = prox, snr_db, refresh_every

    def bind(self, volts):
        noise = noise_std_from_snr(volts, self.snr_db)
        calls = [0]

        def step(images, prior_std):
            refresh = calls[0] == 0 or (self.refresh_every > 0 and calls[0] % self.refresh_every == 0)
            calls[0] += 1
            return self.prox.step(images, volts, noise, prior_std, refresh=refresh)

        return step
