"""Score-based diffusion prior: VE/VP SDE, NCSN++-style U-Net and its training loss.

The prior is trained on ground-truth images only (continuous-time denoising score
matching, Song et al. 2021); measurements enter at reconstruction time, through
:mod:`dgm_eit.models.posterior` (CSD*, CSD* with data consistency, guided CSD), whose
sampling settings the methods registered here choose.

The network is split as in NVlabs/edm: :class:`NCSNpp` is a plain U-Net of ``(x, c_noise)``,
:class:`ScoreNetwork` turns it into a score ``s(x, sigma) = F(x, log sigma) / sigma``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dgm_eit.errors import InputError
from dgm_eit.methods import Method, register_method
from dgm_eit.models.base import DataInfo, GenerativeModel, disk_mask
from dgm_eit.models.posterior import posterior_sampler
from dgm_eit.models.sde import make_sde

# CSD*: the GN image enters the reverse process at t0, chosen on validation data, with the
# sampler run.csd_sampler names; the paper's algorithm only where that is plain "csd" and the
# GN image replaces the state as it is (the paper profile; the quick profile uses "dds")
register_method(Method("csd", "CSD*", model="score", high_snr_training=True, cost=3, std_map=True,
                       samples_key="csd_samples", sampler_key="csd_sampler", tunes_t0=True, paper_row="CSD*",
                       paper_config=(("run.csd_sampler", "csd"), ("csd.mode", "replace"))))
# the paper's CSD* whatever run.csd_sampler says: the same prior (no training of its own), the
# plain reverse process from the GN image, its t0 chosen on validation like csd's
register_method(Method("csd-plain", "CSD* plain (paper)", model="score", high_snr_training=True, cost=3,
                       std_map=True, samples_key="csd_samples", fixed_sampler="csd", tunes_t0=True,
                       paper_row="CSD*", paper_config=(("csd.mode", "replace"),)))
# CSD with the data-misfit gradient at every reverse step (the paper's general CSD, eq. 25)
register_method(Method("guided", "CSD-guided", model="score", high_snr_training=True, cost=4,
                       samples_key="guided_samples", sampler_key="guided_sampler"))


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


# ------------------------------------------------------------------------------ model
class ScoreModel(GenerativeModel):
    """Score prior on normalised images (``cfg`` is the ``[score]`` section); it reconstructs
    through :func:`dgm_eit.models.posterior.posterior_sampler`."""

    name: ClassVar[str] = "score"
    stages: ClassVar[tuple[str, ...]] = ("score",)
    uses_ema: ClassVar[bool] = True
    needs_gn: ClassVar[bool] = True
    # the prior learns from ground-truth images only; measurements enter at reconstruction
    data_keys: ClassVar[tuple[str, ...]] = ("sigma",)

    def __init__(self, cfg: dict, info: DataInfo):
        super().__init__(cfg, info)
        self.sde = make_sde(cfg)
        self.net = ScoreNetwork(build_backbone(cfg, info.image_size))
        self.register_buffer("sigma_mean", torch.tensor(float(info.sigma_mean)))
        self.register_buffer("sigma_std", torch.tensor(float(info.sigma_std)))
        self.register_buffer("support", disk_mask(info.image_size).float())

    # normalisation ------------------------------------------------------------------
    def normalise_image(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.sigma_mean) / self.sigma_std

    def denormalise_image(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigma_std + self.sigma_mean

    def check_images(self, images: torch.Tensor, key: str) -> torch.Tensor:
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
        x0 = self.normalise_image(self.check_images(batch["sigma"], "sigma"))[:, None]
        t = torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype) * (1 - self.sde.eps) + self.sde.eps
        z = torch.randn_like(x0)
        mean, std = self.sde.marginal_prob(x0, t)
        std = std[:, None, None, None]
        score = self.score(mean + std * z, t)
        return torch.mean((score * std + z) ** 2)

    # reconstruction ----------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, batch, *, n_samples=None, generator=None, **opts) -> dict:
        """``{"recon": (B,H,W), "nfe": int}``, plus ``"recon_std"`` when ``n_samples > 1``.

        ``opts`` choose the sampler and its settings, the operator and the noise level (see
        :func:`~dgm_eit.models.posterior.posterior_sampler`): e.g. ``sampler`` (csd | dds | dps |
        pc | ode), ``t0``, ``n_steps``, ``config`` (the run's full config), ``csd`` (a ``[csd]``
        section), ``operator``, ``snr_db``."""
        if n_samples is not None:
            opts["n_samples"] = n_samples
        return posterior_sampler(self, opts).reconstruct(batch, generator)
