"""The U-Net's two outputs: regression to the truth, or three classes by cross-entropy whose
image is their expected relative conductivity (what the KTC study segments)."""

import numpy as np
import pytest
import torch

from dgm_eit.config import load_config
from dgm_eit.errors import InputError
from dgm_eit.models.base import DataInfo, disk_mask
from dgm_eit.models.unet import UNetPostProcessing


def _tank_like(n: int, size: int = 16, seed: int = 0) -> dict:
    """Water (1) with one resistive (0.05) and one conductive (2) square; the classical image a
    blurred, shrunk copy of it, as a linearised step gives."""
    rng = np.random.default_rng(seed)
    inside = disk_mask(size).numpy()
    sigma = np.where(inside, 1.0, 0.0)[None].repeat(n, axis=0)
    for img in sigma:
        for value in (0.05, 2.0):
            r, c = rng.integers(4, size - 8, 2)
            img[r:r + 4, c:c + 4] = np.where(inside[r:r + 4, c:c + 4], value, 0.0)
    gn = np.where(inside, 1.0 + 0.3 * (sigma - 1.0) + 0.2 * (np.roll(sigma, 1, axis=2) - 1.0), 0.0)
    return {"sigma": torch.tensor(sigma, dtype=torch.float32), "gn": torch.tensor(gn, dtype=torch.float32)}


def _model(output: str) -> UNetPostProcessing:
    cfg = load_config("smoke", [f"unet.output={output}", "unet.channels=[8,16]"])["unet"]
    torch.manual_seed(0)
    return UNetPostProcessing(cfg, DataInfo(16, 4, [0.0] * 4, [1.0] * 4, sigma_mean=0.8, sigma_std=0.5))


def test_the_class_output_learns_the_three_classes_and_returns_their_expected_conductivity():
    model, batch = _model("classes"), _tank_like(8)
    inside = disk_mask(16)
    before = model.reconstruct(batch)["recon"]
    # the zeroed output layer starts at equal class probabilities: the expectation is water
    torch.testing.assert_close(before[:, inside], torch.ones_like(before[:, inside]))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    first = model.loss(batch).item()
    for _ in range(150):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    recon = model.reconstruct(batch)["recon"]
    assert torch.all(recon[:, ~inside] == 0) and recon.min() >= 0 and recon.max() <= 2
    truth = batch["sigma"]
    classes = (recon < 0.5) * 1 + (recon > 1.5) * 2
    expected = (truth < 0.5) * 1 + (truth > 1.5) * 2
    assert (classes == expected)[:, inside].float().mean() > 0.95
    # the image is 1 - p(resistive) + p(conductive)
    p = torch.softmax(model.net(model._images(batch, "gn")), dim=1)
    torch.testing.assert_close(recon, (1 - p[:, 1] + p[:, 2]) * inside)


def test_the_regression_output_is_unchanged_and_a_bad_output_is_refused():
    model, batch = _model("regression"), _tank_like(4)
    # zeroed output layer: the residual is 0 and the image is the classical one
    torch.testing.assert_close(model.reconstruct(batch)["recon"], batch["gn"] * disk_mask(16))
    assert model.net.out.out_channels == 1 and _model("classes").net.out.out_channels == 3
    with pytest.raises(InputError, match="unet.output must be one of regression, classes"):
        _model("logits")
