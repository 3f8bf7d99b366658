"""Conditional normalizing flow (after Denker et al. 2021, conditional invertible network).

A multi-scale GLOW-style flow maps a conductivity image ``x`` to a Gaussian latent ``z``
given the Gauss-Newton image (and optionally the measurements): per level an invertible
Haar-initialised downsampling, ``blocks_per_level`` steps of ActNorm + orthogonal 1x1
mixing + conditional affine coupling fed with that level's feature map, then half of the
channels leave as latent; the rest is flattened and passes ``fc_blocks`` dense couplings
conditioned on a vector. Training minimises the negative log-likelihood in bits per
dimension; reconstruction is the mean (and per-pixel std) of K posterior samples.

The image is 0 outside the disk, a value with no spread that a density cannot model. The
flow therefore sees standard normal noise there (an easy, independent part of the density)
and reconstructions are set to 0 outside the disk.

A flow's rare samples can leave the range of every training image by orders of magnitude
(a 4-anomaly flow of the quick profile drew pixels of 194 where the truth lies in [0, 1.5];
its mean of 64 samples was then 131% worse than GN on validation, while the same samples
clipped to the training range were 60% better). With ``cnf.clip_samples`` the samples are
clipped to the training images' range before their mean and std are taken.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from dgm_eit.errors import InputError
from dgm_eit.methods import Method, register_method
from dgm_eit.models.base import DataInfo, GenerativeModel, check_inputs, disk_mask
from dgm_eit.models.flow_layers import FlowStep, InvertibleDownsampling

# the mean of posterior samples, with their std map; conditioned on the GN image alone, as the paper's
register_method(Method("cnf", "CNF", model="cnf", cost=2, std_map=True, samples_key="cnf_samples",
                       paper_row="CNF", paper_config=(("cnf.condition_on_v", False),)))


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.leaky_relu(x + self.conv2(F.leaky_relu(self.conv1(x), 0.2)), 0.2)


class ConditioningNetwork(nn.Module):
    """ResNet on the normalised classical images (``in_channels``: the GN image, and where the model
    reads them, the data set's images at other settings), with the disk mask as one more channel.

    Returns one feature map per flow level (``channels[l]`` maps at ``size / 2**(l+1)``,
    the resolution of level ``l``) and a ``vector_dim`` vector for the dense couplings.
    With ``n_meas`` set, an MLP embeds the normalised voltages, is merged into the vector
    and shifts every feature map channel-wise.
    """

    def __init__(self, channels: list[int], vector_dim: int, res_blocks: int = 1,
                 n_meas: int | None = None, v_hidden: int = 256, pool: int = 4, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels + 1, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.blocks = nn.ModuleList()
        prev = channels[0]
        for ch in channels:
            self.down.append(nn.Conv2d(prev, ch, 3, stride=2, padding=1))
            self.blocks.append(nn.Sequential(*[_ResBlock(ch) for _ in range(res_blocks)]))
            prev = ch
        self.pool = pool
        self.to_vector = nn.Sequential(nn.Linear(prev * pool * pool, vector_dim), nn.LeakyReLU(0.2),
                                       nn.Linear(vector_dim, vector_dim))
        self.v_embed = None
        if n_meas:
            self.v_embed = nn.Sequential(nn.Linear(n_meas, v_hidden), nn.LeakyReLU(0.2),
                                         nn.Linear(v_hidden, vector_dim), nn.LeakyReLU(0.2))
            self.v_to_maps = nn.ModuleList([nn.Linear(vector_dim, ch) for ch in channels])
            self.merge = nn.Linear(2 * vector_dim, vector_dim)

    def forward(self, image: torch.Tensor, v: torch.Tensor | None = None):
        h = F.leaky_relu(self.stem(image), 0.2)
        e = self.v_embed(v) if self.v_embed is not None else None
        maps = []
        for level, (down, block) in enumerate(zip(self.down, self.blocks)):
            h = block(F.leaky_relu(down(h), 0.2))
            if e is not None:
                h = h + self.v_to_maps[level](e)[:, :, None, None]
            maps.append(h)
        pooled = F.adaptive_avg_pool2d(h, min(self.pool, h.shape[-1]))
        if pooled.shape[-1] != self.pool:  # tiny images: keep the vector head's input size fixed
            pooled = F.interpolate(pooled, size=self.pool, mode="nearest")
        vector = self.to_vector(pooled.flatten(1))
        if e is not None:
            vector = self.merge(torch.cat([vector, e], dim=1))
        return maps, vector


def _as_list(value, levels: int, key: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels or any(int(x) < 1 for x in values):
        raise InputError(f"cnf.{key} needs {levels} positive integers (one per level), got {value!r}")
    return [int(x) for x in values]


class CNF(GenerativeModel):
    name = "cnf"
    stages = ("flow",)
    uses_ema = False
    needs_gn = True

    def __init__(self, cfg: dict, info: DataInfo):
        super().__init__(cfg, info)
        size = int(info.image_size)
        levels = int(cfg["levels"])
        if levels < 1 or size % 2**levels or size // 2**levels < 1:
            raise InputError(f"cnf.levels={levels} needs an image size divisible by {2**levels}, got {size}")
        if int(cfg["blocks_per_level"]) < 1 or int(cfg["fc_blocks"]) < 0:
            raise InputError("cnf.blocks_per_level must be >= 1 and cnf.fc_blocks >= 0")
        if not 0 < float(cfg["temperature"]) <= 10:
            raise InputError(f"cnf.temperature must be in (0, 10], got {cfg['temperature']!r}")
        self.size = size
        self.levels = levels
        self.clamp = float(cfg["clamp"])
        self.dequant_std = float(cfg["dequant_std"])
        cond_channels = _as_list(cfg["cond_channels"], levels, "cond_channels")
        hidden = _as_list(cfg["hidden_channels"], levels, "hidden_channels")
        learned_mixing = bool(cfg["learned_mixing"])

        self.register_buffer("sigma_mean", torch.tensor(float(info.sigma_mean)))
        self.register_buffer("sigma_std", torch.tensor(float(info.sigma_std)))
        self.register_buffer("inside", disk_mask(size).float())
        self.clip_samples = bool(cfg["clip_samples"]) and info.sigma_min is not None
        if self.clip_samples:
            # from data_info.json, not saved with the weights
            self.register_buffer("sample_range", torch.tensor([info.sigma_min, info.sigma_max]), persistent=False)

        self.cond_net = ConditioningNetwork(
            cond_channels, int(cfg["cond_vector"]), res_blocks=int(cfg["cond_res_blocks"]),
            n_meas=info.n_meas if cfg["condition_on_v"] else None, in_channels=self.input_channels(cfg, info))

        self.downsample = nn.ModuleList()
        self.level_steps = nn.ModuleList()
        # latent layout: what each level splits off, then the dense rest (for the inverse)
        self.split_shapes: list[tuple[int, int, int]] = []
        channels, res = 1, size
        for level in range(levels):
            self.downsample.append(InvertibleDownsampling(channels, learned=bool(cfg["learned_downsampling"])))
            channels, res = channels * 4, res // 2
            self.level_steps.append(nn.ModuleList([
                FlowStep(channels, cond_channels[level], hidden[level], self.clamp,
                         learned_mixing=learned_mixing)
                for _ in range(int(cfg["blocks_per_level"]))]))
            out = channels // 2
            self.split_shapes.append((out, res, res))
            channels -= out
        self.rest_shape = (channels, res, res)
        rest_dim = channels * res * res
        # as the reference code, only the first fc_dims features of the flattened rest pass
        # the dense couplings (0 = all); dense layers on all of them would dominate the size
        fc_dims = int(cfg["fc_dims"])
        if fc_dims < 0:
            raise InputError(f"cnf.fc_dims must be >= 0, got {fc_dims}")
        self.fc_dims = rest_dim if fc_dims == 0 else min(fc_dims, rest_dim)
        if self.fc_dims < 2 and int(cfg["fc_blocks"]):
            raise InputError("the dense couplings need at least 2 features (cnf.fc_dims)")
        self.fc_steps = nn.ModuleList([
            FlowStep(self.fc_dims, int(cfg["cond_vector"]), int(cfg["fc_hidden"]), self.clamp, dense=True)
            for _ in range(int(cfg["fc_blocks"]))])

    # -- normalisation ---------------------------------------------------------------
    def _image(self, image: torch.Tensor, key: str) -> torch.Tensor:
        if image.dim() == 4 and image.shape[1] == 1:
            image = image[:, 0]
        if image.dim() != 3 or tuple(image.shape[-2:]) != (self.size, self.size):
            raise InputError(f"batch[{key!r}] must be (B,{self.size},{self.size}), got {tuple(image.shape)}")
        return image.to(self.inside.dtype)

    def _normalise(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.sigma_mean) / self.sigma_std

    @classmethod
    def reads_extra(cls, cfg: dict) -> bool:
        return "extra" in check_inputs(cfg, "cnf")

    def condition(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Feature maps per level and the conditioning vector for a batch (needs ``gn``)."""
        images = self.classical_images(batch).to(self.inside.dtype)
        mask = self.inside.expand(len(images), 1, self.size, self.size)
        # outside the disk the classical images are 0; keep them 0 after normalising, the mask channel says where
        image = torch.cat([self._normalise(images) * mask, mask], dim=1)
        v = None
        if self.cond_net.v_embed is not None:
            if "v" not in batch:
                raise InputError("cnf.condition_on_v is set but batch['v'] is missing")
            v = self.normalise_v(batch["v"].to(self.inside.dtype))
        return self.cond_net(image, v)

    # -- the flow ----------------------------------------------------------------------
    def to_latent(self, x: torch.Tensor, maps, vector) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,1,H,W) normalised -> z (B,H*W), log|det dz/dx| (B,)."""
        logdet = x.new_zeros(x.shape[0])
        latents = []
        h = x
        for level in range(self.levels):
            h, ld = self.downsample[level](h)
            logdet = logdet + ld
            for step in self.level_steps[level]:
                h, ld = step(h, maps[level])
                logdet = logdet + ld
            out = self.split_shapes[level][0]
            latents.append(h[:, :out].flatten(1))
            h = h[:, out:]
        h = h.flatten(1)
        latents.append(h[:, self.fc_dims:])
        h = h[:, :self.fc_dims]
        for step in self.fc_steps:
            h, ld = step(h, vector)
            logdet = logdet + ld
        latents.append(h)
        return torch.cat(latents, dim=1), logdet

    def from_latent(self, z: torch.Tensor, maps, vector) -> torch.Tensor:
        """Inverse of :meth:`to_latent`: z (B,H*W) -> x (B,1,H,W) normalised."""
        rest_dim = math.prod(self.rest_shape)
        sizes = [c * h * w for c, h, w in self.split_shapes] + [rest_dim - self.fc_dims, self.fc_dims]
        parts = list(torch.split(z, sizes, dim=1))
        h = parts.pop()
        for step in reversed(self.fc_steps):
            h, _ = step(h, vector, rev=True)
        h = torch.cat([h, parts.pop()], dim=1).view(-1, *self.rest_shape)
        for level in reversed(range(self.levels)):
            h = torch.cat([parts[level].view(-1, *self.split_shapes[level]), h], dim=1)
            for step in reversed(self.level_steps[level]):
                h, _ = step(h, maps[level], rev=True)
            h, _ = self.downsample[level](h, rev=True)
        return h

    def nll_bits_per_dim(self, x: torch.Tensor, maps, vector) -> torch.Tensor:
        """Per-sample negative log-likelihood of normalised images x (B,1,H,W), bits/dim."""
        z, logdet = self.to_latent(x, maps, vector)
        dims = z.shape[1]
        log_pz = -0.5 * (z**2).sum(dim=1) - 0.5 * dims * math.log(2 * math.pi)
        return -(log_pz + logdet) / (dims * math.log(2.0))

    # -- GenerativeModel -----------------------------------------------------------
    def loss(self, batch: dict, stage: str) -> torch.Tensor:
        if stage not in self.stages:
            raise InputError(f"the CNF has one training stage 'flow', got {stage!r}")
        if "sigma" not in batch:
            raise InputError("batch['sigma'] (the ground truth) is missing")
        sigma = self._image(batch["sigma"], "sigma")
        x = self._normalise(sigma)
        x = x + self.dequant_std * torch.randn_like(x)
        # outside the disk: independent N(0,1) values, see the module docstring
        x = torch.where(self.inside.bool(), x, torch.randn_like(x))
        maps, vector = self.condition(batch)
        return self.nll_bits_per_dim(x[:, None], maps, vector).mean()

    @torch.no_grad()
    def reconstruct(self, batch: dict, *, n_samples: int | None = None,
                    generator: torch.Generator | None = None, temperature: float | None = None,
                    max_rows: int = 256, **opts) -> dict:
        """Mean and per-pixel std of ``n_samples`` posterior samples (default ``cnf.n_samples``).

        The K samples of all images are drawn in chunks of ``max_rows`` flow passes; the
        latent is drawn from ``generator`` (on its own device), so a seed fixes the result.
        ``temperature`` scales the latent's std (default ``cnf.temperature``).
        """
        k = int(self.cfg["n_samples"] if n_samples is None else n_samples)
        if k < 1:
            raise InputError(f"n_samples must be >= 1, got {k}")
        temp = float(self.cfg["temperature"] if temperature is None else temperature)
        if not temp > 0:
            raise InputError(f"temperature must be > 0, got {temp}")
        maps, vector = self.condition(batch)
        b = vector.shape[0]
        dims = self.size * self.size
        device = self.inside.device
        rows = max(1, int(max_rows))
        samples = torch.empty(b * k, self.size, self.size, dtype=self.inside.dtype, device=device)
        gen_device = generator.device if generator is not None else device
        for start in range(0, b * k, rows):
            stop = min(start + rows, b * k)
            index = torch.arange(start, stop, device=device) // k  # sample row -> image
            z = torch.randn(stop - start, dims, generator=generator, device=gen_device,
                            dtype=self.inside.dtype).to(device) * temp
            x = self.from_latent(z, [m[index] for m in maps], vector[index])
            samples[start:stop] = x[:, 0]
        samples = samples * self.sigma_std + self.sigma_mean
        if self.clip_samples:
            samples = samples.clamp(self.sample_range[0], self.sample_range[1])
        samples = (samples * self.inside).view(b, k, self.size, self.size)
        std = samples.std(dim=1) if k > 1 else torch.zeros_like(samples[:, 0])
        return {"recon": samples.mean(dim=1), "recon_std": std, "nfe": k}
