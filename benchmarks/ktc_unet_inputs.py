"""Which inputs should the KTC study's U-Net take? Probe of issue 20, item 2 (prints its figures).

On a finished ``dgm-eit run --profile ktc`` study (its data set: ``v``, ``sigma`` and the
linearised image ``gn``), U-Nets of the profile's design are trained with one plain loop (the
trainer's settings: 10 epochs, batch 32, Adam 1e-3 with a cosine decay, gradient clip 1, three
classes by cross-entropy) on four inputs:

- ``gn``: the linearised image alone (the study before ``unet.inputs``);
- ``gn+level``: plus a constant plane (level - 1) / 6, the difficulty level;
- ``priors``: plus the linearised step at the priors of ``linear.extra_images`` (the profile's
  factors of the data set's chosen prior, whatever the study's own key says);
- ``priors+level``: both.

Thresholds are chosen on ``val[:48]`` (the study's rule), scores are on ``val[48:]``, which no
choice saw; each variant's difference to ``gn`` is paired over those images, per training seed
and for the seed ensemble (the mean image). The four public targets at levels 1-7 are a
development check, never a choice. Images go to ``--out`` (one file per variant and seed; a
file there is reused, so an interrupted run resumes):

    python benchmarks/ktc_unet_inputs.py --run runs/ktc --out bench/unet_inputs --variants gn,priors --seeds 0,1
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dgm_eit.config import load_config
from dgm_eit.datasets import ktc2023 as ktc
from dgm_eit.ktc import segment
from dgm_eit.ktc.simulate import KTCSimulator, apply_linear_settings
from dgm_eit.ktc.study import load_study, real_targets
from dgm_eit.ktc.tank import level_masks, public_dir
from dgm_eit.models.base import disk_mask
from dgm_eit.models.unet import CLASS_CUTS, CLASS_VALUES, UNetBackbone
from dgm_eit.stats import mean_interval

VARIANTS = {"gn": (False, False), "gn+level": (False, True), "priors": (True, False), "priors+level": (True, True)}
CHOICE = 48   # validation images the thresholds are chosen on


def inputs(run: Path, out: Path) -> dict:
    """Every variant's input arrays, from the study's data set (cached in ``out/inputs.npz``)."""
    path = out / "inputs.npz"
    if path.is_file():
        return dict(np.load(path))
    cfg, _ = load_study(run)
    with h5py.File(run / "data" / "ktc.h5") as f:
        settings, seed = json.loads(f.attrs["gn_settings"]), int(f.attrs["seed"])
        arrays = {s: {k: f[f"{s}/{k}"][:] for k in ("sigma", "v", "gn")} for s in ("train", "val")}
    cfg = apply_linear_settings(cfg, settings)
    cfg["linear"]["extra_images"] = load_config("ktc")["linear"]["extra_images"]
    sim = KTCSimulator(cfg)
    masks = level_masks(sim.tank.ref.injections, sim.tank.ref.pattern)
    level_of = {int(m.sum()): level for level, m in masks.items()}   # a dropped measurement is 0 in v
    result = {}
    for split, a in arrays.items():
        levels = np.array([level_of[int(k)] for k in (a["v"] != 0).sum(axis=1)])
        extra = np.zeros((len(levels), sim.extra_images) + a["gn"].shape[1:], np.float32)
        for level in np.unique(levels):
            rows = np.flatnonzero(levels == level)
            dv, keep = a["v"][rows].astype(np.float64), np.broadcast_to(masks[level], (len(rows), len(masks[level])))
            if np.abs(sim.recon.linear(dv, masks[level]) - a["gn"][rows]).max() > 1e-4:
                raise SystemExit(f"{run}: the data set's gn is not the linearised image of its v")
            extra[rows] = sim.extra(dv, keep)
        result.update({f"{split}_sigma": a["sigma"], f"{split}_gn": a["gn"], f"{split}_extra": extra,
                       f"{split}_level": levels})
    result["val_truths"] = np.stack([sim.truth_classes(seed, "val", i) for i in range(len(arrays["val"]["v"]))])
    numbers, real = real_targets(public_dir(), ktc.LEVELS)
    for level, d in real["levels"].items():
        result[f"pub{level}_gn"] = sim.recon.linear(d["dv"], d["masks"][0])
        result[f"pub{level}_extra"] = sim.extra(d["dv"], d["masks"])
        result[f"pub{level}_level"] = np.full(len(numbers), level)
    result["pub_truths"] = np.stack([real["truths"][n] for n in numbers])
    out.mkdir(parents=True, exist_ok=True)
    save(path, result)
    return result


def save(path: Path, arrays: dict) -> None:
    """Whole or not at all (two processes of this script may share ``--out``)."""
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def features(d: dict, prefix: str, variant: str, mean: float, std: float) -> torch.Tensor:
    """The network's input channels (N, C, H, W) of one variant, normalised as the package's U-Net does."""
    priors, level = VARIANTS[variant]
    x = [(d[f"{prefix}_gn"][:, None] - mean) / std]
    if priors:
        x.append((d[f"{prefix}_extra"] - mean) / std)
    if level:
        plane = (d[f"{prefix}_level"].astype(np.float32) - 1) / 6
        x.append(np.broadcast_to(plane[:, None, None, None], x[0].shape))
    return torch.from_numpy(np.concatenate(x, axis=1).astype(np.float32))


def train(x: torch.Tensor, sigma: torch.Tensor, seed: int, epochs: int = 10, batch: int = 32,
          lr: float = 1e-3) -> nn.Module:
    torch.manual_seed(seed)
    net = UNetBackbone([16, 32, 64], len(CLASS_VALUES), in_channels=x.shape[1])
    inside = disk_mask(x.shape[-1]).float()
    target = ((sigma < CLASS_CUTS[0]) * 1 + (sigma > CLASS_CUTS[1]) * 2).long()
    opt = torch.optim.Adam(net.parameters(), lr=lr, fused=True)   # the trainer's optimizer_kernel
    order = torch.Generator().manual_seed(seed)
    steps, step = epochs * (len(x) // batch), 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for i in range(len(x) // batch):
            rows = perm[i * batch:(i + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            per_pixel = F.cross_entropy(net(x[rows]), target[rows], reduction="none")
            loss = (per_pixel * inside).sum() / (inside.sum() * len(rows))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
    return net


@torch.no_grad()
def image(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    net.eval()
    p = torch.softmax(net(x), dim=1)
    return (torch.einsum("bchw,c->bhw", p, torch.tensor(CLASS_VALUES)) * disk_mask(x.shape[-1]).float()).numpy()


def scores(images, low, high, truths) -> np.ndarray:
    return np.array([ktc.score(c, t) for c, t in zip(segment.segment_images(images, low, high), truths)])


def evaluate(d: dict, images: dict) -> tuple[dict, np.ndarray, list[float]]:
    """Thresholds on val[:48], scores on val[48:], public totals per level with those thresholds."""
    truths = d["val_truths"]
    chosen = segment.tune_thresholds(segment.upsample(images["val"][:CHOICE]), truths[:CHOICE])
    held = scores(images["val"][CHOICE:], chosen["low"], chosen["high"], truths[CHOICE:])
    public = [float(scores(images[f"pub{level}"], chosen["low"], chosen["high"], d["pub_truths"]).sum())
              for level in ktc.LEVELS]
    return chosen, held, public


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished dgm-eit run --profile ktc directory")
    ap.add_argument("--out", type=Path, required=True, help="where the inputs and images are kept")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}; the first is the baseline")
    ap.add_argument("--seeds", default="0,1", help="training seeds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one per process: run two side by side)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    d = inputs(args.run, args.out)
    mean, std = float(d["train_sigma"].mean()), float(d["train_sigma"].std())
    for variant in variants:
        for seed in seeds:
            path = args.out / f"img_{variant}_s{seed}.npz"
            if path.is_file():
                continue
            started = time.perf_counter()
            net = train(features(d, "train", variant, mean, std), torch.from_numpy(d["train_sigma"]), seed)
            images = {"val": image(net, features(d, "val", variant, mean, std))}
            images.update({f"pub{level}": image(net, features(d, f"pub{level}", variant, mean, std))
                           for level in ktc.LEVELS})
            save(path, images)
            print(f"{variant} seed {seed}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    held = {}
    for variant in variants:
        runs = [dict(np.load(args.out / f"img_{variant}_s{seed}.npz")) for seed in seeds]
        ensemble = {k: np.mean([r[k] for r in runs], axis=0) for k in runs[0]}
        for tag, images in [*((f"seed {s}", r) for s, r in zip(seeds, runs)), ("ensemble", ensemble)]:
            chosen, held[variant, tag], public = evaluate(d, images)
            print(f"{variant:13s} {tag:8s} thresholds {chosen['low']:.1f} / {chosen['high']:.1f}  "
                  f"val[{CHOICE}:] {held[variant, tag].mean():.3f}  public {sum(public):.2f} "
                  f"(levels {' '.join(f'{x:.2f}' for x in public)})", flush=True)
    for variant in variants[1:]:
        for tag in [f"seed {s}" for s in seeds] + ["ensemble"]:
            iv = mean_interval(held[variant, tag] - held[variants[0], tag], seed=0)
            print(f"{variant:13s} {tag:8s} minus {variants[0]}: {iv.change:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]")


if __name__ == "__main__":
    main()
