"""DistributedDataParallel on CPU: two gloo processes on loopback, started by torchrun."""

import csv
import os
import socket
import subprocess
import sys

from safetensors.torch import load_file

from dgm_eit.config import load_config
from dgm_eit.models.base import DataInfo
from dgm_eit.models.cvae import CVAE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_the_model(tiny_dataset, tmp_path):
    run = tmp_path / "ddp"
    settings = ["train.threads=2", "cvae.vae.epochs=5", "cvae.vae.batch_size=4", "cvae.regressor.epochs=2",
                "cvae.regressor.batch_size=4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "dgm_eit", "train", "cvae", "--data", str(tiny_dataset), "--out", str(run),
           "--profile", "smoke", "--no-progress", "--device", "cpu"]
    cmd += [a for s in settings for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "done").is_file()

    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    vae = [r for r in rows if r["stage"] == "vae"]
    # 24 training images over 2 ranks, batch 4 per rank: 3 steps per epoch
    assert [int(r["step"]) for r in vae] == [3, 6, 9, 12, 15]
    losses = [float(r["train_loss"]) for r in vae]
    assert losses[-1] < 0.8 * losses[0], losses

    cfg = load_config("smoke", settings)
    info = DataInfo.load(run / "data_info.json")
    expected = {k: v.shape for k, v in CVAE(cfg["cvae"], info).state_dict().items()}
    trained = load_file(str(run / "model.safetensors"))
    assert {k: v.shape for k, v in trained.items()} == expected
