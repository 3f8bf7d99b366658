"""Two-stage conditional VAE after Seo et al. 2019 (SIAM J. Imaging Sci. 12(3)), as the paper used it.

Stage ``vae``: a convolutional VAE learns a low-dimensional manifold of conductivity
images. Stage ``regressor``: with the VAE frozen, an MLP maps normalised voltages to
the VAE's latent code (``condition = "v"``, the paper), or a conv encoder maps the GN
image to it (``condition = "gn"``, which carries over from 4 to 2 anomalies in Test 3; with
``inputs = ["gn", "extra"]``, also the data set's classical images at other settings).
Reconstruction is ``decoder(regressor(input))``: one deterministic pass.

The paper architecture (128 x 128, channels 16-32-64-128, 16-d latent) has about
0.94 M VAE parameters; smaller images use fewer channel levels (config ``channels``)
so the bottleneck keeps a few pixels per side.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from dgm_eit.errors import InputError
from dgm_eit.methods import Method, register_method
from dgm_eit.models.base import DataInfo, GenerativeModel, check_inputs, disk_mask

# deterministic: one sample per image, no std map. Its regressor reads what [cvae] condition
# says: the paper's algorithm only where that is the voltages (the paper profile)
register_method(Method("cvae", "CVAE", model="cvae", cost=1, samples_key="cvae_samples", paper_row="CVAE",
                       paper_config=(("cvae.condition", "v"),)))
# the paper's CVAE whatever the profile chose for "cvae" (the quick profile: the GN image):
# the regressor is an MLP on the voltages, a model of its own with runs of its own
register_method(Method("cvae-v", "CVAE-v (paper)", model="cvae", cost=1, samples_key="cvae_samples",
                       model_config=(("cvae.condition", "v"),), run_label="cvae-v", paper_row="CVAE",
                       paper_config=(("cvae.condition", "v"),)))

TARGETS = ("mean", "sample")
CONDITIONS = ("v", "gn")


def check_condition(cfg: dict) -> str:
    """``cvae.condition``; runs saved before the key existed used the voltage MLP."""
    condition = cfg.get("condition", "v")
    if condition not in CONDITIONS:
        raise InputError(f"cvae.condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    return condition


def conv_encoder(channels: list[int], kernel_size: int, in_channels: int = 1) -> list[nn.Module]:
    """[conv k s2 -> LeakyReLU -> BatchNorm] per entry of ``channels``."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for c in channels:
        layers += [nn.Conv2d(c_in, c, kernel_size, stride=2, padding=kernel_size // 2), nn.LeakyReLU(),
                   nn.BatchNorm2d(c)]
        c_in = c
    return layers


class VAE(nn.Module):
    """Conv encoder [conv k5 s2 -> LeakyReLU -> BatchNorm] x L, linear heads to (mu, logvar);
    decoder mirrors it with transposed convolutions (no bias before BatchNorm, as the
    reference). Works on normalised images; the caller maps back to physical units."""

    def __init__(self, image_size: int, channels: list[int], latent_dim: int, kernel_size: int = 5):
        super().__init__()
        levels = len(channels)
        if levels < 1:
            raise InputError("cvae.channels must list at least one channel count")
        if image_size % (2**levels):
            raise InputError(f"cvae: image size {image_size} is not divisible by 2^{levels} "
                             f"({levels} down-sampling levels from cvae.channels); use fewer channels")
        if kernel_size % 2 == 0:
            raise InputError(f"cvae.kernel_size must be odd, got {kernel_size}")
        pad = kernel_size // 2
        self.bottom_channels = channels[-1]
        self.bottom_size = image_size // 2**levels
        flat = channels[-1] * self.bottom_size**2

        self.encoder = nn.Sequential(*conv_encoder(channels, kernel_size), nn.Flatten())
        self.fc_mu = nn.Linear(flat, latent_dim)
        self.fc_logvar = nn.Linear(flat, latent_dim)
        self.fc_up = nn.Linear(latent_dim, flat)

        dec: list[nn.Module] = []
        rev = list(reversed(channels))
        for c_from, c_to in zip(rev[:-1], rev[1:]):
            dec += [nn.ConvTranspose2d(c_from, c_to, kernel_size, stride=2, padding=pad, output_padding=1, bias=False),
                    nn.ReLU(), nn.BatchNorm2d(c_to)]
        dec.append(nn.ConvTranspose2d(rev[-1], 1, kernel_size, stride=2, padding=pad, output_padding=1))
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x[:, None])
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc_up(z).view(-1, self.bottom_channels, self.bottom_size, self.bottom_size)
        return self.decoder(h)[:, 0]


class LatentRegressor(nn.Module):
    """MLP voltages -> latent: Linear+LeakyReLU layers, then Linear, dropout and
    ``bound * tanh`` (the reference code bounds the latent at +-5)."""

    def __init__(self, n_meas: int, hidden: list[int], latent_dim: int, dropout: float, bound: float):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_meas
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU()]
            width = h
        layers += [nn.Linear(width, latent_dim), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers)
        self.bound = float(bound)

    def forward(self, v_normalised: torch.Tensor) -> torch.Tensor:
        return self.bound * torch.tanh(self.net(v_normalised))


class ImageRegressor(nn.Module):
    """Conv encoder classical images (B,C,H,W) -> latent, the VAE encoder's layout: [conv k s2
    -> LeakyReLU -> BatchNorm] x L, then Linear and ``bound * tanh``."""

    def __init__(self, image_size: int, channels: list[int], latent_dim: int, kernel_size: int, bound: float,
                 in_channels: int = 1):
        super().__init__()
        side = image_size // 2 ** len(channels)
        self.net = nn.Sequential(*conv_encoder(channels, kernel_size, in_channels), nn.Flatten(),
                                 nn.Linear(channels[-1] * side * side, latent_dim))
        self.bound = float(bound)

    def forward(self, images_normalised: torch.Tensor) -> torch.Tensor:
        return self.bound * torch.tanh(self.net(images_normalised))


class CVAE(GenerativeModel):
    name: ClassVar[str] = "cvae"
    stages: ClassVar[tuple[str, ...]] = ("vae", "regressor")
    uses_ema: ClassVar[bool] = False
    data_keys: ClassVar[tuple[str, ...]] = ("sigma", "v", "gn")

    def __init__(self, cfg: dict, info: DataInfo):
        super().__init__(cfg, info)
        target = cfg["target"]
        if target not in TARGETS:
            raise InputError(f"cvae.target must be one of {', '.join(TARGETS)}, got {target!r}")
        self.target = target
        self.beta = float(cfg["beta"])
        # runs saved before cvae.input_noise existed trained without it
        self.input_noise = float(cfg.get("input_noise", 0.0))
        if self.input_noise < 0:
            raise InputError(f"cvae.input_noise must be >= 0, got {self.input_noise}")
        self.vae = VAE(info.image_size, list(cfg["channels"]), int(cfg["latent_dim"]), int(cfg["kernel_size"]))
        self.condition = check_condition(cfg)
        in_channels = self.input_channels(cfg, info)
        if self.condition == "v":
            self.regressor = LatentRegressor(info.n_meas, list(cfg["mlp_hidden"]), int(cfg["latent_dim"]),
                                             float(cfg["mlp_dropout"]), float(cfg["latent_bound"]))
        else:
            self.regressor = ImageRegressor(info.image_size, list(cfg["channels"]), int(cfg["latent_dim"]),
                                            int(cfg["kernel_size"]), float(cfg["latent_bound"]), in_channels)
        self.register_buffer("img_mean", torch.tensor(info.sigma_mean, dtype=torch.float32))
        self.register_buffer("img_std", torch.tensor(info.sigma_std, dtype=torch.float32))
        # derived from the image size, so not saved with the weights
        self.register_buffer("inside", disk_mask(info.image_size).float(), persistent=False)

    @property
    def needs_gn(self) -> bool:
        return self.condition == "gn"

    @classmethod
    def reads_extra(cls, cfg: dict) -> bool:
        # inputs are the image regressor's, as mlp_hidden is the voltage MLP's: the other one ignores them
        return "extra" in check_inputs(cfg, "cvae") and check_condition(cfg) == "gn"

    # -- helpers -------------------------------------------------------------------
    def _regressor_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.condition == "v":
            return self.normalise_v(batch["v"])
        return (self.classical_images(batch) - self.img_mean) / self.img_std

    def _to_image(self, decoded: torch.Tensor) -> torch.Tensor:
        # the reference decoder ends in ReLU on physical conductivities (>= 0); the images are 0
        # outside the disk, so the decoder is not asked to learn (or charged for) that part
        return torch.relu(decoded * self.img_std + self.img_mean) * self.inside

    def _check_image(self, sigma: torch.Tensor) -> None:
        size = self.info.image_size
        if sigma.shape[-2:] != (size, size):
            raise InputError(f"image of shape {tuple(sigma.shape[-2:])}, the model expects {size}x{size}")

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        if stage == "vae":
            return list(self.vae.parameters())
        if stage == "regressor":
            return list(self.regressor.parameters())
        raise InputError(f"cvae has no training stage {stage!r}; stages: {', '.join(self.stages)}")

    def set_train_mode(self, stage: str) -> None:
        self.train()
        if stage == "regressor":
            # frozen VAE: its BatchNorm statistics must not drift while the MLP learns
            self.vae.eval()

    # -- training ------------------------------------------------------------------
    def vae_loss(self, sigma: torch.Tensor) -> torch.Tensor:
        """Summed squared error (physical units) + beta * KL, averaged over the batch."""
        self._check_image(sigma)
        mu, logvar = self.vae.encode((sigma - self.img_mean) / self.img_std)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        recon = self._to_image(self.vae.decode(z))
        sse = (recon - sigma).pow(2).flatten(1).sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return (sse + self.beta * kl).mean()

    @torch.no_grad()
    def latent_target(self, sigma: torch.Tensor) -> torch.Tensor:
        was_training = self.vae.training
        self.vae.eval()
        mu, logvar = self.vae.encode((sigma - self.img_mean) / self.img_std)
        self.vae.train(was_training)
        if self.target == "mean":
            return mu
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def loss(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        if stage == "vae":
            return self.vae_loss(batch["sigma"])
        if stage == "regressor":
            target = self.latent_target(batch["sigma"])
            x = self._regressor_input(batch)
            if self.input_noise > 0:
                # the regressor over-fits its 2,000 noise draws and breaks on noisier data (Test 3)
                x = x + self.input_noise * torch.randn_like(x)
            return (self.regressor(x) - target).pow(2).sum(1).mean()
        raise InputError(f"cvae has no training stage {stage!r}; stages: {', '.join(self.stages)}")

    # -- inference -----------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor], *, n_samples: int = 1,
                    generator: torch.Generator | None = None, **opts) -> dict:
        """``decoder(MLP(v))`` in eval mode: deterministic, so ``n_samples`` and
        ``generator`` do not change the result."""
        was_training = self.training
        self.eval()
        try:
            z = self.regressor(self._regressor_input(batch))
            recon = self._to_image(self.vae.decode(z))
        finally:
            self.train(was_training)
        return {"recon": recon, "nfe": 1}

    @torch.no_grad()
    def autoencode(self, sigma: torch.Tensor) -> torch.Tensor:
        """Decoder(encoder mean): the VAE's own reconstruction, an upper bound on quality."""
        was_training = self.training
        self.eval()
        try:
            mu, _ = self.vae.encode((sigma - self.img_mean) / self.img_std)
            return self._to_image(self.vae.decode(mu))
        finally:
            self.train(was_training)
