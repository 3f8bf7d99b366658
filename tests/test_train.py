import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dgm_eit.cli import main
from dgm_eit.config import ConfigError, load_config
from dgm_eit.errors import InputError
from dgm_eit.runs import load_run
from dgm_eit.train import EMA, learning_rate, train

# several steps per epoch, a sampled latent target and dropout: resume must restore the
# data order and the noise stream, mid-epoch and across the stage boundary
SETTINGS = ["train.threads=1", "cvae.vae.epochs=3", "cvae.regressor.epochs=2", "cvae.vae.batch_size=8",
            "cvae.regressor.batch_size=8", "cvae.target=sample", "cvae.mlp_dropout=0.2",
            "cvae.regressor.ema=0.9", "cvae.vae.schedule=cosine", "cvae.vae.warmup_steps=2"]


def _cfg(extra=()):
    return load_config("smoke", SETTINGS + list(extra))


def _metrics(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _same_weights(a, b):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_directory_layout(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    result = train("cvae", tiny_dataset, run, _cfg(), seed=3, progress=False)
    assert result.completed and result.step == 3 * 3 + 2 * 3
    for name in ("config.json", "data_info.json", "checkpoints/last.pt", "model.safetensors",
                 "best.safetensors", "metrics.csv", "done"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "config.json").read_text())
    assert meta["model"] == "cvae" and meta["seed"] == 3 and meta["config"] == _cfg()
    rows = _metrics(run)
    assert [r["stage"] for r in rows] == ["vae"] * 3 + ["regressor"] * 2
    assert list(rows[0]) == ["stage", "epoch", "step", "train_loss", "val_loss", "lr", "wall_s"]
    assert all(math.isfinite(float(r["val_loss"])) for r in rows)
    model, cfg, info = load_run(run)
    assert cfg == _cfg() and info.image_size == 16 and not model.training
    # a finished run is not trained again
    assert train("cvae", tiny_dataset, run, _cfg(), seed=3, progress=False).step == -1


def test_resume_after_interruption_is_bit_identical(tiny_dataset, tmp_path):
    whole = tmp_path / "whole"
    train("cvae", tiny_dataset, whole, _cfg(), seed=1, progress=False)

    parts = tmp_path / "parts"
    # 4 steps: stopped inside the second VAE epoch; 8 more: across the stage boundary
    first = train("cvae", tiny_dataset, parts, _cfg(), seed=1, stop_after_steps=4, progress=False)
    assert not first.completed and first.step == 4 and first.stopped_by == "stop_after_steps"
    assert not (parts / "done").exists() and not (parts / "model.safetensors").exists()
    second = train("cvae", tiny_dataset, parts, _cfg(), seed=1, stop_after_steps=8, progress=False)
    assert not second.completed and second.step == 12
    third = train("cvae", tiny_dataset, parts, _cfg(), seed=1, progress=False)
    assert third.completed and third.step == 15

    assert _same_weights(whole / "model.safetensors", parts / "model.safetensors")
    assert _same_weights(whole / "best.safetensors", parts / "best.safetensors")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(_metrics(whole)) == strip(_metrics(parts))


def test_max_minutes_leaves_a_resumable_run(tiny_dataset, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "cvae", "--data", str(tiny_dataset), "--out", str(run), "--profile", "smoke",
            "--no-progress"] + [a for s in SETTINGS for a in ("--set", s)]
    assert main(argv + ["--max-minutes", "0"]) == 0
    assert "re-run the same command to resume" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.pt").is_file() and not (run / "done").exists()
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["train_state"]["step"] == 1
    assert main(argv) == 0
    assert (run / "done").is_file()
    assert sum(r["stage"] == "regressor" for r in _metrics(run)) == 2


def test_different_config_on_resume_is_refused(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train("cvae", tiny_dataset, run, _cfg(), seed=0, stop_after_steps=1, progress=False)
    with pytest.raises(InputError, match=r"different config \(cvae.vae.lr: 0.001 -> 0.002\)"):
        train("cvae", tiny_dataset, run, _cfg(["cvae.vae.lr=0.002"]), seed=0, progress=False)
    with pytest.raises(InputError, match="--seed 0, not 5"):
        train("cvae", tiny_dataset, run, _cfg(), seed=5, progress=False)
    # how often to checkpoint does not change the result, so it may differ on resume
    assert train("cvae", tiny_dataset, run, _cfg(["train.checkpoint_minutes=1"]), seed=0, progress=False).completed


def test_unknown_set_key_is_rejected(tiny_dataset, tmp_path, capsys):
    code = main(["train", "cvae", "--data", str(tiny_dataset), "--out", str(tmp_path / "r"),
                 "--profile", "smoke", "--set", "cvae.vae.epoch=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown config key 'cvae.vae.epoch'" in err and "cvae.vae.epochs" in err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError):
        load_config("smoke", ["train.bogus=1"])


def test_corrupt_checkpoint_is_a_clear_error(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train("cvae", tiny_dataset, run, _cfg(), seed=0, stop_after_steps=2, progress=False)
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="checkpoint .*last.pt is unreadable"):
        train("cvae", tiny_dataset, run, _cfg(), seed=0, progress=False)


def test_mismatched_checkpoint_is_a_clear_error(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train("cvae", tiny_dataset, run, _cfg(), seed=0, stop_after_steps=2, progress=False)
    path = run / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["vae.fc_mu.weight"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(InputError, match="does not match the model"):
        train("cvae", tiny_dataset, run, _cfg(), seed=0, progress=False)


def test_foreign_directory_is_not_overwritten(tiny_dataset, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a dgm-eit run directory"):
        train("cvae", tiny_dataset, tmp_path, _cfg(), progress=False)


def test_load_run_validates_weights(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    train("cvae", tiny_dataset, run, _cfg(), seed=0, stop_after_steps=1, progress=False)
    with pytest.raises(InputError, match="no model.safetensors .*resume"):
        load_run(run)
    train("cvae", tiny_dataset, run, _cfg(), seed=0, progress=False)
    (run / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_run(run)
    with pytest.raises(InputError, match="not a dgm-eit run directory"):
        load_run(tmp_path)


def test_ema_update_and_swap():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()                       # warm-up decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.9))
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()                       # min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.shadow[0], torch.full((3,), d * 0.9 + (1 - d) * 2.0))
    for _ in range(50):
        ema.update()
    assert ema.current_decay() == 0.5
    before = ema.shadow[0].clone()
    ema.swap()
    assert torch.equal(p.detach(), before)
    ema.swap()
    assert torch.equal(p.detach(), torch.full((3,), 2.0))


def test_ema_weights_are_the_final_weights(tiny_dataset, tmp_path):
    with_ema, without = tmp_path / "ema", tmp_path / "plain"
    train("cvae", tiny_dataset, with_ema, _cfg(), seed=0, progress=False)
    train("cvae", tiny_dataset, without, _cfg(["cvae.regressor.ema=0.0"]), seed=0, progress=False)
    a, b = load_file(str(with_ema / "model.safetensors")), load_file(str(without / "model.safetensors"))
    # the VAE stage has no EMA: identical; the regressor's averaged weights differ
    assert torch.equal(a["vae.fc_mu.weight"], b["vae.fc_mu.weight"])
    assert not torch.equal(a["regressor.net.0.weight"], b["regressor.net.0.weight"])


def test_learning_rate_schedules():
    sc = {"lr": 1.0, "warmup_steps": 4, "schedule": "constant"}
    assert [learning_rate(sc, s, 100, 1.0, 0.0) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    sc = {"lr": 1.0, "warmup_steps": 0, "schedule": "cosine"}
    assert learning_rate(sc, 0, 10, 1.0, 0.0) == 1.0
    assert learning_rate(sc, 5, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert learning_rate(sc, 10, 10, 1.0, 0.0) == pytest.approx(0.0)
    sc = {"lr": 1.0, "warmup_steps": 0, "schedule": "plateau"}
    assert learning_rate(sc, 3, 10, 0.25, 0.0) == 0.25
    assert learning_rate(sc, 3, 10, 1e-9, 1e-3) == 1e-3


def test_early_stop_on_validation(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    # a high learning rate makes validation jump about; patience 1 stops at the first worse epoch.
    # The regressor only has to finish: a VAE trained this hot can have a latent log-variance
    # whose sampled targets overflow, so it regresses the latent mean
    cfg = _cfg(["cvae.vae.epochs=20", "cvae.vae.patience=1", "cvae.vae.lr=0.05", "cvae.vae.schedule=constant",
                "cvae.vae.grad_clip=1.0", "cvae.regressor.epochs=1", "cvae.target=mean"])
    train("cvae", tiny_dataset, run, cfg, seed=0, progress=False)
    vae_rows = [r for r in _metrics(run) if r["stage"] == "vae"]
    assert 2 <= len(vae_rows) < 20
    assert (run / "done").is_file()


def test_bad_stage_settings_are_refused(tiny_dataset, tmp_path):
    with pytest.raises(InputError, match="cvae.vae.schedule must be one of"):
        train("cvae", tiny_dataset, tmp_path / "a", _cfg(["cvae.vae.schedule=linear"]), progress=False)
    with pytest.raises(InputError, match="data file .* does not exist|does not exist"):
        train("cvae", tmp_path / "missing.h5", tmp_path / "b", _cfg(), progress=False)


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_resume_after_a_crash_or_ctrl_c(tiny_dataset, tmp_path, monkeypatch, failure):
    """Ctrl-C saves a checkpoint on the way out; a crash (as a kill) leaves the periodic one."""
    from dgm_eit.models.cvae import CVAE

    cfg = _cfg(["train.checkpoint_minutes=0"])   # periodic checkpoint after every step
    whole = tmp_path / "whole"
    train("cvae", tiny_dataset, whole, cfg, seed=2, progress=False)

    real_loss = CVAE.loss
    calls = {"n": 0}

    def failing_loss(self, batch, stage):
        if self.training:   # training steps only, not validation
            calls["n"] += 1
            if calls["n"] == 5:
                raise failure("boom")
        return real_loss(self, batch, stage)

    parts = tmp_path / "parts"
    monkeypatch.setattr(CVAE, "loss", failing_loss)
    with pytest.raises(failure):
        train("cvae", tiny_dataset, parts, cfg, seed=2, progress=False)
    step = torch.load(parts / "checkpoints" / "last.pt", weights_only=True)["train_state"]["step"]
    assert step == 4
    monkeypatch.setattr(CVAE, "loss", real_loss)
    assert train("cvae", tiny_dataset, parts, cfg, seed=2, progress=False).completed
    assert _same_weights(whole / "model.safetensors", parts / "model.safetensors")
