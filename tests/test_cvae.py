import csv

import numpy as np
import pytest
import torch

from dgm_eit.config import load_config
from dgm_eit.errors import InputError
from dgm_eit.models import MODELS
from dgm_eit.models.base import DataInfo
from dgm_eit.models.cvae import CVAE


def _info(size: int, n_meas: int = 208) -> DataInfo:
    return DataInfo(image_size=size, n_meas=n_meas, v_mean=[0.0] * n_meas, v_std=[1.0] * n_meas,
                    sigma_mean=0.8, sigma_std=0.45)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_serves_the_cvae():
    assert MODELS["cvae"] is CVAE
    with pytest.raises(InputError, match="unknown model 'gan'"):
        MODELS["gan"]


def test_paper_architecture_shapes_and_parameter_counts():
    torch.manual_seed(0)
    model = CVAE(load_config("paper")["cvae"], _info(128))
    # Seo et al. / the reference code: about 0.94 M parameters in the VAE
    assert abs(_count(model.vae) - 0.94e6) <= 0.05 * 0.94e6
    # 208-256-128-64-32-16 regressor
    assert _count(model.regressor) == 208 * 256 + 256 + 256 * 128 + 128 + 128 * 64 + 64 + 64 * 32 + 32 + 32 * 16 + 16
    convs = [m for m in model.vae.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128]
    assert all(c.kernel_size == (5, 5) and c.stride == (2, 2) for c in convs)
    model.eval()
    x = torch.rand(2, 128, 128)
    mu, logvar = model.vae.encode(x)
    assert mu.shape == logvar.shape == (2, 16)
    assert model.vae.decode(mu).shape == (2, 128, 128)
    out = model.reconstruct({"v": torch.randn(3, 208)})
    assert out["recon"].shape == (3, 128, 128)
    assert out["nfe"] == 1


def test_quick_profile_architecture_works_at_32_pixels():
    cfg = load_config("quick")
    model = CVAE(cfg["cvae"], _info(cfg["data"]["image_size"]))
    sigma = torch.rand(4, 32, 32) * 1.5
    loss = model.loss({"sigma": sigma, "v": torch.randn(4, 208)}, "vae")
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.vae.encoder[0].weight.grad is not None


def test_image_size_must_fit_the_down_sampling_levels():
    cfg = load_config("smoke")["cvae"]
    with pytest.raises(InputError, match="not divisible by 2\\^4"):
        CVAE(cfg, _info(24))


def test_unknown_target_is_refused():
    cfg = dict(load_config("smoke")["cvae"], target="median")
    with pytest.raises(InputError, match="cvae.target must be one of mean, sample"):
        CVAE(cfg, _info(16))


def test_gn_conditioned_regressor_reads_the_gn_image_not_the_voltages():
    torch.manual_seed(0)
    cfg = load_config("smoke")["cvae"]
    with pytest.raises(InputError, match="cvae.condition must be one of v, gn"):
        CVAE(dict(cfg, condition="sigma"), _info(16))
    model = CVAE(dict(cfg, condition="gn"), _info(16))
    assert model.needs_gn and not CVAE(cfg, _info(16)).needs_gn
    # inputs are the image regressor's: the voltage MLP reads no images, whatever they say
    voltages = CVAE(dict(cfg, inputs=["gn", "extra"]), _info(16))
    assert not voltages.needs_gn and not voltages.needs_extra and "gn_extra" not in CVAE.data_keys_for(voltages.cfg)
    gn = 1 + 0.3 * torch.rand(3, 16, 16)
    a = model.reconstruct({"v": torch.randn(3, 208), "gn": gn})["recon"]
    b = model.reconstruct({"v": torch.randn(3, 208), "gn": gn})["recon"]
    c = model.reconstruct({"v": torch.randn(3, 208), "gn": gn.flip(-1)})["recon"]
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(InputError, match="cvae is conditioned on the classical image: the batch needs 'gn'"):
        model.reconstruct({"v": torch.randn(3, 208)})
    with pytest.raises(InputError, match=r"batch\['gn'\] has shape \(3, 8, 8\), the model expects \(B,16,16\)"):
        model.reconstruct({"gn": torch.rand(3, 8, 8)})


def test_runs_saved_before_condition_and_input_noise_load_as_the_voltage_mlp():
    cfg = dict(load_config("smoke")["cvae"])
    del cfg["condition"], cfg["input_noise"]
    model = CVAE(cfg, _info(16))
    assert model.condition == "v" and model.input_noise == 0 and not model.needs_gn


def test_input_noise_perturbs_regressor_training_only():
    torch.manual_seed(0)
    cfg = load_config("smoke")["cvae"]
    with pytest.raises(InputError, match="cvae.input_noise must be >= 0"):
        CVAE(dict(cfg, input_noise=-0.1), _info(16))
    batch = {"sigma": torch.rand(4, 16, 16), "v": torch.randn(4, 208)}
    clean = CVAE(dict(cfg, input_noise=0.0), _info(16))
    noisy = CVAE(dict(cfg, input_noise=0.5), _info(16))
    noisy.load_state_dict(clean.state_dict())
    for m in (clean, noisy):
        m.set_train_mode("regressor")
    assert torch.equal(clean.loss(batch, "regressor"), clean.loss(batch, "regressor"))
    assert not torch.equal(noisy.loss(batch, "regressor"), noisy.loss(batch, "regressor"))
    assert torch.equal(clean.reconstruct(batch)["recon"], noisy.reconstruct(batch)["recon"])


def test_regressor_targets_mean_or_sampled_latent():
    torch.manual_seed(0)
    cfg = load_config("smoke")["cvae"]
    sigma = torch.rand(4, 16, 16)
    mean_model = CVAE(dict(cfg, target="mean"), _info(16))
    mu, _ = mean_model.vae.eval().encode((sigma - mean_model.img_mean) / mean_model.img_std)
    assert torch.equal(mean_model.latent_target(sigma), mu)
    sample_model = CVAE(dict(cfg, target="sample"), _info(16))
    sample_model.load_state_dict(mean_model.state_dict())
    a, b = sample_model.latent_target(sigma), sample_model.latent_target(sigma)
    assert not torch.equal(a, b) and not torch.equal(a, mu)


def test_reconstruction_is_deterministic_and_non_negative():
    torch.manual_seed(0)
    model = CVAE(load_config("smoke")["cvae"], _info(16))
    model.train()   # reconstruct must switch to eval itself (dropout, BatchNorm) and restore
    v = torch.randn(5, 208)
    a = model.reconstruct({"v": v}, generator=torch.Generator().manual_seed(1))["recon"]
    b = model.reconstruct({"v": v}, n_samples=3, generator=torch.Generator().manual_seed(2))["recon"]
    assert torch.equal(a, b)
    assert model.training
    assert (a >= 0).all()


def test_wrong_voltage_length_is_a_clear_error():
    model = CVAE(load_config("smoke")["cvae"], _info(16))
    with pytest.raises(InputError, match="voltage vector has 100 values, the model expects 208"):
        model.reconstruct({"v": torch.randn(2, 100)})


def test_normalisation_statistics_travel_with_the_weights():
    info = DataInfo.from_arrays(np.full((3, 16, 16), 2.0) + np.arange(3)[:, None, None],
                                np.arange(3 * 208, dtype=float).reshape(3, 208))
    model = CVAE(load_config("smoke")["cvae"], info)
    state = model.state_dict()
    assert {"v_mean", "v_std", "img_mean", "img_std"} <= set(state)
    assert float(state["img_mean"]) == pytest.approx(3.0)


@pytest.mark.parametrize("condition", ["v", "gn"])
def test_both_stages_learn_on_a_tiny_data_set(tiny_dataset, tmp_path, condition):
    from dgm_eit.train import train

    cfg = load_config("smoke", ["train.threads=1", "cvae.vae.epochs=6", "cvae.regressor.epochs=6",
                                "cvae.vae.batch_size=8", "cvae.regressor.batch_size=8",
                                f"cvae.condition={condition}"])
    result = train("cvae", tiny_dataset, tmp_path / "run", cfg, seed=0, progress=False)
    assert result.completed
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for stage in ("vae", "regressor"):
        losses = [float(r["train_loss"]) for r in rows if r["stage"] == stage]
        assert len(losses) == 6
        assert losses[-1] < 0.8 * losses[0], (stage, losses)


def test_regressor_stage_leaves_the_vae_untouched(tiny_dataset, tmp_path):
    from dgm_eit.train import train

    cfg = load_config("smoke", ["train.threads=1", "cvae.vae.batch_size=8", "cvae.regressor.batch_size=8"])
    run = tmp_path / "run"
    # smoke: 2 VAE epochs of 3 steps; stop right at the stage boundary
    assert not train("cvae", tiny_dataset, run, cfg, stop_after_steps=6, progress=False).completed
    after_vae = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert train("cvae", tiny_dataset, run, cfg, progress=False).completed
    from safetensors.torch import load_file

    final = load_file(str(run / "model.safetensors"))
    vae_keys = [k for k in final if k.startswith("vae.")]
    assert any("running_mean" in k for k in vae_keys)   # BatchNorm statistics frozen too
    assert all(torch.equal(final[k], after_vae[k]) for k in vae_keys)
    assert not all(torch.equal(final[k], after_vae[k]) for k in final if k.startswith("regressor."))


def test_reconstruction_is_zero_outside_the_disk():
    from dgm_eit.models.base import disk_mask

    torch.manual_seed(0)
    model = CVAE(load_config("smoke")["cvae"], _info(16))
    recon = model.reconstruct({"v": torch.randn(3, 208)})["recon"]
    outside = ~disk_mask(16)
    assert outside.any() and torch.all(recon[:, outside] == 0)
    assert "inside" not in model.state_dict()   # derived from the size, not saved
