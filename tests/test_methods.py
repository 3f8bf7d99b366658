"""The contract every registered model and method keeps, so a new one is checked by these tests
alone: it is configured in every profile, trains with the shared trainer, saves, loads, and
reconstructs through the same path as ``dgm-eit run``."""

import csv

import numpy as np
import pytest
import torch

from dgm_eit.cli import main
from dgm_eit.config import STUDY_PROFILES, load_config
from dgm_eit.errors import InputError
from dgm_eit.methods import GAUSS_NEWTON, all_methods, get_method, select_methods
from dgm_eit.models import MODEL_NAMES, MODELS
from dgm_eit.reconstruct import reconstruct_split
from dgm_eit.results import read_recon, recon_file_problem
from dgm_eit.runs import load_run
from dgm_eit.train import STAGE_KEYS, train

METHODS = all_methods()


def test_every_method_names_a_model_and_config_keys_of_every_study_profile():
    assert METHODS[0] == GAUSS_NEWTON and GAUSS_NEWTON.model is None
    assert len({m.key for m in METHODS}) == len({m.name for m in METHODS}) == len(METHODS)
    for profile in STUDY_PROFILES:
        cfg = load_config(profile)
        for method in METHODS:
            if method.model is None:
                continue
            assert method.model in MODEL_NAMES
            assert method.model in cfg, f"{profile} has no [{method.model}] section"
            for stage in MODELS[method.model].stages:
                assert set(STAGE_KEYS) <= set(cfg[method.model][stage]), f"{profile}: [{method.model}.{stage}]"
            for key in (method.samples_key, method.sampler_key):
                assert key is None or key in cfg["run"], f"{profile} has no run.{key}"
    assert set(MODEL_NAMES) == {m.model for m in METHODS if m.model is not None}


def test_an_unknown_method_is_refused_naming_the_choices():
    with pytest.raises(InputError, match=r"run.methods: unknown method\(s\) \['gan'\]; choose from gn, cvae, .*unet"):
        select_methods(["gn", "gan"])
    with pytest.raises(InputError, match="choose from"):
        get_method("gan")
    assert [m.key for m in select_methods(["csd", "gn"])] == ["gn", "csd"]   # table order


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run per model, trained on demand with the shared trainer."""
    from conftest import write_tiny_dataset

    root = tmp_path_factory.mktemp("contract")
    data = write_tiny_dataset(root / "tiny.h5")
    cfg = load_config("smoke", ["train.threads=1", "train.progress=false", "csd.n_steps=2", "mesh.h0=0.3"])
    for model in MODEL_NAMES:
        for stage in MODELS[model].stages:
            cfg[model][stage].update(epochs=1, batch_size=8)
    runs = {}

    def run_of(model: str):
        if model not in runs:
            result = train(model, data, root / model, cfg, seed=0, device="cpu", progress=False)
            assert result.completed and result.step > 0
            runs[model] = root / model
        return runs[model]

    return data, cfg, run_of


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_every_model_trains_saves_and_loads_the_same_weights(trained, model):
    _, _, run_of = trained
    run = run_of(model)
    first, cfg, info = load_run(run)
    again, _, _ = load_run(run)
    assert first.name == model and info.image_size == 16
    for (key, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    best, _, _ = load_run(run, weights="best")
    assert set(best.state_dict()) == set(first.state_dict())


@pytest.mark.parametrize("method", [m for m in METHODS if m.model is not None], ids=lambda m: m.key)
def test_every_method_reconstructs_as_the_runner_asks_it_to(trained, method, tmp_path):
    data, cfg, run_of = trained
    run, settings = run_of(method.model), cfg["run"]
    n_samples, sampler = method.n_samples(settings), method.sampler(settings)
    opts = {"config": cfg} if sampler is not None else {}
    out = tmp_path / f"{method.key}.h5"
    result = reconstruct_split(run, data, "test", out, n_samples=n_samples, sampler=sampler, seed=3, limit=3,
                               **opts)
    assert recon_file_problem(out) is None
    recon, std = read_recon(out)
    assert recon.shape == (3, 16, 16) and np.isfinite(recon).all()
    np.testing.assert_array_equal(recon, result["recon"])
    if method.std_map and (n_samples or 1) > 1:
        assert std is not None and std.shape == recon.shape
    again = reconstruct_split(run, data, "test", n_samples=n_samples, sampler=sampler, seed=3, limit=3, **opts)
    np.testing.assert_array_equal(again["recon"], recon)   # a seed fixes the result


def test_a_method_added_through_the_registry_runs_in_the_pipeline(tmp_path):
    """The U-Net baseline was added by its model file, one registry entry and profile keys only."""
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--profile", "smoke", "--seed", "0", "--set", "train.progress=false",
                 "--set", 'run.tests=["T1"]', "--set", 'run.methods=["gn", "unet"]']) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "MSE"]
    assert {(r["method"], r["train_set"], r["test_set"]) for r in rows} == {
        ("GN", "none", "2a_40dB"), ("GN", "none", "4a_40dB"),
        ("U-Net", "2a_40dB", "2a_40dB"), ("U-Net", "4a_40dB", "4a_40dB")}
    report = (out / "report.md").read_text()
    assert "| U-Net | 2a_40dB |" in report                           # its efficiency row
    assert "U-Net yes" in report or "U-Net **no**" in report       # and its verdict against GN
    assert (out / "runs" / "unet_2a_40dB" / "model.safetensors").is_file()
