"""What the trainer and the reconstructor know about a model: nothing but this interface."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from dgm_eit.errors import InputError

# what a model conditioned on the classical image may take as input channels (``<model>.inputs``):
# the image ``gn`` alone, or with the data set's classical images at other settings (``gn_extra``)
INPUTS = (["gn"], ["gn", "extra"])


def check_inputs(cfg: dict, section: str) -> list[str]:
    """``<section>.inputs`` of a model's config section: one of :data:`INPUTS`."""
    inputs = cfg.get("inputs", ["gn"])   # a run trained before the key existed took gn alone
    if inputs not in INPUTS:
        raise InputError(f"{section}.inputs must be {' or '.join(map(str, INPUTS))}, got {inputs!r}")
    return inputs


def disk_mask(size: int) -> torch.Tensor:
    """(size, size) bool: pixels whose centre lies in the closed unit disk, on the [-1,1]^2
    grid with y up, the rule of ``PixelGrid.inside``; the images are 0 outside it."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(-c, c, indexing="ij")
    return x**2 + y**2 <= 1.0


@dataclass
class DataInfo:
    """Shapes and normalisation statistics of the training split, saved in the run dir."""

    image_size: int
    n_meas: int
    v_mean: list[float]
    v_std: list[float]
    sigma_mean: float
    sigma_std: float
    sigma_min: float | None = None    # the training images' range (None in runs made before it was recorded)
    sigma_max: float | None = None
    extra_images: int = 0             # classical images at other settings per sample (gn_extra)

    @classmethod
    def from_arrays(cls, sigma: np.ndarray, v: np.ndarray, extra: np.ndarray | None = None) -> "DataInfo":
        sigma = np.asarray(sigma, dtype=np.float64)
        v = np.asarray(v, dtype=np.float64)
        v_std = v.std(axis=0)
        # a measurement that never varies (possible on tiny sets) must not divide by zero
        v_std = np.where(v_std > 1e-12, v_std, 1.0)
        return cls(
            image_size=int(sigma.shape[-1]),
            n_meas=int(v.shape[-1]),
            v_mean=v.mean(axis=0).tolist(),
            v_std=v_std.tolist(),
            sigma_mean=float(sigma.mean()),
            sigma_std=float(sigma.std() or 1.0),
            sigma_min=float(sigma.min()),
            sigma_max=float(sigma.max()),
            extra_images=0 if extra is None else int(extra.shape[1]),
        )

    def save(self, path: str | Path) -> None:
        from dgm_eit.files import write_text

        write_text(path, json.dumps(asdict(self)))   # atomic: a kill never leaves half a file

    @classmethod
    def load(cls, path: str | Path) -> "DataInfo":
        return cls(**json.loads(Path(path).read_text()))


class GenerativeModel(nn.Module):
    """A reconstructor trained by :mod:`dgm_eit.train`.

    ``batch`` dicts hold raw physical units: ``sigma`` (B,H,W), ``v`` (B,M), ``gn`` (B,H,W).
    A model normalises internally with buffers it registers, so its saved weights carry
    the statistics and raw user voltages can be reconstructed.
    """

    name: ClassVar[str]
    stages: ClassVar[tuple[str, ...]] = ("main",)
    uses_ema: ClassVar[bool] = False
    # reconstruct() reads batch["gn"]; for user voltages the reconstructor computes it
    needs_gn: ClassVar[bool] = False
    # split arrays the trainer loads into batches (drop the ones a model never reads)
    data_keys: ClassVar[tuple[str, ...]] = ("sigma", "v", "gn")
    # reconstruct() reads batch["gn_extra"] (the data set's classical images at other settings)
    needs_extra: bool = False

    @classmethod
    def data_keys_for(cls, cfg: dict) -> tuple[str, ...]:
        """The split arrays a model of this config reads (``cfg``: its config section)."""
        return cls.data_keys + ("gn_extra",) * cls.reads_extra(cfg)

    @classmethod
    def reads_extra(cls, cfg: dict) -> bool:
        """Whether a model of this config section takes ``gn_extra`` (override where it can)."""
        return False

    def __init__(self, cfg: dict, info: DataInfo):
        super().__init__()
        self.cfg = cfg
        self.info = info
        self.register_buffer("v_mean", torch.tensor(info.v_mean, dtype=torch.float32))
        self.register_buffer("v_std", torch.tensor(info.v_std, dtype=torch.float32))

    def input_channels(self, cfg: dict, info: DataInfo) -> int:
        """Sets :attr:`needs_extra` from ``cfg`` (the model's section) and returns how many
        classical images :meth:`classical_images` stacks: 1, or 1 + the data set's extra ones."""
        self.needs_extra = self.reads_extra(cfg)
        if self.needs_extra and not info.extra_images:
            raise InputError(f"{self.name}.inputs has 'extra', but the data set has no extra classical "
                             "images (linear.extra_images is empty)")
        return 1 + info.extra_images * self.needs_extra

    def classical_images(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,C,H,W) in raw units: ``batch["gn"]``, then ``batch["gn_extra"]`` where the model reads it."""
        size = self.info.image_size
        parts = [("gn", (size, size))] + [("gn_extra", (self.info.extra_images, size, size))] * self.needs_extra
        images = []
        for key, shape in parts:
            if key not in batch:
                raise InputError(f"{self.name} is conditioned on the classical image: the batch needs {key!r}")
            if tuple(batch[key].shape[1:]) != shape:
                raise InputError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, the model expects "
                                 f"(B,{','.join(map(str, shape))})")
            images.append(batch[key].reshape(len(batch[key]), -1, size, size))
        return torch.cat(images, dim=1)

    def normalise_v(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[-1] != self.info.n_meas:
            raise InputError(f"voltage vector has {v.shape[-1]} values, the model expects {self.info.n_meas}")
        return (v - self.v_mean) / self.v_std

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def stage_config(self, stage: str) -> dict:
        """Training settings of one stage: the ``[<model>.<stage>]`` table of the config."""
        return self.cfg[stage]

    def set_train_mode(self, stage: str) -> None:
        """Called by the trainer before each training epoch of ``stage``.

        Override to keep frozen sub-networks in eval mode (BatchNorm statistics, dropout).
        """
        self.train()

    def loss(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, torch.Tensor], *, n_samples: int = 1,
                    generator: torch.Generator | None = None, **opts) -> dict:
        """Return ``{"recon": (B,H,W), "nfe": int}`` and optionally ``"recon_std"``."""
        raise NotImplementedError
