"""The contract every registered model and method keeps, so a new one is checked by these tests
alone: it is configured in every profile, trains with the shared trainer, saves, loads,
reconstructs through the same path as ``dgm-eit run``, and runs in both studies (the paper's
smoke pipeline and the tiny KTC study) or is refused by a study up front, saying why."""

import csv
import json
import re
import shutil

import numpy as np
import pytest
import torch

from dgm_eit.cli import main
from dgm_eit.config import STUDY_PROFILES, load_config
from dgm_eit.errors import InputError
from dgm_eit.methods import GAUSS_NEWTON, LINEARISED, all_methods, get_method, select_methods
from dgm_eit.models import MODEL_NAMES, MODELS
from dgm_eit.reconstruct import reconstruct_split
from dgm_eit.results import read_recon, recon_file_problem
from dgm_eit.runs import load_run
from dgm_eit.train import STAGE_KEYS, train

METHODS = all_methods()


def test_every_method_names_a_model_and_config_keys_of_every_study_profile():
    assert [m for m in METHODS if m.model is None] == list(METHODS[:2]) == [LINEARISED, GAUSS_NEWTON]
    assert (LINEARISED.classical, GAUSS_NEWTON.classical) == ("linear", "gn")
    assert len({m.key for m in METHODS}) == len({m.name for m in METHODS}) == len(METHODS)
    for profile in STUDY_PROFILES:
        cfg = load_config(profile)
        assert isinstance(cfg["run"]["seeds"], int) and cfg["run"]["seeds"] >= 1
        for method in METHODS:
            if method.model is None:
                continue
            assert method.model in MODEL_NAMES
            assert method.model in cfg, f"{profile} has no [{method.model}] section"
            for stage in MODELS[method.model].stages:
                assert set(STAGE_KEYS) <= set(cfg[method.model][stage]), f"{profile}: [{method.model}.{stage}]"
            for key in (method.samples_key, method.sampler_key):
                assert key is None or key in cfg["run"], f"{profile} has no run.{key}"
            method.configure(cfg)   # its own config values name keys of every profile
            assert method.sampler_key is None or method.fixed_sampler is None
    assert set(MODEL_NAMES) == {m.model for m in METHODS if m.model is not None}


def test_an_unknown_method_is_refused_naming_the_choices():
    with pytest.raises(InputError,
                       match=r"run.methods: unknown method\(s\) \['gan'\]; choose from linear, gn, cvae, .*unet$"):
        select_methods(["gn", "gan"])
    # the paper's study makes one classical image, GN: the linearised step is no choice there
    with pytest.raises(InputError, match=r"unknown method\(s\) \['linear'\]; choose from gn, cvae, .*unet$"):
        select_methods(["gn", "linear"], classical=("gn",))
    with pytest.raises(InputError, match="run.methods names no method"):
        select_methods([])
    with pytest.raises(InputError, match="choose from"):
        get_method("gan")
    assert [m.key for m in select_methods(["csd", "gn"])] == ["gn", "csd"]   # table order


def test_every_trained_method_has_a_seed_ensemble_that_comes_with_it():
    trained = [m for m in METHODS if m.model is not None and not m.ensemble]
    for m in trained:
        ens = get_method(m.key + "-ens")
        assert ens.ensemble_of == m.key and ens.model == m.model and ens.std_map and ens.name == f"{m.name} ens"
        assert ens.train_set is not None
    assert not any(m.ensemble for m in METHODS if m.model is None)
    assert [m.key for m in select_methods(["cnf", "gn"], ensembles=True)] == ["gn", "cnf", "cnf-ens"]
    with pytest.raises(InputError, match="run.seeds > 1 adds one"):
        select_methods(["gn", "cnf-ens"])


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

    def run_of(model: str, seed_index: int = 0, method=None):
        """The run of ``model``, or of ``method``'s own model (its run label and config values)."""
        label = model if method is None else method.label
        if (label, seed_index) not in runs:
            out = root / label / f"seed{seed_index}"
            own = cfg if method is None else method.configure(cfg)
            result = train(model, data, out, own, seed=seed_index, device="cpu", progress=False)
            assert result.completed and result.step > 0
            runs[label, seed_index] = out
        return runs[label, seed_index]

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


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_a_model_that_takes_inputs_reads_the_extra_classical_images_where_told(model):
    """``<model>.inputs = ["gn", "extra"]``: the data set's classical images at other settings are
    input channels that change the reconstruction; with ``["gn"]`` they are never read."""
    from dgm_eit.models.base import DataInfo, GenerativeModel, disk_mask

    cls, cfg = MODELS[model], load_config("ktc")[model]
    assert ("inputs" in cfg) == (cls.reads_extra.__func__ is not GenerativeModel.reads_extra.__func__)
    if "inputs" not in cfg:
        return
    info = DataInfo(16, 4, [0.0] * 4, [1.0] * 4, sigma_mean=0.8, sigma_std=0.5, sigma_min=0.0, sigma_max=2.0,
                    extra_images=2)
    gen = torch.Generator().manual_seed(0)
    inside = disk_mask(16).float()
    batch = {"gn": (1 + 0.3 * torch.rand(3, 16, 16, generator=gen)) * inside, "v": torch.randn(3, 4, generator=gen),
             "gn_extra": torch.rand(3, 2, 16, 16, generator=gen) * inside}
    other = {**batch, "gn_extra": batch["gn_extra"].flip(-1)}

    def recon(m, b):
        return m.reconstruct(b, n_samples=2, generator=torch.Generator().manual_seed(1))["recon"]

    for inputs in (["gn"], ["gn", "extra"]):
        torch.manual_seed(0)
        m = cls({**cfg, "inputs": inputs}, info)
        with torch.no_grad():   # off the identity some models start from, so that every input matters
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        extra = inputs == ["gn", "extra"]
        assert m.needs_extra == extra and ("gn_extra" in cls.data_keys_for(m.cfg)) == extra
        assert torch.equal(recon(m, batch), recon(m, other)) != extra
        if extra:
            with pytest.raises(InputError, match=f"{model} is conditioned on the classical image: the batch needs 'gn_extra'"):
                recon(m, {k: v for k, v in batch.items() if k != "gn_extra"})
    with pytest.raises(InputError, match=f"{model}.inputs has 'extra', but the data set has no extra classical images"):
        cls({**cfg, "inputs": ["gn", "extra"]}, DataInfo(16, 4, [0.0] * 4, [1.0] * 4, 0.8, 0.5))
    with pytest.raises(InputError, match=rf"{model}.inputs must be \['gn'\] or \['gn', 'extra'\], got \['extra'\]"):
        cls({**cfg, "inputs": ["extra"]}, info)


def _reconstruct_as_the_runner(method, trained, out, seed_index=0):
    """The file ``dgm-eit run`` makes for ``method``: the model's own reconstruction, or for a seed
    ensemble the pool of two seeds' reconstructions."""
    from dgm_eit.stages import ensemble_stage

    data, cfg, run_of = trained
    settings = cfg["run"]
    n_samples, sampler = method.n_samples(settings), method.sampler(settings)
    opts = {"config": cfg} if sampler is not None else {}
    if method.ensemble:
        members = [_reconstruct_as_the_runner(get_method(method.ensemble_of), trained,
                                              out.with_name(f"{out.stem}_seed{k}.h5"), k) for k in range(2)]
        ensemble_stage([m[0] for m in members], out)
        return out, [m[1] for m in members]
    result = reconstruct_split(run_of(method.model, seed_index, method), data, "test", out, n_samples=n_samples,
                               sampler=sampler, seed=3 + seed_index, limit=3, **opts)
    return out, result


@pytest.mark.parametrize("method", [m for m in METHODS if m.model is not None], ids=lambda m: m.key)
def test_every_method_reconstructs_as_the_runner_asks_it_to(trained, method, tmp_path):
    out, result = _reconstruct_as_the_runner(method, trained, tmp_path / f"{method.key}.h5")
    assert recon_file_problem(out) is None
    recon, std = read_recon(out)
    assert recon.shape == (3, 16, 16) and np.isfinite(recon).all()
    n_samples = method.n_samples(trained[1]["run"]) or 1
    if method.ensemble:
        members = [m["recon"] for m in result]
        np.testing.assert_allclose(recon, np.mean(members, axis=0), rtol=1e-5, atol=1e-6)
        assert std is not None and std.shape == recon.shape and np.isfinite(std).all()
        assert not np.array_equal(members[0], members[1])   # two seeds, two models
    else:
        np.testing.assert_array_equal(recon, result["recon"])
        if method.std_map and n_samples > 1:
            assert std is not None and std.shape == recon.shape
    again, _ = _reconstruct_as_the_runner(method, trained, tmp_path / "again" / f"{method.key}.h5")
    np.testing.assert_array_equal(read_recon(again)[0], recon)   # a seed fixes the result


def test_a_method_added_through_the_registry_runs_in_the_pipeline(tmp_path):
    """The U-Net baseline was added by its model file, one registry entry and profile keys only."""
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--profile", "smoke", "--seed", "0", "--set", "train.progress=false",
                 "--set", 'run.tests=["T1"]', "--set", 'run.methods=["gn", "unet"]']) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "MSE" and r["seed"] != "all"]
    assert {(r["method"], r["train_set"], r["test_set"]) for r in rows} == {
        ("GN", "none", "2a_40dB"), ("GN", "none", "4a_40dB"),
        ("U-Net", "2a_40dB", "2a_40dB"), ("U-Net", "4a_40dB", "4a_40dB")}
    report = (out / "report.md").read_text()
    assert "| U-Net | 2a_40dB |" in report                           # its efficiency row
    assert re.search(r"U-Net (yes|\*\*no\*\* \(worse\)|\*\*tied\*\*) [+-]\d+% \[", report)   # its verdict against GN
    assert (out / "runs" / "unet_2a_40dB" / "seed0" / "model.safetensors").is_file()


def test_the_papers_variants_train_their_own_model_or_fix_their_sampler():
    """cvae-v trains a CVAE that reads the voltages in runs of its own whatever [cvae] says;
    csd-plain shares the score prior and always samples with plain csd; both are the paper's rows."""
    quick = load_config("quick")
    cvae, cvae_v = get_method("cvae"), get_method("cvae-v")
    assert quick["cvae"]["condition"] == "gn"
    assert cvae_v.configure(quick)["cvae"]["condition"] == "v" and quick["cvae"]["condition"] == "gn"
    assert (cvae.label, cvae_v.label, get_method("cvae-v-ens").label) == ("cvae", "cvae-v", "cvae-v")
    assert (cvae.paper_row_for(quick), cvae_v.paper_row_for(quick)) == (None, "CVAE")
    assert cvae.paper_row_for(load_config("quick", ["cvae.condition=v"])) == "CVAE"
    csd, plain = get_method("csd"), get_method("csd-plain")
    assert plain.label == csd.label == "score" and plain.tunes_t0
    assert (csd.sampler(quick["run"]), plain.sampler(quick["run"])) == ("dds", "csd")
    assert (csd.paper_row_for(quick), plain.paper_row_for(quick)) == (None, "CSD*")
    assert plain.paper_row_for(load_config("quick", ["csd.mode=ccdf"])) is None   # not the paper's start
    assert get_method("csd-plain-ens").paper_row_for(quick) is None               # the paper ran one model
    assert get_method("guided").paper_row_for(quick) is None


@pytest.fixture(scope="module")
def ktc_every_method(ktc_tiny_study, tmp_path_factory):
    """The tiny KTC study again, in a copy, with every registered method the tank can run (the
    others refused before any work, their reasons kept): only the models and choices the
    session's study lacks are made, and the targets of level 1 reconstructed."""
    from dgm_eit.ktc.study import check_methods

    study, argv = ktc_tiny_study
    out = tmp_path_factory.mktemp("ktc_every") / "study"
    shutil.copytree(study, out)
    argv = [str(out) if a == str(study) else a for a in argv]
    cfg = load_config("ktc", [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    runnable, refused = [], {}
    for method in (m for m in METHODS if not m.ensemble):
        cfg["run"]["methods"] = [method.key]
        try:
            check_methods(cfg)
            runnable.append(method.key)
        except InputError as err:
            refused[method.key] = str(err)
    assert main(argv + ["--set", f"run.methods={json.dumps(runnable)}", "--set", "run.levels=[1]"]) == 0
    return out, runnable, refused


@pytest.mark.parametrize("method", [m for m in METHODS if not m.ensemble], ids=lambda m: m.key)
def test_every_method_runs_in_the_tiny_ktc_study_or_is_refused_saying_why(ktc_every_method, method):
    from dgm_eit.datasets import ktc2023
    from dgm_eit.ktc.segment import segment_images
    from dgm_eit.ktc.study import Methods, load_study, real_targets
    from dgm_eit.ktc.tank import public_dir

    out, runnable, refused = ktc_every_method
    # the study's own methods all run; a refusal names the method and a reason
    assert set(load_config("ktc")["run"]["methods"]) <= set(runnable)
    if method.key in refused:
        assert re.match(rf"run.methods: the KTC study cannot run '{method.key}': \w", refused[method.key])
        return
    cfg, chosen = load_study(out)
    record = chosen[method.key]["seeds"][0] if method.model else chosen[method.key]
    assert 0 <= record["score"] <= 1 and record["low"] < 1 < record["high"]
    if method.model:
        assert (out / "runs" / method.label / "seed0" / "done").is_file()
    with open(out / "scores.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == method.key]
    assert [(r["seed"], r["level"], r["target"]) for r in rows] == [
        ("0" if method.model else "-", "1", str(n)) for n in (1, 2, 3, 4)]
    # the submission is what the study's reconstruction of the targets, segmented, gives
    numbers, real = real_targets(public_dir(), [1], truths=False)
    made = Methods(cfg, out, seed=1).reconstruct(method, real["levels"][1]["dv"], real["levels"][1]["masks"], record)
    assert made["recon"].shape == (4, 16, 16) and np.isfinite(made["recon"]).all()
    assert ("recon_std" in made) == ((method.n_samples(cfg["run"]) or 1) > 1)
    where = out / "submissions" / method.key / ("seed0" if method.model else "") / "level_1"
    for n, classes in zip(numbers, segment_images(made["recon"], record["low"], record["high"])):
        np.testing.assert_array_equal(ktc2023.load_reconstruction(where / f"{n}.mat"), classes)
