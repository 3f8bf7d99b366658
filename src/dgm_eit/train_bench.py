"""``dgm-eit bench train``: optimiser steps per second of every model, plain and with each speed-up.

For every registered model and training stage, at the profile's batch size, on one data set
(``--data``, or a small one simulated with the profile): the same initial weights, data order
and noise are trained for ``--steps`` optimiser steps by the trainer's own step
(:func:`dgm_eit.train.optimiser_step`) once per variant:

- ``fp32``: eager float32, Adam's per-parameter loop, every speed key off (the baseline);
- ``bf16`` / ``fp16``: autocast (``fp16`` with loss scaling; CUDA only);
- ``compile``: ``torch.compile`` of the loss (its compile time is reported, not timed);
- ``channels_last``: NHWC convolution weights;
- ``foreach`` / ``fused``: Adam's multi-tensor and fused kernels;
- ``profile``: the profile's own ``[train]`` speed keys, i.e. what a run uses.

Each variant's validation loss after its steps is computed the same way for all (float32,
eager, fixed noise), and a speed-up is kept only where it is faster and that loss stays within
1% of the baseline's. On a CPU, ``--side-by-side`` also times two one-thread stages at once
(as ``dgm-eit run`` runs them) against one stage on every core.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# variant -> the [train] speed keys it sets over the baseline
VARIANTS = {
    "fp32": {},
    "bf16": {"autocast": "bf16"},
    "fp16": {"autocast": "fp16"},
    "compile": {"compile": True},
    "channels_last": {"channels_last": True},
    "foreach": {"optimizer_kernel": "foreach"},
    "fused": {"optimizer_kernel": "fused"},
    "profile": None,
}
BASELINE = {"autocast": "off", "compile": False, "channels_last": False, "optimizer_kernel": "loop"}
LOSS_TOLERANCE = 0.01
ROW_KEYS = ("model", "stage", "variant", "batch_size", "steps", "steps_per_s", "images_per_s", "speedup",
            "warmup_s", "val_loss", "val_loss_fp32", "val_rel_diff", "keep")
JSON_KEYS = ("profile", "device", "threads", "torch_threads", "blas", "omp_num_threads", "cpu_native_bf16",
             "data", "n_train", "n_val", "steps", "rows", "side_by_side")


def _arrays(path, keys, device):
    import torch

    from dgm_eit.train import read_training_data

    info, train, val = read_training_data(path, tuple(keys))

    def tensors(split):
        return {k: torch.from_numpy(np.ascontiguousarray(split[k], dtype=np.float32)).to(device) for k in keys}

    return info, tensors(train), tensors(val)


def measure(cfg: dict, data: str, model_name: str, stage: str, variant: str, *, steps: int, warmup: int,
            seed: int, device: str = "cpu", threads: int | None = None) -> dict:
    """Time ``steps`` optimiser steps of one model stage with one variant; its validation loss."""
    import torch

    from dgm_eit import runtime
    from dgm_eit.models import MODELS
    from dgm_eit.train import EMA, Speed, optimiser_step, stage_settings

    if threads:
        runtime.limit_threads(threads)
    dev = runtime.resolve_device(device)
    keys = VARIANTS[variant] if VARIANTS[variant] is not None else {}
    tcfg = {**cfg["train"], **(BASELINE if VARIANTS[variant] is not None else {}), **keys}
    speed = Speed.from_config(tcfg, dev)
    cls = MODELS[model_name]
    info, train, val = _arrays(data, cls.data_keys_for(cfg[model_name]), dev)
    torch.manual_seed(seed)
    model = cls(cfg[model_name], info).to(dev)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    sc = stage_settings(model, stage)
    params = model.stage_parameters(stage)
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = speed.optimizer(params, float(sc["lr"]), float(sc["weight_decay"]))
    ema = EMA(params, float(sc["ema"])) if float(sc["ema"]) > 0 else None
    scaler = torch.amp.GradScaler(dev.type, enabled=speed.autocast == torch.float16)

    def loss_of(batch):
        return model.loss(batch, stage)

    loss_fn = torch.compile(loss_of) if speed.compile else loss_of
    batch_size = min(int(sc["batch_size"]), len(next(iter(train.values()))))
    order = torch.Generator().manual_seed(seed)
    n = len(next(iter(train.values())))
    model.set_train_mode(stage)
    torch.manual_seed(seed + 1)   # the models' training noise: the same draws for every variant

    def step():
        idx = torch.randint(0, n, (batch_size,), generator=order)
        batch = {k: v[idx.to(v.device)] for k, v in train.items()}
        loss = optimiser_step(loss_fn, batch, optimizer, params, speed=speed, device=dev, scaler=scaler,
                              grad_clip=float(sc["grad_clip"]))
        if ema is not None:
            ema.update()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return loss

    started = time.perf_counter()
    for _ in range(warmup):
        step()
    warm = time.perf_counter() - started
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    if not math.isfinite(float(loss.detach())):
        val_loss = math.nan
    else:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed + 104729)
            size = max(batch_size, int(cfg["train"]["val_batch_size"]))
            nv = len(next(iter(val.values())))
            total = 0.0
            for start in range(0, nv, size):
                idx = torch.arange(start, min(start + size, nv), device=dev)
                total += float(model.loss({k: v[idx] for k, v in val.items()}, stage)) * len(idx)
            val_loss = total / nv
    per_step = statistics.median(times)
    return {"model": model_name, "stage": stage, "variant": variant, "batch_size": batch_size, "steps": steps,
            "steps_per_s": 1.0 / per_step, "images_per_s": batch_size / per_step, "warmup_s": warm,
            "val_loss": val_loss}


def _side_by_side(cfg, data, model_name, stage, *, steps, warmup, seed) -> dict:
    """Two one-thread fp32 stages at once in two processes, against one fp32 stage on every core."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from dgm_eit.runtime import cpu_count

    args = (cfg, data, model_name, stage, "fp32")
    kwargs = dict(steps=steps, warmup=warmup, seed=seed, threads=1)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        pair = [f.result() for f in [pool.submit(measure, *args, **kwargs) for _ in range(2)]]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        alone = pool.submit(measure, *args, **dict(kwargs, threads=cpu_count())).result()
    return {"model": model_name, "stage": stage, "two_stages_1_thread_images_per_s": sum(r["images_per_s"] for r in pair),
            "one_stage_all_threads_images_per_s": alone["images_per_s"], "threads": cpu_count()}


def run(args) -> int:
    import torch

    from dgm_eit.config import load_config
    from dgm_eit.errors import InputError
    from dgm_eit.files import write_text
    from dgm_eit.models import MODEL_NAMES, MODELS
    from dgm_eit.runtime import blas_report, check_seed, limit_threads, resolve_device
    from dgm_eit.train import native_bf16_cpu

    check_seed(args.seed)
    if args.steps < 1 or args.warmup < 0 or args.samples < 8:
        raise InputError("--steps must be >= 1, --warmup >= 0 and --samples >= 8")
    cfg = load_config(args.profile, args.overrides)
    device = resolve_device(args.device)
    models = args.models.split(",") if args.models else list(MODEL_NAMES)
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        raise InputError(f"--models: unknown model(s) {unknown}; choose from {', '.join(MODEL_NAMES)}")
    variants = args.variants.split(",") if args.variants else [v for v in VARIANTS if v != "fp16" or device.type == "cuda"]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise InputError(f"--variants: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if "fp32" not in variants:
        variants = ["fp32", *variants]
    threads = limit_threads(args.threads or None)
    with tempfile.TemporaryDirectory(prefix="dgm-eit-bench-") as tmp:
        data = args.data
        if data is None:
            from dgm_eit.data.simulate import simulate_dataset

            small = copy.deepcopy(cfg)
            small["data"].update(n_train=args.samples, n_val=max(8, args.samples // 8), n_test=8)
            data = str(Path(tmp) / "bench.h5")
            print(f"simulating {args.samples} training samples with profile {args.profile} ...", file=sys.stderr)
            simulate_dataset(small, data, seed=args.seed, progress=False)
        from dgm_eit.data.storage import split_sizes

        sizes = split_sizes(data)
        blas, blas_text = blas_report()
        print(f"dgm-eit bench train: profile {cfg.get('profile', args.profile)}, device {device}, "
              f"{sizes['train']} / {sizes['val']} train / val samples, {args.steps} timed steps after {args.warmup}")
        print(f"threads: torch {torch.get_num_threads()}, BLAS {blas_text}; OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS') or 'unset'}; CPU native bfloat16: {native_bf16_cpu()}")
        print(f"{'model/stage':22s}{'variant':>15s}{'batch':>7s}{'steps/s':>9s}{'img/s':>9s}{'speed-up':>9s}"
              f"{'val loss':>12s}{'vs fp32':>9s}  keep")
        rows, side = [], []

        def result() -> dict:
            return {"profile": str(cfg.get("profile", args.profile)), "device": str(device), "threads": threads,
                    "torch_threads": torch.get_num_threads(), "blas": blas,
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_native_bf16": native_bf16_cpu(),
                    "data": args.data or "simulated", "n_train": sizes["train"], "n_val": sizes["val"],
                    "steps": args.steps, "rows": rows, "side_by_side": side}

        for name in models:
            for stage in MODELS[name].stages:
                base = None
                for variant in variants:
                    try:
                        r = measure(cfg, data, name, stage, variant, steps=args.steps, warmup=args.warmup,
                                    seed=args.seed, device=str(device))
                    except Exception as err:   # a variant this machine cannot run is a row, not the end
                        if os.environ.get("DGM_EIT_DEBUG"):
                            raise
                        r = {"model": name, "stage": stage, "variant": variant, "error": f"{type(err).__name__}: {err}"}
                        print(f"{name + '/' + stage:22s}{variant:>15s}  failed: {r['error'][:90]}")
                        rows.append(r)
                        continue
                    base = r if variant == "fp32" else base
                    r["speedup"] = r["steps_per_s"] / base["steps_per_s"]
                    r["val_loss_fp32"] = base["val_loss"]
                    r["val_rel_diff"] = abs(r["val_loss"] - base["val_loss"]) / max(abs(base["val_loss"]), 1e-12)
                    r["keep"] = variant != "fp32" and r["speedup"] > 1.0 and r["val_rel_diff"] <= LOSS_TOLERANCE
                    r = {k: r[k] for k in ROW_KEYS}
                    rows.append(r)
                    print(f"{name + '/' + stage:22s}{variant:>15s}{r['batch_size']:7d}{r['steps_per_s']:9.2f}"
                          f"{r['images_per_s']:9.1f}{r['speedup']:8.2f}x{r['val_loss']:12.5g}"
                          f"{100 * r['val_rel_diff']:8.2f}%  {'yes' if r['keep'] else '-'}"
                          + (f"  (warm-up {r['warmup_s']:.0f} s)" if variant == "compile" else ""))
                if args.side_by_side and device.type == "cpu":
                    sb = _side_by_side(cfg, data, name, stage, steps=args.steps, warmup=args.warmup, seed=args.seed)
                    side.append(sb)
                    print(f"{name + '/' + stage:22s}  two 1-thread stages at once: "
                          f"{sb['two_stages_1_thread_images_per_s']:.1f} img/s; one stage on {sb['threads']} threads: "
                          f"{sb['one_stage_all_threads_images_per_s']:.1f} img/s")
                if args.out:   # after every stage: a run cut short keeps what it measured
                    write_text(args.out, json.dumps(result()))
    if args.json:
        print(json.dumps(result()))
    return 0
