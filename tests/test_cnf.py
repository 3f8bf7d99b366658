"""Conditional normalizing flow: invertibility, exact log-determinant, learning, seeded sampling."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch

from dgm_eit.config import load_config
from dgm_eit.errors import InputError
from dgm_eit.models.base import DataInfo
from dgm_eit.models.cnf import CNF, disk_mask


def _info(size: int, n_meas: int = 208, sigma_mean: float = 0.8, sigma_std: float = 0.45) -> DataInfo:
    return DataInfo(size, n_meas, [0.1] * n_meas, [2.0] * n_meas, sigma_mean, sigma_std)


def _cfg(**overrides) -> dict:
    cfg = load_config("smoke")["cnf"]
    cfg.update(overrides)
    return cfg


def _perturb(model: torch.nn.Module, scale: float, seed: int = 0) -> None:
    """Random weights everywhere: couplings start as the identity, which would test nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for name, buf in model.named_buffers():
            if name.endswith("initialised"):
                buf.fill_(True)


def _batch(size: int, n: int, seed: int = 0, n_meas: int = 208) -> dict:
    gen = torch.Generator().manual_seed(seed)
    inside = disk_mask(size).float()
    sigma = (0.5 + torch.rand(n, size, size, generator=gen)) * inside
    return {"sigma": sigma, "gn": (0.6 * sigma + 0.4) * inside,
            "v": torch.randn(n, n_meas, generator=gen)}


def test_inverse_recovers_the_image_in_float32():
    torch.manual_seed(0)
    model = CNF(_cfg(condition_on_v=True, learned_mixing=True), _info(32))
    _perturb(model, 0.05)
    model.eval()
    batch = _batch(32, 4)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        maps, vector = model.condition(batch)
        z, logdet = model.to_latent(x, maps, vector)
        x_back = model.from_latent(z, maps, vector)
    assert z.shape == (4, 32 * 32) and logdet.shape == (4,)
    assert logdet.abs().max() > 1.0  # the perturbed flow is far from volume preserving
    assert (x_back - x).abs().max().item() <= 1e-4


@pytest.mark.parametrize("learned_mixing", [False, True])
def test_log_determinant_matches_brute_force_jacobian(learned_mixing):
    torch.manual_seed(1)
    cfg = _cfg(levels=1, blocks_per_level=2, hidden_channels=[8], cond_channels=[4],
               cond_vector=8, fc_blocks=2, fc_hidden=16, fc_dims=0, learned_mixing=learned_mixing,
               condition_on_v=True)
    model = CNF(cfg, _info(8, n_meas=6)).double()
    _perturb(model, 0.2, seed=2)
    # the fixed mixing matrices were drawn orthogonal in float32; the model counts their
    # log-determinant as 0, so make them orthogonal to float64 precision for this check
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "ChannelMixing" and not module.learned:
                q, r = torch.linalg.qr(module.weight)
                module.weight.copy_(q * torch.sign(torch.diagonal(r)))
    model.eval()
    batch = {k: v.double() for k, v in _batch(8, 1, n_meas=6).items()}
    maps, vector = model.condition(batch)

    def flow(flat):
        return model.to_latent(flat.view(1, 1, 8, 8), maps, vector)[0][0]

    x = torch.randn(64, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(flow, x)
    sign, brute = torch.linalg.slogdet(jac)
    logdet = model.to_latent(x.view(1, 1, 8, 8), maps, vector)[1][0]
    assert sign != 0 and abs(brute.item()) > 1.0
    assert logdet.item() == pytest.approx(brute.item(), abs=1e-8)


def _read_split(path, split):
    with h5py.File(path, "r") as f:
        return {k: torch.from_numpy(np.asarray(f[split][k])) for k in ("sigma", "v", "gn")}


def test_nll_decreases_on_the_tiny_dataset(tiny_dataset):
    train = _read_split(tiny_dataset, "train")
    val = _read_split(tiny_dataset, "val")
    info = DataInfo.from_arrays(train["sigma"].numpy(), train["v"].numpy())
    torch.manual_seed(0)
    model = CNF(_cfg(levels=2, hidden_channels=[16, 16], cond_channels=[8, 8], fc_dims=0), info)

    def val_nll():
        model.eval()
        torch.manual_seed(123)  # the same dequantisation noise for both evaluations
        with torch.no_grad():
            return model.loss(val, "flow").item()

    model.train()
    model.loss(train, "flow")  # ActNorm's data-dependent initialisation
    before = val_nll()
    opt = torch.optim.Adam(model.stage_parameters("flow"), lr=1e-3, weight_decay=1e-5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        model.train()
        idx = torch.randperm(len(train["sigma"]), generator=gen)[:8]
        loss = model.loss({k: v[idx] for k, v in train.items()}, "flow")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    after = val_nll()
    assert math.isfinite(after)
    assert after < before - 0.2, (before, after)


def test_sampling_is_seeded_and_masks_the_outside():
    torch.manual_seed(0)
    model = CNF(_cfg(), _info(32))
    _perturb(model, 0.02)
    model.eval()
    batch = _batch(32, 3)
    run = lambda seed, **kw: model.reconstruct(batch, generator=torch.Generator().manual_seed(seed), **kw)
    a, b, c = run(5, n_samples=4), run(5, n_samples=4), run(6, n_samples=4)
    assert torch.equal(a["recon"], b["recon"]) and torch.equal(a["recon_std"], b["recon_std"])
    assert not torch.equal(a["recon"], c["recon"])
    assert a["recon"].shape == (3, 32, 32) and a["recon_std"].shape == (3, 32, 32) and a["nfe"] == 4
    outside = ~disk_mask(32)
    assert a["recon"][:, outside].abs().max() == 0 and a["recon_std"][:, outside].abs().max() == 0
    assert a["recon_std"][:, ~outside].min() > 0
    # chunked sampling covers every (image, sample) row; the default K comes from the config
    d = run(5, max_rows=5)
    assert d["nfe"] == model.cfg["n_samples"] and torch.isfinite(d["recon"]).all()
    # a lower temperature shrinks the spread of the samples
    cold = run(5, n_samples=8, temperature=0.3)
    warm = run(5, n_samples=8, temperature=1.0)
    assert cold["recon_std"].mean() < warm["recon_std"].mean()


def test_paper_configuration_has_about_4_8_million_parameters():
    cfg = load_config("paper")["cnf"]
    model = CNF(cfg, _info(128))
    n_params = sum(p.numel() for p in model.parameters())
    assert 4.8e6 * 0.9 <= n_params <= 4.8e6 * 1.1, n_params
    assert len(model.level_steps) == 3 and all(len(level) == 2 for level in model.level_steps)


def test_bad_input_is_refused():
    with pytest.raises(InputError, match="divisible"):
        CNF(_cfg(levels=3), _info(20))
    with pytest.raises(InputError, match="one per level"):
        CNF(_cfg(hidden_channels=[8, 8]), _info(32))
    model = CNF(_cfg(), _info(32))
    batch = _batch(32, 2)
    with pytest.raises(InputError, match="gn"):
        model.reconstruct({"gn": batch["gn"][:, :16]})
    with pytest.raises(InputError, match="stage"):
        model.loss(batch, "vae")
    with pytest.raises(InputError, match="n_samples"):
        model.reconstruct(batch, n_samples=0)


def test_trains_with_the_shared_trainer_and_reloads(tiny_dataset, tmp_path):
    from dgm_eit.runs import load_run
    from dgm_eit.train import train

    cfg = load_config("smoke", ["train.threads=1", "train.progress=false", "cnf.flow.epochs=2"])
    result = train("cnf", tiny_dataset, tmp_path / "run", cfg, seed=3)
    assert result.completed
    model, _, info = load_run(tmp_path / "run")
    assert info.image_size == 16
    batch = _read_split(tiny_dataset, "test")
    out1 = model.reconstruct(batch, n_samples=3, generator=torch.Generator().manual_seed(0))
    out2 = model.reconstruct(batch, n_samples=3, generator=torch.Generator().manual_seed(0))
    assert out1["recon"].shape == batch["sigma"].shape and out1["nfe"] == 3
    assert torch.equal(out1["recon"], out2["recon"]) and torch.isfinite(out1["recon"]).all()
    # the ActNorm initialisation is part of the saved weights
    assert all(bool(b) for name, b in model.named_buffers() if name.endswith("initialised"))


def test_samples_are_clipped_to_the_training_range_before_their_mean_and_std():
    info = DataInfo(**{**_info(16).__dict__, "sigma_min": 0.5, "sigma_max": 1.5})
    batch = {"gn": torch.ones(2, 16, 16)}
    inside = disk_mask(16).bool()
    out = {}
    for clip in (True, False):
        torch.manual_seed(0)
        model = CNF(_cfg(clip_samples=clip), info).eval()
        # a hot latent sends the samples far outside the training range, as a flow's tail can
        out[clip] = model.reconstruct(batch, n_samples=8, generator=torch.Generator().manual_seed(1), temperature=10.0)
    recon = out[True]["recon"][:, inside]
    assert recon.min() >= 0.5 and recon.max() <= 1.5
    assert out[False]["recon"][:, inside].abs().max() > 1.5     # without clipping they stay out
    # the sample std (ddof 1) of 8 values within [0.5, 1.5] is at most 0.5 sqrt(8/7)
    assert out[True]["recon_std"].max() <= 0.5 * math.sqrt(8 / 7) + 1e-6
    # a run made before the range was recorded reconstructs unclipped
    assert not CNF(_cfg(clip_samples=True), _info(16)).clip_samples
