"""U-Net post-processing: a network that maps the Gauss-Newton image to the truth.

The plainest learned baseline (Jin et al. 2017's FBPConvNet, for EIT e.g. Hamilton and
Hauptmann 2018): the GN image goes in, a residual correction comes out, and the network
is trained by the mean squared error to the ground truth. It is deterministic (one
image, no std map) and never sees the voltages except through the GN image.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dgm_eit.errors import InputError
from dgm_eit.methods import Method, register_method
from dgm_eit.models.base import DataInfo, GenerativeModel, disk_mask

register_method(Method("unet", "U-Net", model="unet", cost=1))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU())


class UNetBackbone(nn.Module):
    """Images (B,1,H,W) -> (B,1,H,W): one resolution level per entry of ``channels`` (average-pool
    down, nearest up, skip connections), the output layer zeroed so that training starts from
    the identity of the residual it predicts."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.down = nn.ModuleList()
        cin = 1
        for c in channels:
            self.down.append(_conv_block(cin, c))
            cin = c
        self.up = nn.ModuleList(_conv_block(c_deep + c_skip, c_skip)
                                for c_deep, c_skip in zip(channels[:0:-1], channels[-2::-1]))
        self.out = nn.Conv2d(channels[0], 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.down):
            if level:
                x = F.avg_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            x = block(torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skips.pop()], dim=1))
        return self.out(x)


class UNetPostProcessing(GenerativeModel):
    """``recon = GN + UNet(GN)`` on normalised images; ``cfg`` is the ``[unet]`` section."""

    name: ClassVar[str] = "unet"
    stages: ClassVar[tuple[str, ...]] = ("regression",)
    needs_gn: ClassVar[bool] = True
    data_keys: ClassVar[tuple[str, ...]] = ("sigma", "gn")

    def __init__(self, cfg: dict, info: DataInfo):
        super().__init__(cfg, info)
        channels = [int(c) for c in cfg["channels"]]
        if not channels or min(channels) < 1:
            raise InputError(f"unet.channels must list positive channel counts, got {cfg['channels']}")
        if info.image_size % 2 ** (len(channels) - 1):
            raise InputError(f"image size {info.image_size} cannot be halved {len(channels) - 1} times "
                             f"(unet.channels has {len(channels)} levels)")
        self.net = UNetBackbone(channels)
        self.register_buffer("sigma_mean", torch.tensor(float(info.sigma_mean)))
        self.register_buffer("sigma_std", torch.tensor(float(info.sigma_std)))
        # derived from the image size, so not saved with the weights
        self.register_buffer("inside", disk_mask(info.image_size).float(), persistent=False)

    def _images(self, batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        if key not in batch:
            raise InputError(f"the U-Net post-processes the Gauss-Newton image: the batch needs {key!r}")
        size = self.info.image_size
        images = batch[key]
        if images.dim() != 3 or tuple(images.shape[-2:]) != (size, size):
            raise InputError(f"batch[{key!r}] has shape {tuple(images.shape)}, the model expects (B,{size},{size})")
        return ((images - self.sigma_mean) / self.sigma_std)[:, None]

    def _predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised images (B,1,H,W), 0 outside the disk."""
        gn = self._images(batch, "gn")
        return (gn + self.net(gn)) * self.inside

    def loss(self, batch: dict[str, torch.Tensor], stage: str = "regression") -> torch.Tensor:
        if stage != "regression":
            raise InputError(f"the U-Net has one training stage 'regression', got {stage!r}")
        target = self._images(batch, "sigma") * self.inside
        return F.mse_loss(self._predict(batch), target)

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor], *, n_samples: int | None = None,
                    generator: torch.Generator | None = None, **opts) -> dict:
        """Deterministic: ``n_samples`` and ``generator`` do not change the result."""
        was_training = self.training
        self.eval()
        try:
            x = self._predict(batch)[:, 0]
        finally:
            self.train(was_training)
        return {"recon": (x * self.sigma_std + self.sigma_mean) * self.inside, "nfe": 1}
