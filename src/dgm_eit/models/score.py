"""Score-based diffusion prior (VE SDE, NCSN++-style U-Net) and its reconstructors.

The prior is trained on ground-truth images only (continuous-time denoising score
matching, Song et al. 2021); measurements enter at reconstruction time, by

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

The network is split as in NVlabs/edm: :class:`NCSNpp` is a plain U-Net of ``(x, c_noise)``,
:class:`ScoreNetwork` turns it into a score ``s(x, sigma) = F(x, log sigma) / sigma``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dgm_eit.errors import InputError
from dgm_eit.models.base import DataInfo, GenerativeModel, disk_mask
from dgm_eit.models.sde import make_sde
from dgm_eit.models import samplers as sampling

TUNED_FILE = "tuned_csd.json"


# --------------------------------------------------------------------------- backbone
def _groups(channels: int) -> int:
    """GroupNorm group count: NCSN++ uses min(C // 4, 32); the cap keeps narrow nets valid."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def _zero_init(module: nn.Module) -> nn.Module:
    # NCSN++ initialises the last layer of every residual branch at (almost) zero
    # (init_scale=0), so each block starts as the identity and deep nets train stably.
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of the log noise level (fixed, saved with the weights)."""

    def __init__(self, size: int, scale: float):
        super().__init__()
        self.register_buffer("W", torch.randn(size) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = x[:, None] * self.W[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class ResnetBlockBigGAN(nn.Module):
    """Pre-activation residual block with optional 2x down/up-sampling inside (BigGAN style)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0,
                 up: bool = False, down: bool = False, skip_rescale: bool = True):
        super().__init__()
        self.up, self.down, self.skip_rescale = up, down, skip_rescale
        self.norm0 = nn.GroupNorm(_groups(in_ch), in_ch, eps=1e-6)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.dense = nn.Linear(temb_dim, out_ch)
        nn.init.zeros_(self.dense.bias)
        self.norm1 = nn.GroupNorm(_groups(out_ch), out_ch, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or up or down) else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm0(x))
        h = self._resample(h)
        x = self._resample(x)
        h = self.conv0(h)
        h = h + self.dense(F.silu(temb))[:, :, None, None]
        h = F.silu(self.norm1(h))
        h = self.conv1(self.dropout(h))
        if self.skip is not None:
            x = self.skip(x)
        out = x + h
        return out / math.sqrt(2.0) if self.skip_rescale else out


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels (the DDPM/NCSN++ attention block)."""

    def __init__(self, channels: int, skip_rescale: bool = True):
        super().__init__()
        self.skip_rescale = skip_rescale
        self.norm = nn.GroupNorm(_groups(channels), channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, hgt * wid).unbind(1)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        h = self.proj(torch.einsum("bij,bcj->bci", w, v).reshape(b, c, hgt, wid))
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class NCSNpp(nn.Module):
    """NCSN++ U-Net (Song et al. 2021) without compiled ops: BigGAN residual blocks with
    average-pool / nearest resampling, attention at chosen resolutions, skip connections
    from every down-path activation. Input (B,C,H,W) and ``c_noise`` (B,) -> (B,C,H,W)."""

    def __init__(self, image_size: int, channels: int = 1, nf: int = 32, ch_mult=(1, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions=(16,), dropout: float = 0.0,
                 fourier_scale: float = 16.0, skip_rescale: bool = True):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        if nf < 4 or not ch_mult or num_res_blocks < 1:
            raise InputError(f"NCSN++ needs nf >= 4, a non-empty ch_mult and num_res_blocks >= 1 "
                             f"(got nf={nf}, ch_mult={ch_mult}, num_res_blocks={num_res_blocks})")
        if image_size % 2 ** (len(ch_mult) - 1):
            raise InputError(f"image size {image_size} cannot be halved {len(ch_mult) - 1} times "
                             f"(ch_mult has {len(ch_mult)} levels)")
        self.image_size = image_size
        attn_resolutions = {int(r) for r in attn_resolutions}
        temb_dim = 4 * nf
        self.fourier = GaussianFourierProjection(nf, fourier_scale)
        self.temb = nn.Sequential(nn.Linear(2 * nf, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))

        def block(cin, cout, **kw):
            return ResnetBlockBigGAN(cin, cout, temb_dim, dropout, skip_rescale=skip_rescale, **kw)

        self.conv_in = nn.Conv2d(channels, nf, 3, padding=1)
        self.down = nn.ModuleList()
        skip_ch = [nf]
        ch, res = nf, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, nf * mult))
                ch = nf * mult
                if res in attn_resolutions:
                    self.down.append(AttnBlock(ch, skip_rescale))
                skip_ch.append(ch)
            if level != len(ch_mult) - 1:
                self.down.append(block(ch, ch, down=True))
                res //= 2
                skip_ch.append(ch)
        self.mid = nn.ModuleList([block(ch, ch), AttnBlock(ch, skip_rescale), block(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skip_ch.pop(), nf * mult))
                ch = nf * mult
            if res in attn_resolutions:
                self.up.append(AttnBlock(ch, skip_rescale))
            if level != 0:
                self.up.append(block(ch, ch, up=True))
                res *= 2
        assert not skip_ch
        self.norm_out = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
        self.conv_out = _zero_init(nn.Conv2d(ch, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        temb = self.temb(self.fourier(c_noise))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, AttnBlock):
                h = layer(h)
                hs[-1] = h
            else:
                h = layer(h, temb)
                hs.append(h)
        for layer in self.mid:
            h = layer(h) if isinstance(layer, AttnBlock) else layer(h, temb)
        for layer in self.up:
            if isinstance(layer, AttnBlock):
                h = layer(h)
            elif layer.up:
                h = layer(h, temb)
            else:
                h = layer(torch.cat([h, hs.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


class ScoreNetwork(nn.Module):
    """Preconditioning wrapper: ``score(x, sigma) = backbone(x, log sigma) / sigma``.

    Scaling by 1/sigma (NCSN++'s ``scale_by_sigma``) lets the backbone predict the unit
    noise ``-z``, whose size does not depend on the noise level.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        out = self.backbone(x, torch.log(sigma))
        return out / sigma[:, None, None, None]


def build_backbone(cfg: dict, image_size: int) -> NCSNpp:
    return NCSNpp(image_size=image_size, channels=1, nf=cfg["nf"], ch_mult=cfg["ch_mult"],
                  num_res_blocks=cfg["num_res_blocks"], attn_resolutions=cfg["attn_resolutions"],
                  dropout=cfg["dropout"], fourier_scale=cfg["fourier_scale"])


def physics_operator(config: dict, image_size: int):
    """The differentiable EIT operator of a run's full config (``[mesh]``) at ``image_size``:
    the inversion mesh, as the Gauss-Newton images of the data set were made on."""
    from dgm_eit import physics

    m = config["mesh"]
    mesh = physics.disk_mesh(n_electrodes=int(m["n_electrodes"]), h0=float(m["h0"]),
                             electrode_model=m["electrode_model"],
                             electrode_width=float(m["electrode_width"]))
    protocol = physics.make_protocol(m["protocol"], n_electrodes=int(m["n_electrodes"]))
    fm = physics.ForwardModel(mesh, protocol, electrode_model=m["electrode_model"],
                              contact_impedance=float(m["contact_impedance"]))
    return physics.EITOperator(fm, physics.PixelGrid(mesh, size=image_size))


# ------------------------------------------------------------------------------ model
# the samplers that read the voltages, and what to call them in messages
MEASUREMENT_SAMPLERS = {"dps": "guided sampling (dps)", "dds": "data-consistent sampling (dds)"}
SAMPLE_KEYS = ("sampler", "solver", "t0", "n_steps", "corrector_steps", "snr", "mode",
               "zeta", "dps_init", "n_samples", "eta", "dc_weight", "dc_steps", "dc_refresh")


class ScoreModel(GenerativeModel):
    """Score prior on normalised images; reconstruction by CSD*, DPS or plain sampling.

    ``cfg`` is the ``[score]`` section. Sampling settings come, by rising priority, from
    built-in defaults, ``opts["csd"]`` or ``opts["config"]["csd"]`` (the ``[csd]`` section),
    ``tuned_csd.json`` in ``opts["run_dir"]`` (written by ``dgm-eit tune-t0``), and explicit
    keyword options (``sampler=``, ``t0=``, ``n_steps=`` ...).
    """

    name: ClassVar[str] = "score"
    stages: ClassVar[tuple[str, ...]] = ("score",)
    uses_ema: ClassVar[bool] = True
    needs_gn: ClassVar[bool] = True
    # the prior learns from ground-truth images only; measurements enter at reconstruction
    data_keys: ClassVar[tuple[str, ...]] = ("sigma",)

    DEFAULT_SAMPLING = {"sampler": "csd", "solver": "pc", "t0": 0.45, "n_steps": 450,
                        "corrector_steps": 1, "snr": 0.056, "mode": "replace", "zeta": 100.0,
                        "dps_init": "gn", "n_samples": 1, "eta": 1.0, "dc_weight": 3.0, "dc_steps": 1,
                        "dc_refresh": 0}

    def __init__(self, cfg: dict, info: DataInfo):
        super().__init__(cfg, info)
        self.sde = make_sde(cfg)
        self.net = ScoreNetwork(build_backbone(cfg, info.image_size))
        self.register_buffer("sigma_mean", torch.tensor(float(info.sigma_mean)))
        self.register_buffer("sigma_std", torch.tensor(float(info.sigma_std)))
        self.register_buffer("support", disk_mask(info.image_size).float())
        # EIT operators built from run configs, kept in a plain dict so that they are not
        # registered as sub-modules (they hold no weights and stay on the CPU)
        self._operators: dict[str, nn.Module] = {}

    # normalisation ------------------------------------------------------------------
    def normalise_image(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.sigma_mean) / self.sigma_std

    def denormalise_image(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigma_std + self.sigma_mean

    def _check_images(self, images: torch.Tensor, key: str) -> torch.Tensor:
        size = self.info.image_size
        if images.dim() == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.dim() != 3 or tuple(images.shape[-2:]) != (size, size):
            raise InputError(f"batch[{key!r}] has shape {tuple(images.shape)}, the model expects (B,{size},{size})")
        return images.to(self.sigma_mean.dtype)

    # score -------------------------------------------------------------------------
    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score of ``p_t`` at normalised images ``x`` (B,1,H,W), times ``t`` (B,) or scalar."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        # x_t = s (x0 + sigma z): the network sees x_t / s at noise level sigma (s = 1 for VE)
        s = self.sde.scale(t).to(x.dtype)[:, None, None, None]
        return self.net(x / s, self.sde.sigma(t)) / s

    def loss(self, batch: dict[str, torch.Tensor], stage: str = "score") -> torch.Tensor:
        """Continuous-time denoising score matching, weighted by sigma^2 (Song et al. 2021).

        ``|| sigma s(x0 + sigma z, t) + z ||^2`` averaged over pixels and the batch; the
        global torch RNG draws t and z, so the trainer's seed and saved RNG state fix them.
        """
        if stage != "score":
            raise InputError(f"score model has one training stage 'score', got {stage!r}")
        x0 = self.normalise_image(self._check_images(batch["sigma"], "sigma"))[:, None]
        t = torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype) * (1 - self.sde.eps) + self.sde.eps
        z = torch.randn_like(x0)
        mean, std = self.sde.marginal_prob(x0, t)
        std = std[:, None, None, None]
        score = self.score(mean + std * z, t)
        return torch.mean((score * std + z) ** 2)

    # reconstruction ----------------------------------------------------------------------
    def sampling_options(self, opts: dict) -> dict:
        """Resolve the sampling settings (see the class docstring for the order)."""
        settings = dict(self.DEFAULT_SAMPLING)
        section = opts.get("csd")
        if section is None and isinstance(opts.get("config"), dict):
            section = opts["config"].get("csd")
        if section:
            settings.update({k: v for k, v in section.items() if k in SAMPLE_KEYS})
        run_dir = opts.get("run_dir")
        if run_dir is not None and (Path(run_dir) / TUNED_FILE).is_file():
            from dgm_eit.files import read_json   # names the file when it is damaged

            tuned = read_json(Path(run_dir) / TUNED_FILE, "re-run dgm-eit tune-t0, or delete it")
            settings.update({k: v for k, v in tuned.get("best", {}).items() if k in SAMPLE_KEYS})
        settings.update({k: v for k, v in opts.items() if k in SAMPLE_KEYS and v is not None})
        return settings

    def make_sampler(self, settings: dict):
        name = settings["sampler"]
        kwargs = {"n_steps": settings["n_steps"], "corrector_steps": settings["corrector_steps"],
                  "snr": settings["snr"]}
        if name == "csd":
            kwargs.update(t0=settings["t0"], mode=settings["mode"], solver=settings["solver"])
        elif name == "dds":
            kwargs = {"n_steps": settings["n_steps"], "t0": settings["t0"], "mode": settings["mode"],
                      "eta": settings["eta"]}
        elif name == "dps":
            if settings["dps_init"] not in ("gn", "noise"):
                raise InputError(f"dps_init must be gn or noise, got {settings['dps_init']!r}")
            kwargs.update(zeta=settings["zeta"], mode=settings["mode"],
                          t0=settings["t0"] if settings["dps_init"] == "gn" else 1.0)
        return sampling.get_sampler(name, self.sde, **kwargs)

    def _operator(self, opts: dict, what: str):
        operator = opts.get("operator")
        if operator is None:
            if not isinstance(opts.get("config"), dict) or "mesh" not in opts["config"]:
                raise InputError(f"{what} needs the EIT operator: pass operator= or the run's full config as config=")
            key = json.dumps(opts["config"]["mesh"], sort_keys=True)
            if key not in self._operators:
                self._operators[key] = physics_operator(opts["config"], self.info.image_size)
            operator = self._operators[key]
        return operator

    def _consistency(self, opts: dict, settings: dict, v: torch.Tensor):
        """``consistency(x0, t)`` of the dds sampler: ``dc_steps`` proximal Gauss-Newton steps
        (:class:`dgm_eit.recon.consistency.ProximalGaussNewton`) on the denoised images, with the
        measurement noise of ``snr_db`` and a prior std of ``dc_weight`` times the state's noise
        level at ``t`` (raw conductivity units)."""
        from dgm_eit.recon.consistency import ProximalGaussNewton, noise_std_from_snr

        operator = self._operator(opts, MEASUREMENT_SAMPLERS["dds"])
        snr_db = opts.get("snr_db")
        if snr_db is None and isinstance(opts.get("config"), dict):
            snr_db = opts["config"].get("data", {}).get("snr_db")
        if snr_db is None:
            raise InputError("data-consistent sampling (dds) needs the measurements' noise level: pass snr_db=")
        weight, steps = float(settings["dc_weight"]), int(settings["dc_steps"])
        refresh_every = int(settings["dc_refresh"])
        if not (weight > 0 and steps >= 1):
            raise InputError(f"dds needs dc_weight > 0 and dc_steps >= 1, got {weight} and {steps}")
        # no pixel moves by more than the mean conductivity in one step (a trust region)
        mean = float(self.sigma_mean.abs())
        prox = ProximalGaussNewton(operator.fm, operator.grid, min_sigma=1e-3 * mean + 1e-6, max_step=mean)
        volts = v.detach().to("cpu", torch.float64).numpy()
        noise = noise_std_from_snr(volts, float(snr_db))
        support = self.support.cpu().numpy()

        calls = [0]

        def consistency(x0: torch.Tensor, t: float) -> torch.Tensor:
            images = self.denormalise_image(x0[:, 0]).to("cpu", torch.float64).numpy() * support
            prior_std = weight * float(self.sde.sigma(torch.tensor(float(t), dtype=torch.float64))) \
                * float(self.sigma_std)
            for _ in range(steps):
                # a fresh Jacobian every dc_refresh calls (0: the first call's, throughout)
                refresh = calls[0] == 0 or (refresh_every > 0 and calls[0] % refresh_every == 0)
                images = prox.step(images, volts, noise, prior_std, refresh=refresh)
                calls[0] += 1
            out = torch.from_numpy(images).to(device=x0.device, dtype=x0.dtype)
            return self.normalise_image(out)[:, None]

        return consistency

    def _likelihood(self, opts: dict, v: torch.Tensor):
        """Data misfit ``||v - F(x)||`` per sample, ``x`` normalised images (B,1,H,W)."""
        operator = self._operator(opts, MEASUREMENT_SAMPLERS["dps"])
        # the FEM needs positive conductivity; a crude x0_hat early on can dip below zero
        floor = 1e-3 * float(self.sigma_mean.abs()) + 1e-6

        def misfit(x: torch.Tensor) -> torch.Tensor:
            image = self.denormalise_image(x[:, 0]).clamp_min(floor)
            pred = operator(image.to(torch.float64))
            return torch.linalg.vector_norm(v.to(pred.dtype) - pred, dim=-1).to(x.dtype)

        return misfit

    @torch.no_grad()
    def reconstruct(self, batch, *, n_samples=None, generator=None, **opts) -> dict:
        """``{"recon": (B,H,W), "nfe": int}``, plus ``"recon_std"`` when ``n_samples > 1``.

        Options: ``sampler`` (csd | dps | pc | ode), ``solver`` (pc | ode, inner sampler of
        csd), ``t0``, ``n_steps``, ``corrector_steps``, ``snr``, ``mode`` (replace | ccdf),
        ``zeta``, ``dps_init`` (gn | noise), ``operator`` (an EITOperator for dps),
        ``config`` (the run's full config), ``csd`` (a ``[csd]`` section), ``run_dir``.
        ``nfe`` counts the network evaluations spent per image, all its samples together.
        """
        if n_samples is not None:
            opts["n_samples"] = n_samples
        settings = self.sampling_options(opts)
        n = int(settings["n_samples"])
        if n < 1:
            raise InputError(f"n_samples must be >= 1, got {n}")
        name = settings["sampler"]
        if name not in sampling.SAMPLERS:
            raise InputError(f"unknown sampler {name!r}; choose one of {', '.join(sampling.SAMPLERS)}")
        sampler = self.make_sampler(settings)
        size = self.info.image_size
        if not batch:
            raise InputError("empty batch: give 'gn' (csd) or 'v' and 'gn' (dps)")
        b = next(iter(batch.values())).shape[0]
        device = self.sigma_mean.device
        init = likelihood = consistency = None
        if name in ("csd", "dds") or (name == "dps" and settings["dps_init"] == "gn"):
            if "gn" not in batch:
                raise InputError(f"sampler {name!r} starts from the Gauss-Newton image: the batch needs 'gn'")
            gn = self._check_images(batch["gn"].to(device), "gn")
            init = self.normalise_image(gn)[:, None].repeat_interleave(n, dim=0)
        if name in MEASUREMENT_SAMPLERS:
            if "v" not in batch:
                raise InputError(f"{MEASUREMENT_SAMPLERS[name]} needs the voltages: the batch needs 'v'")
            if batch["v"].shape[-1] != self.info.n_meas:
                raise InputError(f"voltage vector has {batch['v'].shape[-1]} values, the model expects {self.info.n_meas}")
            v = batch["v"].to(device).repeat_interleave(n, dim=0)
            if name == "dps":
                likelihood = self._likelihood(opts, v)
            else:
                consistency = self._consistency(opts, settings, v)
        x, nfe = sampler(self.score, (b * n, 1, size, size), generator=generator, init=init,
                         likelihood=likelihood, consistency=consistency, device=device)
        images = self.denormalise_image(x[:, 0]) * self.support
        images = images.reshape(b, n, size, size)
        # network evaluations spent per image: every sample of it counts
        out = {"recon": images.mean(dim=1), "nfe": int(nfe) * n}
        if n > 1:
            out["recon_std"] = images.std(dim=1)
        return out
