"""The trainer's speed settings ([train] autocast, compile, channels_last, optimizer_kernel) and
``dgm-eit bench train``: each trains to the loss plain float32 reaches, a checkpoint written
with it resumes without it, and the benchmark's JSON keeps its keys."""

import json

import pytest
import torch

from dgm_eit.cli import main
from dgm_eit.config import load_config
from dgm_eit.errors import InputError
from dgm_eit.train import Speed, native_bf16_cpu, train
from dgm_eit.train_bench import JSON_KEYS, ROW_KEYS

# (variant, [train] keys, tolerance on the final validation loss relative to float32): kernels
# that compute the same arithmetic in another order agree to rounding; reduced precision to a few %
VARIANTS = [
    ("foreach", {"optimizer_kernel": "foreach"}, 1e-3),
    ("fused", {"optimizer_kernel": "fused"}, 1e-3),
    ("channels_last", {"channels_last": True}, 1e-3),
    ("bf16", {"autocast": "bf16"}, 0.05),
    ("fp16", {"autocast": "fp16"}, 0.05),
]


def _cfg(**train_keys):
    cfg = load_config("smoke", ["train.threads=1", "train.progress=false", "unet.channels=[8,16]"])
    cfg["train"].update({"autocast": "off", "compile": False, "channels_last": False, "optimizer_kernel": "loop",
                         **train_keys})
    cfg["unet"]["regression"].update(epochs=3, batch_size=8)
    return cfg


def _val_loss(run):
    with open(run / "metrics.csv") as f:
        return float(f.read().strip().splitlines()[-1].split(",")[4])


@pytest.fixture(scope="module")
def fp32_loss(tmp_path_factory):
    from conftest import write_tiny_dataset

    root = tmp_path_factory.mktemp("speed")
    data = write_tiny_dataset(root / "tiny.h5")
    assert train("unet", data, root / "fp32", _cfg(), seed=0, device="cpu").completed
    return data, _val_loss(root / "fp32")


@pytest.mark.parametrize("name, keys, tolerance", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_each_speed_up_trains_to_the_float32_loss_and_resumes_without_it(fp32_loss, tmp_path, name, keys, tolerance):
    data, reference = fp32_loss
    assert train("unet", data, tmp_path / "fast", _cfg(**keys), seed=0, device="cpu").completed
    assert _val_loss(tmp_path / "fast") == pytest.approx(reference, rel=tolerance)
    # a checkpoint written with the speed-up, resumed without it
    cut = train("unet", data, tmp_path / "cut", _cfg(**keys), seed=0, device="cpu", stop_after_steps=4)
    assert not cut.completed and (tmp_path / "cut" / "checkpoints" / "last.pt").is_file()
    resumed = train("unet", data, tmp_path / "cut", _cfg(), seed=0, device="cpu")
    assert resumed.completed
    assert _val_loss(tmp_path / "cut") == pytest.approx(reference, rel=tolerance)


@pytest.mark.slow
def test_compile_trains_to_the_float32_loss(fp32_loss, tmp_path):
    data, reference = fp32_loss
    assert train("unet", data, tmp_path / "compiled", _cfg(compile=True), seed=0, device="cpu").completed
    assert _val_loss(tmp_path / "compiled") == pytest.approx(reference, rel=1e-3)


def test_speed_settings_are_checked_and_auto_uses_bfloat16_only_where_it_is_native(monkeypatch):
    cpu = torch.device("cpu")
    base = load_config("smoke")["train"]
    assert Speed.from_config({**base, "autocast": "auto"}, cpu).autocast == (
        torch.bfloat16 if native_bf16_cpu() else None)
    for native in (True, False):  # both kinds of CPU, whichever this one is
        monkeypatch.setattr("dgm_eit.train.native_bf16_cpu", lambda: native)
        assert Speed.from_config({**base, "autocast": "auto"}, cpu).autocast == (torch.bfloat16 if native else None)
        assert Speed.from_config({**base, "autocast": "off"}, cpu).autocast is None
    assert Speed.from_config({**base, "autocast": "bf16"}, cpu).autocast == torch.bfloat16
    for key, bad in (("autocast", "fp8"), ("optimizer_kernel", "adamw"), ("compile", "yes"), ("channels_last", 1)):
        with pytest.raises(InputError, match=f"train.{key}"):
            Speed.from_config({**base, key: bad}, cpu)


def test_bench_train_prints_pinned_json_keys(capsys):
    argv = ["bench", "train", "--profile", "smoke", "--samples", "16", "--steps", "2", "--warmup", "0",
            "--models", "unet", "--variants", "fp32,foreach", "--threads", "1", "--set", "unet.channels=[8,16]", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert tuple(result) == JSON_KEYS
    assert [(r["model"], r["stage"], r["variant"]) for r in result["rows"]] == [("unet", "regression", "fp32"),
                                                                               ("unet", "regression", "foreach")]
    for row in result["rows"]:
        assert tuple(row) == ROW_KEYS and row["steps_per_s"] > 0 and row["batch_size"] == 16
    assert result["rows"][0]["speedup"] == 1.0 and result["rows"][0]["keep"] is False
    # foreach Adam computes the same update: the validation losses agree
    assert result["rows"][1]["val_rel_diff"] < 1e-4
    assert "threads: torch 1" in out
