import json

import numpy as np
import pytest
import torch

from dgm_eit.config import load_config
from dgm_eit.errors import InputError
from dgm_eit.models.base import DataInfo
from dgm_eit.models.score import NCSNpp, ScoreModel, ScoreNetwork, build_backbone, disk_mask
from conftest import _circle_images

SIZE = 16


def small_cfg(**changes):
    cfg = load_config("smoke")["score"]
    cfg.update(changes)
    return cfg


def make_batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    sigma = _circle_images(rng, n, SIZE)
    gn = 0.6 * sigma + 0.4 * np.where(sigma > 0, 1.0, 0.0).astype(np.float32)
    v = rng.normal(size=(n, 208)).astype(np.float32)
    return {"sigma": torch.from_numpy(sigma), "gn": torch.from_numpy(gn), "v": torch.from_numpy(v)}


def make_model(seed=0, **changes):
    batch = make_batch(24, seed=1)
    info = DataInfo.from_arrays(batch["sigma"].numpy(), batch["v"].numpy())
    torch.manual_seed(seed)
    return ScoreModel(small_cfg(**changes), info)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_architecture_has_about_4_1_million_parameters():
    cfg = load_config("paper")["score"]
    net = build_backbone(cfg, 128)
    assert 0.9 * 4.1e6 <= n_params(net) <= 1.1 * 4.1e6


def test_narrow_nets_run_and_keep_the_image_shape():
    # group counts are capped, so widths that are not multiples of 32 still normalise
    net = NCSNpp(image_size=16, nf=6, ch_mult=(1, 3), num_res_blocks=1, attn_resolutions=(8,))
    out = net(torch.randn(2, 1, 16, 16), torch.zeros(2))
    assert out.shape == (2, 1, 16, 16)
    with pytest.raises(InputError, match="cannot be halved"):
        NCSNpp(image_size=20, ch_mult=(1, 2, 2, 2))


def test_network_output_is_scaled_by_one_over_sigma():
    torch.manual_seed(0)
    backbone = NCSNpp(image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    torch.nn.init.normal_(backbone.conv_out.weight)   # zero-initialised by design; make it visible
    net = ScoreNetwork(backbone)
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    expected = backbone(x, torch.log(sigma)) / sigma[:, None, None, None]
    assert torch.allclose(net(x, sigma), expected)
    assert float(expected.detach().abs().sum()) > 0


def test_dsm_loss_decreases_on_a_tiny_data_set():
    model = make_model()
    batch = make_batch(24, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def fixed_noise_loss():
        with torch.random.fork_rng():
            torch.manual_seed(123)
            with torch.no_grad():
                return float(sum(model.loss(batch, "score") for _ in range(4)) / 4)

    before = fixed_noise_loss()
    torch.manual_seed(0)
    for _ in range(30):
        opt.zero_grad()
        model.loss(batch, "score").backward()
        opt.step()
    after = fixed_noise_loss()
    assert after < 0.75 * before


@pytest.mark.parametrize("sampler", ["csd", "pc", "ode"])
def test_reconstruct_keeps_shapes_counts_nfe_and_repeats_with_a_seed(sampler):
    model = make_model().eval()
    batch = make_batch(3)
    opts = dict(sampler=sampler, n_steps=4, t0=0.4)
    a = model.reconstruct(batch, generator=torch.Generator().manual_seed(0), **opts)
    b = model.reconstruct(batch, generator=torch.Generator().manual_seed(0), **opts)
    assert a["recon"].shape == (3, SIZE, SIZE) and "recon_std" not in a
    assert torch.equal(a["recon"], b["recon"])
    assert a["nfe"] == {"csd": 8, "pc": 8, "ode": 7}[sampler]
    outside = disk_mask(SIZE) == 0
    assert torch.all(a["recon"][:, outside] == 0)


def test_several_samples_give_mean_and_std():
    model = make_model().eval()
    batch = make_batch(2)
    out = model.reconstruct(batch, n_samples=3, generator=torch.Generator().manual_seed(0),
                            sampler="csd", n_steps=3, t0=0.5, mode="ccdf")
    assert out["recon"].shape == out["recon_std"].shape == (2, SIZE, SIZE)
    assert float(out["recon_std"].max()) > 0
    assert out["nfe"] == 3 * 3 * 2   # samples x steps x (predictor + corrector)


def test_csd_from_t0_zero_returns_the_gauss_newton_image():
    model = make_model().eval()
    batch = make_batch(2)
    out = model.reconstruct(batch, sampler="csd", t0=0.0, generator=torch.Generator().manual_seed(0))
    assert out["nfe"] == 0
    assert torch.allclose(out["recon"], batch["gn"], atol=1e-5)


def test_settings_come_from_config_then_tuned_file_then_options(tmp_path):
    from dgm_eit.models.posterior import SamplingSettings
    from dgm_eit.reconstruct import run_options
    from dgm_eit.runs import tuned_sampling

    section = dict(load_config("smoke")["csd"], t0=0.3, n_steps=7)
    assert SamplingSettings.resolve(section).t0 == 0.3
    assert tuned_sampling(tmp_path) == {}
    (tmp_path / "tuned_csd.json").write_text(json.dumps({"best": {"t0": 0.25, "n_steps": 5}}))
    got = SamplingSettings.resolve(section, run_options(tmp_path, {"csd": section}, {}))
    assert (got.t0, got.n_steps) == (0.25, 5)
    got = SamplingSettings.resolve(section, run_options(tmp_path, {"csd": section}, {"t0": 0.1, "sampler": None}))
    assert (got.t0, got.n_steps, got.sampler) == (0.1, 5, "csd")


def test_guided_reconstruction_with_a_linear_operator_runs():
    model = make_model().eval()
    batch = make_batch(2)
    A = torch.randn(SIZE * SIZE, 208, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    class Linear(torch.nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0], -1).to(torch.float64) @ A

    out = model.reconstruct(batch, sampler="dps", n_steps=3, t0=0.3, zeta=0.01, corrector_steps=0,
                            operator=Linear(), generator=torch.Generator().manual_seed(0))
    assert out["recon"].shape == (2, SIZE, SIZE) and out["nfe"] == 3


def test_guided_step_lowers_the_data_misfit_on_a_tiny_mesh():
    pytest.importorskip("dgm_eit.physics")
    from dgm_eit.models.posterior import posterior_sampler
    from dgm_eit.models.samplers import measurement_guidance
    from dgm_eit.physics import operator_from_config

    config = load_config("smoke", ["mesh.h0=0.3"])
    op = operator_from_config(config, SIZE)
    model = make_model().eval()
    batch = make_batch(2)
    v = op(batch["sigma"].to(torch.float64))
    misfit = posterior_sampler(model, {"config": config, "sampler": "dps"}).data_misfit(v)
    x = model.normalise_image(batch["gn"])[:, None]
    t = torch.full((2,), 0.3)
    guidance = measurement_guidance(model.sde, model.score, misfit, zeta=1e-3)
    with torch.no_grad():
        before = misfit(model.sde.denoise(x, model.score(x, t), t))
        _, grad, _ = guidance(x, 0.3)
        x_new = x - grad
        after = misfit(model.sde.denoise(x_new, model.score(x_new, t), t))
    assert float(grad.abs().max()) > 0
    assert (after < before).all()


def test_bad_input_is_refused():
    model = make_model().eval()
    batch = make_batch(2)
    with pytest.raises(InputError, match=r"batch\['gn'\] has shape"):
        model.reconstruct({**batch, "gn": torch.zeros(2, 8, 8)}, sampler="csd")
    with pytest.raises(InputError, match="needs 'gn'"):
        model.reconstruct({"v": batch["v"]}, sampler="csd")
    with pytest.raises(InputError, match="unknown sampler"):
        model.reconstruct(batch, sampler="nope")
    with pytest.raises(InputError, match="EIT operator"):
        model.reconstruct(batch, sampler="dps", n_steps=2)
    with pytest.raises(InputError, match="one training stage"):
        model.loss(batch, "flow")


def test_trained_with_the_shared_trainer_then_tuned_and_reloaded(tmp_path, tiny_dataset):
    train = pytest.importorskip("dgm_eit.train")
    from dgm_eit.cli import main
    from dgm_eit.reconstruct import run_options
    from dgm_eit.runs import load_run

    # one thread: the suite shares a small machine, and oversubscribed threads crawl
    cfg = load_config("smoke", ["csd.n_steps=3", "train.threads=1", "score.score.epochs=1"])
    run = tmp_path / "run"
    train.train("score", tiny_dataset, run, cfg, seed=0, device="cpu", progress=False)
    model, full_cfg, info = load_run(run)
    assert isinstance(model, ScoreModel) and info.image_size == 16
    batch = make_batch(2)
    out = model.reconstruct(batch, generator=torch.Generator().manual_seed(0), **run_options(run, full_cfg, {}))
    assert out["recon"].shape == (2, SIZE, SIZE)
    assert out["nfe"] == 3 * (1 + full_cfg["csd"]["corrector_steps"])

    args = ["tune-t0", "--run", str(run), "--data", str(tiny_dataset), "--t0", "0,0.3", "--steps", "2",
            "--n-val", "4", "--seed", "1"]
    assert main(args) == 0
    tuned = json.loads((run / "tuned_csd.json").read_text())
    assert len(tuned["table"]) == 2 and tuned["n_val"] == 4
    assert tuned["best"]["t0"] in (0.0, 0.3) and tuned["best"]["n_steps"] == 2
    # t0 = 0 is the GN image itself: its row must equal the GN score
    # t0 = 0 is the GN image itself (zeroed outside the disk, as every recon of the model)
    import h5py

    with h5py.File(tiny_dataset) as f:
        gn, truth = f["val"]["gn"][:4], f["val"]["sigma"][:4]
    expected = float(np.mean((gn * disk_mask(SIZE).numpy() - truth) ** 2))
    gn_row = next(r for r in tuned["table"] if r["t0"] == 0.0)
    assert gn_row["nfe"] == 0 and gn_row["mse"] == pytest.approx(expected, rel=1e-5)
    out = model.reconstruct(batch, generator=torch.Generator().manual_seed(0), **run_options(run, full_cfg, {}))
    assert out["nfe"] == (0 if tuned["best"]["t0"] == 0 else 2 * (1 + full_cfg["csd"]["corrector_steps"]))
    assert main(["tune-t0", "--run", str(run), "--data", str(tiny_dataset), "--t0", "1.5"]) == 2


def test_tune_t0_picks_the_cheapest_setting_within_the_tolerance():
    from dgm_eit.tuning import default_t0_grid, pick_best

    rows = [{"nfe": 900, "mse": 0.0060}, {"nfe": 100, "mse": 0.0062}, {"nfe": 20, "mse": 0.0070}]
    assert pick_best(rows)["nfe"] == 900
    assert pick_best(rows, tolerance=0.05)["nfe"] == 100
    assert pick_best(rows, tolerance=0.2)["nfe"] == 20
    grid = default_t0_grid(0.4)
    assert 0.4 in grid and all(0 < t < 1 for t in grid) and grid == sorted(grid)


def test_the_vp_sde_serves_the_same_model_and_samplers():
    model = make_model(sde="vp").eval()
    batch = make_batch(2)
    loss = model.loss(batch, "score")
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    for sampler in ("csd", "ode"):
        a = model.reconstruct(batch, sampler=sampler, n_steps=3, t0=0.4, generator=torch.Generator().manual_seed(0))
        b = model.reconstruct(batch, sampler=sampler, n_steps=3, t0=0.4, generator=torch.Generator().manual_seed(0))
        assert a["recon"].shape == (2, SIZE, SIZE) and torch.equal(a["recon"], b["recon"])
    out = model.reconstruct(batch, sampler="csd", t0=0.0)
    assert torch.allclose(out["recon"], batch["gn"], atol=1e-5)
