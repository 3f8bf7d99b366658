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
        return cls.data_keys

    def __init__(self, cfg: dict, info: DataInfo):
        super().__init__()
        self.cfg = cfg
        self.info = info
        self.register_buffer("v_mean", torch.tensor(info.v_mean, dtype=torch.float32))
        self.register_buffer("v_std", torch.tensor(info.v_std, dtype=torch.float32))

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
