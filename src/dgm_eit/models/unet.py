"""U-Net post-processing: a network that maps the study's classical image to the truth.

The plainest learned baseline (Jin et al. 2017's FBPConvNet, for EIT e.g. Hamilton and
Hauptmann 2018; on the KTC2023 tank, the winning design): the classical image (the data
set's ``gn``: GN on the disk, the linearised step on the tank) goes in, and either

- ``output = "regression"``: a residual correction comes out, trained by the mean squared
  error to the ground truth, or
- ``output = "classes"``: three logits per pixel (water, resistive, conductive: the data
  set's relative conductivity below 0.5, above 1.5, else water), trained by cross-entropy; the
  image it returns is the expected relative conductivity of the class probabilities with
  the classes at 1, 0 and 2 (``1 - p_resistive + p_conductive``), so that a study segments it
  as any other image.

``inputs`` lists its input channels: the classical image ``gn``, and with ``extra`` the data
set's classical images at other settings (``gn_extra``; on the tank, the linearised step at
other priors, as in KTC2023's winning design). It is deterministic (one image, no std map) and
never sees the voltages.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dgm_eit.errors import InputError
from dgm_eit.methods import Method, register_method
from dgm_eit.models.base import DataInfo, GenerativeModel, check_inputs, disk_mask

register_method(Method("unet", "U-Net", model="unet", cost=1))

OUTPUTS = ("regression", "classes")
# relative conductivity (sigma / background) below the first cut is resistive, above the second
# conductive: the midpoints between water (1) and the clipped extremes of the tank's images (0, 2)
CLASS_CUTS = (0.5, 1.5)
CLASS_VALUES = (1.0, 0.0, 2.0)   # water, resistive, conductive


def class_targets(sigma):
    """Relative-conductivity images (array or tensor) -> their classes: 0 water, 1 resistive, 2 conductive."""
    return (sigma < CLASS_CUTS[0]) * 1 + (sigma > CLASS_CUTS[1]) * 2


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU())


class UNetBackbone(nn.Module):
    """Images (B,C,H,W) -> (B,out,H,W): one resolution level per entry of ``channels`` (average-pool
    down, nearest up, skip connections), the output layer zeroed so that training starts from
    the identity of the residual it predicts."""

    def __init__(self, channels: list[int], out_channels: int = 1, in_channels: int = 1):
        super().__init__()
        self.down = nn.ModuleList()
        cin = in_channels
        for c in channels:
            self.down.append(_conv_block(cin, c))
            cin = c
        self.up = nn.ModuleList(_conv_block(c_deep + c_skip, c_skip)
                                for c_deep, c_skip in zip(channels[:0:-1], channels[-2::-1]))
        self.out = nn.Conv2d(channels[0], out_channels, 1)
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
    """``recon = GN + UNet(GN)`` on normalised images, or the expectation of its class
    probabilities; ``cfg`` is the ``[unet]`` section. Its one training stage is called
    ``regression`` whatever the output."""

    name: ClassVar[str] = "unet"
    stages: ClassVar[tuple[str, ...]] = ("regression",)
    needs_gn: ClassVar[bool] = True
    data_keys: ClassVar[tuple[str, ...]] = ("sigma", "gn")

    @classmethod
    def reads_extra(cls, cfg: dict) -> bool:
        return "extra" in check_inputs(cfg, "unet")

    def __init__(self, cfg: dict, info: DataInfo):
        super().__init__(cfg, info)
        channels = [int(c) for c in cfg["channels"]]
        if not channels or min(channels) < 1:
            raise InputError(f"unet.channels must list positive channel counts, got {cfg['channels']}")
        if info.image_size % 2 ** (len(channels) - 1):
            raise InputError(f"image size {info.image_size} cannot be halved {len(channels) - 1} times "
                             f"(unet.channels has {len(channels)} levels)")
        # a run trained before unet.output existed regressed
        self.output = cfg.get("output", "regression")
        if self.output not in OUTPUTS:
            raise InputError(f"unet.output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        self.net = UNetBackbone(channels, 1 if self.output == "regression" else len(CLASS_VALUES),
                                self.input_channels(cfg, info))
        self.register_buffer("sigma_mean", torch.tensor(float(info.sigma_mean)))
        self.register_buffer("sigma_std", torch.tensor(float(info.sigma_std)))
        # derived from the image size, so not saved with the weights
        self.register_buffer("inside", disk_mask(info.image_size).float(), persistent=False)

    def _truth(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``batch["sigma"]`` (B,H,W), shape checked."""
        size = self.info.image_size
        if "sigma" not in batch:
            raise InputError("the U-Net trains on the true image: the batch needs 'sigma'")
        if tuple(batch["sigma"].shape[1:]) != (size, size):
            raise InputError(f"batch['sigma'] has shape {tuple(batch['sigma'].shape)}, the model expects (B,{size},{size})")
        return batch["sigma"]

    def _inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The network's input channels (B,C,H,W), normalised: ``gn``, then ``gn_extra`` where ``inputs`` has it."""
        return (self.classical_images(batch) - self.sigma_mean) / self.sigma_std

    def _predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised images (B,1,H,W), 0 outside the disk."""
        x = self._inputs(batch)
        return (x[:, :1] + self.net(x)) * self.inside

    def loss(self, batch: dict[str, torch.Tensor], stage: str = "regression") -> torch.Tensor:
        if stage != "regression":
            raise InputError(f"the U-Net has one training stage 'regression', got {stage!r}")
        if self.output == "classes":
            logits = self.net(self._inputs(batch))
            target = class_targets(self._truth(batch)).long()   # relative conductivity: water is 1
            per_pixel = F.cross_entropy(logits, target, reduction="none")
            return (per_pixel * self.inside).sum() / (self.inside.sum() * len(per_pixel))
        target = (self._truth(batch)[:, None] - self.sigma_mean) / self.sigma_std * self.inside
        return F.mse_loss(self._predict(batch), target)

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor], *, n_samples: int | None = None,
                    generator: torch.Generator | None = None, **opts) -> dict:
        """Deterministic: ``n_samples`` and ``generator`` do not change the result."""
        was_training = self.training
        self.eval()
        try:
            if self.output == "classes":
                p = torch.softmax(self.net(self._inputs(batch)), dim=1)
                values = torch.tensor(CLASS_VALUES, dtype=p.dtype, device=p.device)
                return {"recon": torch.einsum("bchw,c->bhw", p, values) * self.inside, "nfe": 1}
            x = self._predict(batch)[:, 0]
        finally:
            self.train(was_training)
        return {"recon": (x * self.sigma_std + self.sigma_mean) * self.inside, "nfe": 1}
