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
    p = torch.softmax(model.net(model._inputs(batch)), dim=1)
    torch.testing.assert_close(recon, (1 - p[:, 1] + p[:, 2]) * inside)


def test_the_regression_output_is_unchanged_and_a_bad_output_is_refused():
    model, batch = _model("regression"), _tank_like(4)
    # zeroed output layer: the residual is 0 and the image is the classical one
    torch.testing.assert_close(model.reconstruct(batch)["recon"], batch["gn"] * disk_mask(16))
    assert model.net.out.out_channels == 1 and _model("classes").net.out.out_channels == 3
    with pytest.raises(InputError, match="unet.output must be one of regression, classes"):
        _model("logits")



def _inputs_model(inputs, extra_images=2):
    cfg = load_config("ktc", ["unet.channels=[8,16]", "unet.inputs=" + str(inputs).replace("'", '"')])["unet"]
    torch.manual_seed(0)
    return UNetPostProcessing(cfg, DataInfo(16, 4, [0.0] * 4, [1.0] * 4, sigma_mean=0.8, sigma_std=0.5,
                                            extra_images=extra_images))


def test_the_extra_images_are_input_channels_the_network_learns_from():
    """A task only the extra images can solve: the truth is the class one of them shows; the
    classical image is the same water in every sample."""
    inside = disk_mask(16)
    n = 8
    water = torch.where(inside, 1.0, 0.0).expand(n, 16, 16)
    which = torch.arange(n) % 2                              # resistive or conductive, per image
    value = torch.where(which == 0, 0.05, 2.0)[:, None, None]
    sigma = torch.where(inside, value.expand(n, 16, 16), 0.0)
    batch = {"gn": water, "gn_extra": torch.stack([sigma, water], dim=1), "sigma": sigma}
    model = _inputs_model(["gn", "extra"])
    assert model.net.down[0][0].in_channels == 3
    assert UNetPostProcessing.data_keys_for(model.cfg) == ("sigma", "gn", "gn_extra")
    assert UNetPostProcessing.data_keys_for(_model("classes").cfg) == ("sigma", "gn")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    recon = model.reconstruct(batch)["recon"][:, inside]
    # every pixel of every image in its class (the image: 0 resistive, 2 conductive)
    assert torch.all(torch.where(which[:, None] == 0, recon < 0.5, recon > 1.5))
    # without them the same network cannot tell the two classes apart
    assert model.reconstruct({**batch, "gn_extra": torch.stack([water, water], dim=1)})["recon"].std(dim=0).max() < 1e-6


def test_bad_inputs_are_refused_naming_what_is_wrong():
    for inputs in (["extra"], ["gn", "gn"], ["gn", "level"], "gn"):
        cfg = {**load_config("ktc", ["unet.channels=[8,16]"])["unet"], "inputs": inputs}
        with pytest.raises(InputError, match=r"unet.inputs must be \['gn'\] or \['gn', 'extra'\]"):
            UNetPostProcessing(cfg, DataInfo(16, 4, [0.0] * 4, [1.0] * 4, sigma_mean=0.8, sigma_std=0.5))
    with pytest.raises(InputError, match="the data set has no extra classical images"):
        _inputs_model(["gn", "extra"], extra_images=0)
    model, batch = _inputs_model(["gn", "extra"]), _tank_like(2)
    with pytest.raises(InputError, match="batch needs 'gn_extra'"):
        model.reconstruct(batch)
    with pytest.raises(InputError, match=r"batch\['gn_extra'\] has shape \(2, 3, 16, 16\), the model expects \(B,2,16,16\)"):
        model.reconstruct({**batch, "gn_extra": torch.zeros(2, 3, 16, 16)})
