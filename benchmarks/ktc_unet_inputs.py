"""Which inputs should the KTC study's U-Net take? Probe of issue 20, item 2 (prints its figures).

On a finished ``dgm-eit run --profile ktc`` study (its data set: ``v``, ``sigma`` and the
linearised image ``gn``), U-Nets of the profile's design are trained with one plain loop (the
trainer's settings: 10 epochs, batch 32, Adam 1e-3 with a cosine decay, gradient clip 1, three
classes by cross-entropy) on four inputs:

- ``gn``: the linearised image alone (the study before ``unet.inputs``);
- ``gn+level``: plus a constant plane (level - 1) / 6, the difficulty level;
- ``priors``: plus the linearised step at the priors of ``linear.extra_images`` (the profile's
  factors of the data set's chosen prior, whatever the study's own key says);
- ``priors+level``: both;
- ``priors@64``: the ``priors`` inputs (32 x 32), class output at 64 x 64: the U-Net's output
  is upsampled (nearest) beside the bilinearly upsampled inputs, one more convolution block
  makes the logits, trained on the phantoms' classes at 64 x 64 pixel centres (the segmentation
  then upsamples 64 -> 256 instead of 32 -> 256).

``--train-from FILE`` trains on the training split of another data set of the study's seed and
linearised step with more samples (``dgm-eit simulate --profile ktc --set data.n_train=18000 --seed 0
--out FILE``): its first rows must be the study's own, so only the added samples differ (use another
``--out``: its inputs are cached there; ``--compare-with`` the first ``--out`` pairs the two).

``--data FILE`` trains and validates on another simulation of the study's phantoms instead (the
same seed; say ``--set tank.sim_h0=0.0015``, ``--set tank.drift_std=0.05`` or ``--set tank.noise_scale=30``;
its validation split may be longer than the study's, the study's phantoms first), through the linearised
step of its own config; ``--epochs`` trains longer or shorter. Every network is kept in ``--out``
(``net_<variant>_s<seed>.pt``), so ``--score-on FILE`` can score them later on the validation split
of any data set of the same seed (the study's first validation phantoms, any number after them:
thresholds on its first 48, scores on the rest), each through its own linearised step, paired
against ``--compare-with``'s networks.

``--ceiling`` prints what the image grid alone costs: the challenge score of the validation
phantoms themselves rasterised at 32, 48 and 64 pixels (thresholds chosen on those images), the
score a perfect model on that grid would get.

Thresholds are chosen on ``val[:48]`` (the study's rule), scores are on ``val[48:]``, which no
choice saw; each variant's difference to ``gn`` is paired over those images, per training seed
and for the seed ensemble (the mean image). The four public targets at levels 1-7 are a
development check, never a choice. Images go to ``--out`` (one file per variant and seed; a
file there is reused, so an interrupted run resumes):

    python benchmarks/ktc_unet_inputs.py --run runs/ktc --out bench/unet_inputs --variants gn,priors --seeds 0,1
    python benchmarks/ktc_unet_inputs.py --run runs/ktc --out bench/long --epochs 30 --variants priors --seeds 0,1 \
        --score-on drift.h5 --compare-with bench/unet_inputs
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
from dgm_eit.ktc.phantoms import class_map
from dgm_eit.ktc.study import load_study, real_targets
from dgm_eit.ktc.tank import level_masks, public_dir, row_levels
from dgm_eit.models.base import disk_mask
from dgm_eit.models.unet import CLASS_VALUES, UNetBackbone, _conv_block, class_targets
from dgm_eit.stats import mean_interval

# name: (the extra priors as inputs, the level plane as an input, output pixels)
VARIANTS = {"gn": (False, False, 32), "gn+level": (False, True, 32), "priors": (True, False, 32),
            "priors+level": (True, True, 32), "priors@64": (True, False, 64)}
CHOICE = 48   # validation images the thresholds are chosen on


def data_simulator(data: Path):
    """The simulator of a data set's own config, its linearised step at its chosen prior, the
    profile's extra priors (whatever the data set's own key says)."""
    with h5py.File(data) as f:
        cfg, settings = json.loads(f.attrs["config"]), json.loads(f.attrs["gn_settings"])
    cfg = apply_linear_settings(cfg, settings)
    cfg["linear"]["extra_images"] = load_config("ktc")["linear"]["extra_images"]
    return KTCSimulator(cfg)


def split_inputs(sim, split: str, a: dict, source) -> dict:
    """``split``'s arrays for the networks: the linearised image ``gn`` (checked to be ``sim``'s
    of ``v`` where ``a`` has it, else made), the extra priors' images and the level."""
    masks = level_masks(sim.tank.ref.injections, sim.tank.ref.pattern)
    levels = row_levels(a["v"], masks)
    gn = np.zeros((len(levels), sim.image_size, sim.image_size), np.float32)
    extra = np.zeros((len(levels), sim.extra_images, sim.image_size, sim.image_size), np.float32)
    for level in np.unique(levels):
        rows = np.flatnonzero(levels == level)
        dv, keep = a["v"][rows].astype(np.float64), np.broadcast_to(masks[level], (len(rows), len(masks[level])))
        gn[rows] = sim.recon.linear(dv, masks[level])
        if "gn" in a:
            if np.abs(gn[rows] - a["gn"][rows]).max() > 1e-4:
                raise SystemExit(f"{source}: the data set's gn is not the linearised image of its v")
            gn[rows] = a["gn"][rows]
        extra[rows] = sim.extra(dv, keep)
    return {f"{split}_sigma": a["sigma"], f"{split}_gn": gn, f"{split}_extra": extra, f"{split}_level": levels}


def inputs(run: Path, out: Path, train_from: Path | None = None, data: Path | None = None) -> dict:
    """Every variant's input arrays, from the study's data set (or ``data``: another simulation
    of the same phantoms), the training split from ``train_from`` where given (cached in
    ``out/inputs.npz``, with the data set's path: its simulator makes the inputs of ``--score-on``)."""
    path = out / "inputs.npz"
    if path.is_file():
        return dict(np.load(path))
    source = data or run / "data" / "ktc.h5"
    with h5py.File(run / "data" / "ktc.h5") as f:
        seed, study_val = int(f.attrs["seed"]), f["val/sigma"][:]
    with h5py.File(source) as f:
        arrays = {s: {k: f[f"{s}/{k}"][:] for k in ("sigma", "v", "gn")} for s in ("train", "val")}
        # a longer validation split is allowed: its first phantoms must be the study's
        if int(f.attrs["seed"]) != seed or not np.array_equal(arrays["val"]["sigma"][:len(study_val)], study_val):
            raise SystemExit(f"{source}: its validation phantoms are not those of {run} (another seed or phantom prior)")
    if train_from is not None:
        with h5py.File(train_from) as f:
            more = {k: f[f"train/{k}"][:] for k in ("sigma", "v", "gn")}
        n = len(arrays["train"]["v"])
        if len(more["v"]) < n or any(not np.array_equal(more[k][:n], arrays["train"][k]) for k in ("sigma", "v")):
            raise SystemExit(f"{train_from}: its first {n} training samples are not those of {run} (another seed or tank)")
        arrays["train"] = more   # its gn is checked below: the same linearised step
    sim = data_simulator(source)
    result = {"source": np.array(str(source.resolve()))}
    for split, a in arrays.items():
        result.update(split_inputs(sim, split, a, source))
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
    priors, level, _ = VARIANTS[variant]
    x = [(d[f"{prefix}_gn"][:, None] - mean) / std]
    if priors:
        x.append((d[f"{prefix}_extra"] - mean) / std)
    if level:
        plane = (d[f"{prefix}_level"].astype(np.float32) - 1) / 6
        x.append(np.broadcast_to(plane[:, None, None, None], x[0].shape))
    return torch.from_numpy(np.concatenate(x, axis=1).astype(np.float32))


class FinerOutput(nn.Module):
    """The profile's U-Net with its output upsampled ``factor`` times: nearest-upsampled features
    and bilinearly upsampled inputs -> one convolution block -> class logits."""

    def __init__(self, in_channels: int, factor: int):
        super().__init__()
        self.factor = factor
        self.body = UNetBackbone([16, 32, 64], 16, in_channels=in_channels)
        nn.init.normal_(self.body.out.weight, std=0.1)   # it feeds the head: not the backbone's zero start
        self.head = _conv_block(16 + in_channels, 16)
        self.out = nn.Conv2d(16, len(CLASS_VALUES), 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(self.body(x), scale_factor=self.factor, mode="nearest")
        up = F.interpolate(x, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return self.out(self.head(torch.cat([h, up], dim=1)))


def study_phantoms(run: Path, split: str, n: int) -> list:
    """The first ``n`` phantoms of a split of the study's data set, remade from its seed."""
    cfg, _ = load_study(run)
    with h5py.File(run / "data" / "ktc.h5") as f:
        seed = int(f.attrs["seed"])
    sim = KTCSimulator(cfg)
    return [sim.phantom(seed, split, i)[1] for i in range(n)]


def fine_classes(run: Path, out: Path, size: int, sigma: np.ndarray) -> np.ndarray:
    """The classes at ``size`` pixels of the training phantoms whose images are ``sigma`` (cached
    in ``out/classes<size>.npz``)."""
    path = out / f"classes{size}.npz"
    if path.is_file():
        return np.load(path)["train"]
    phantoms = study_phantoms(run, "train", len(sigma))
    # the phantoms are the data set's: their classes on its grid are those of its sigma (inside the disk)
    inside = disk_mask(sigma.shape[-1]).numpy()
    coarse = class_targets(sigma)
    if any((class_map(p, sigma.shape[-1]) != c)[inside].any() for p, c in zip(phantoms[:50], coarse)):
        raise SystemExit(f"{run}: the phantoms remade from the data set's seed are not its images")
    classes = np.stack([class_map(p, size) for p in phantoms])
    save(path, {"train": classes})
    return classes


def network(in_channels: int, factor: int = 1) -> nn.Module:
    """The profile's U-Net design, its class output ``factor`` times finer than its inputs."""
    if factor == 1:
        return UNetBackbone([16, 32, 64], len(CLASS_VALUES), in_channels=in_channels)
    return FinerOutput(in_channels, factor)


def train(x: torch.Tensor, target: torch.Tensor, seed: int, epochs: int = 10, batch: int = 32,
          lr: float = 1e-3) -> nn.Module:
    """``target``: (N, S, S) classes; S > the inputs' size trains :class:`FinerOutput`."""
    torch.manual_seed(seed)
    size = target.shape[-1]
    net = network(x.shape[1], size // x.shape[-1])
    inside = disk_mask(size).float()
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
    return (torch.einsum("bchw,c->bhw", p, torch.tensor(CLASS_VALUES)) * disk_mask(p.shape[-1]).float()).numpy()


def ceiling(run: Path) -> None:
    """The score of the validation phantoms themselves on coarser grids."""
    with h5py.File(run / "data" / "ktc.h5") as f:
        n = len(f["val/sigma"])
    phantoms = study_phantoms(run, "val", n)
    truths = np.stack([class_map(p, ktc.IMAGE_SIZE) for p in phantoms])
    for size in (32, 48, 64):
        images = np.stack([np.clip(p.rasterise(size, 1, inside=disk_mask(size).numpy()), 0.0, 2.0) for p in phantoms])
        best = segment.tune_thresholds(segment.upsample(images), truths)
        print(f"the {n} validation phantoms at {size} x {size} pixels: score {best['score']:.3f} "
              f"(resistive {best['resistive']:.3f}, conductive {best['conductive']:.3f}; thresholds "
              f"{best['low']:g} / {best['high']:g})", flush=True)


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


def with_ensemble(runs: list[dict], seeds: list[int]) -> list[tuple[str, dict]]:
    """Each training seed's images, tagged, then their seed ensemble (the mean image)."""
    ensemble = {k: np.mean([r[k] for r in runs], axis=0) for k in runs[0]}
    return [*((f"seed {s}", r) for s, r in zip(seeds, runs)), ("ensemble", ensemble)]


def held_out(d: dict, folder: Path, variants: list[str], seeds: list[int]) -> dict:
    """Per (variant, seed or ensemble) of the images in ``folder``: its val[48:] scores (its figures printed)."""
    held = {}
    for variant in variants:
        runs = [dict(np.load(folder / f"img_{variant}_s{seed}.npz")) for seed in seeds]
        for tag, images in with_ensemble(runs, seeds):
            chosen, held[variant, tag], public = evaluate(d, images)
            print(f"{variant:13s} {tag:8s} thresholds {chosen['low']:.1f} / {chosen['high']:.1f}  "
                  f"val[{CHOICE}:] {held[variant, tag].mean():.3f}  public {sum(public):.2f} "
                  f"(levels {' '.join(f'{x:.2f}' for x in public)})", flush=True)
    return held


def score_on(data: Path, outs: list[Path], variants: list[str], seeds: list[int]) -> None:
    """The networks of each of ``outs`` on ``data``'s validation measurements (thresholds on its
    val[:48], scores on the rest: it may hold more validation samples than the study), paired
    against the first of ``outs``."""
    with h5py.File(data) as f:
        val, seed = {k: f[f"val/{k}"][:] for k in ("sigma", "v")}, int(f.attrs["seed"])
    finer = [v for v in variants if VARIANTS[v][2] != 32]
    if finer:
        raise SystemExit(f"--score-on scores the 32-pixel variants, not {', '.join(finer)}")
    truths = None
    held = {}
    for out in outs:
        d = dict(np.load(out / "inputs.npz"))
        n = len(d["val_sigma"])
        if len(val["sigma"]) < n or not np.array_equal(val["sigma"][:n], d["val_sigma"]):
            raise SystemExit(f"{data}: its first validation phantoms are not those of {out}")
        cache = out / f"score_on_{data.parent.name}_{data.stem}.npz"
        if cache.is_file():
            ins = dict(np.load(cache))
        else:
            ins = split_inputs(data_simulator(Path(str(d["source"]))), "val", val, data)
            save(cache, ins)
        if truths is None:
            sim = data_simulator(data)
            truths = np.stack([*d["val_truths"], *(sim.truth_classes(seed, "val", i) for i in range(n, len(val["v"])))])
        ins["val_truths"] = truths
        mean, std = float(d["train_sigma"].mean()), float(d["train_sigma"].std())
        ins.update({k: v for k, v in d.items() if k.startswith("pub")})
        for variant in variants:
            runs = []
            for training_seed in seeds:
                net_path = out / f"net_{variant}_s{training_seed}.pt"
                if not net_path.is_file():
                    raise SystemExit(f"{out} has no {net_path.name}: its images were made before networks were kept; "
                                     "train them again in another --out")
                x = features(ins, "val", variant, mean, std)
                net = network(x.shape[1])
                net.load_state_dict(torch.load(net_path))
                runs.append({"val": image(net, x),
                             **{k: v for k, v in np.load(out / f"img_{variant}_s{training_seed}.npz").items() if k != "val"}})
            for tag, images in with_ensemble(runs, seeds):
                chosen, held[out, variant, tag], public = evaluate(ins, images)
                print(f"{str(out):24s} {variant:8s} {tag:8s} on {data.name} val[{CHOICE}:] {held[out, variant, tag].mean():.3f} "
                      f"(thresholds {chosen['low']:.1f} / {chosen['high']:.1f})  public {sum(public):.2f}", flush=True)
    for out in outs[1:]:
        for first, variant, tag in [key for key in held if key[0] == outs[0]]:
            iv = mean_interval(held[first, variant, tag] - held[out, variant, tag], seed=0)
            print(f"on {data.name}: {first} minus {out}, {variant} {tag}: {iv.change:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished dgm-eit run --profile ktc directory")
    ap.add_argument("--out", type=Path, required=True, help="where the inputs and images are kept")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}; the first is the baseline")
    ap.add_argument("--seeds", default="0,1", help="training seeds")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one per process: run two side by side)")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs (the profile's: 10)")
    ap.add_argument("--ceiling", action="store_true", help="print the grid's own ceiling first")
    ap.add_argument("--train-from", type=Path, help="a data set of the same seed with more training samples")
    ap.add_argument("--data", type=Path, help="train and validate on this data set instead of the study's: another "
                    "simulation (dgm-eit simulate --seed of the study) of the same phantoms")
    ap.add_argument("--score-on", type=Path, help="score the networks of --out (and --compare-with) on the validation "
                    "split of this data set (the same phantoms, another simulation): each through its own linearised step")
    ap.add_argument("--compare-with", type=Path, help="another --out: its images of the same variants and seeds, "
                    "paired with these on val[48:]")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.ceiling:
        ceiling(args.run)
    d = inputs(args.run, args.out, args.train_from, args.data)
    mean, std = float(d["train_sigma"].mean()), float(d["train_sigma"].std())
    for variant in variants:
        for seed in seeds:
            path = args.out / f"img_{variant}_s{seed}.npz"
            if path.is_file():
                continue
            started = time.perf_counter()
            size, sigma = VARIANTS[variant][2], d["train_sigma"]
            target = (torch.from_numpy(fine_classes(args.run, args.out, size, sigma).astype(np.int64)) if size != sigma.shape[-1]
                      else torch.from_numpy(class_targets(sigma)).long())
            net = train(features(d, "train", variant, mean, std), target, seed, epochs=args.epochs)
            torch.save(net.state_dict(), args.out / f"net_{variant}_s{seed}.pt")   # before the images: they mark it done
            images = {"val": image(net, features(d, "val", variant, mean, std))}
            images.update({f"pub{level}": image(net, features(d, f"pub{level}", variant, mean, std))
                           for level in ktc.LEVELS})
            save(path, images)
            print(f"{variant} seed {seed}: trained in {time.perf_counter() - started:.0f} s", flush=True)
    if args.score_on:
        score_on(args.score_on, [args.out] + ([args.compare_with] if args.compare_with else []), variants, seeds)
        return
    held = held_out(d, args.out, variants, seeds)
    for variant, tag in [key for key in held if key[0] != variants[0]]:
        iv = mean_interval(held[variant, tag] - held[variants[0], tag], seed=0)
        print(f"{variant:13s} {tag:8s} minus {variants[0]}: {iv.change:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]")
    if args.compare_with:
        print(f"the same variants and seeds in {args.compare_with}:")
        other = held_out(d, args.compare_with, variants, seeds)
        for key, scores in held.items():
            iv = mean_interval(scores - other[key], seed=0)
            print(f"{key[0]:13s} {key[1]:8s} minus {args.compare_with}: {iv.change:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]")

if __name__ == "__main__":
    main()
