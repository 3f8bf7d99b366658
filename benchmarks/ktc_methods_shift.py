"""Does a simulated validation set with an error the study's data lack order the methods as the
tank does? Probe of issue 20, item 1 (prints its figures).

Every method of a finished ``dgm-eit run --profile ktc`` study, with the settings and thresholds
its ``methods.json`` chose (every seed, and the seed ensembles), reconstructs the validation
samples ``[--first, --first + --images)`` of each data set in ``--data``: data sets of the study's
seed, so the same phantoms, levels and noise, each with measurements of its own, for example

    dgm-eit simulate --profile ktc --seed 0 --set data.n_train=0 --set data.n_val=300 --out plain.h5
    dgm-eit simulate --profile ktc --seed 0 --set data.n_train=0 --set data.n_val=300 \\
        --set tank.drift_std=0.05 --out drift.h5

(with ``--set linear.prior_std=... --set linear.corr_length=... --set 'linear.tune_prior_std=[]'
--set 'linear.tune_corr_length=[]'`` set to the study's chosen prior, so that the files need no
tuning: the methods use the study's own linearised step whatever the file holds). Images from
``--first`` on were not used by any of the study's choices (it chooses on ``val[:100]``).

Per data set: every method's mean score with its 95% interval (images and seeds), the public
targets' totals of the study's ``scores.csv`` beside them, the rank correlation of the two, and
how many of the pairs of methods the set separates the targets order the same way
(:func:`dgm_eit.stats.paired_interval`, :func:`dgm_eit.stats.order_agreement`: the measures of the
study's report). Scores are cached per data set, method and seed in ``--out`` (a run resumes).
``--compare-with OTHER`` (another study's ``--out`` on the same data sets and images) adds, per
method both studies have, the paired difference this study minus the other, and per seed;
``--methods`` scores some of the study's methods only.

    python benchmarks/ktc_methods_shift.py --run runs/ktc --data plain.h5,drift.h5 --out shift
    python benchmarks/ktc_methods_shift.py --run runs/ktc2 --data plain.h5,drift.h5 --out shift2 --compare-with shift
"""

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np

from dgm_eit.datasets import ktc2023 as ktc
from dgm_eit.ktc.bundle import SCORES, read_scores
from dgm_eit.ktc.physics import recorded_linear_model
from dgm_eit.ktc.segment import segment_images
from dgm_eit.ktc.study import Methods, load_study, validation_pairs
from dgm_eit.ktc.tank import level_masks, row_levels
from dgm_eit.methods import get_method
from dgm_eit.stats import mean_interval, order_agreement, paired_interval, rank_agreement


def validation_rows(methods: Methods, data: Path, first: int, n: int) -> dict:
    """Difference voltages, level masks and class truths of ``data``'s validation samples
    ``[first, first + n)``, checked to be the study's phantoms."""
    sim, seed = methods.sim, methods.seed
    with h5py.File(data) as f:
        if int(f.attrs["seed"]) != seed:
            raise SystemExit(f"{data}: seed {int(f.attrs['seed'])}, the study's is {seed}")
        if len(f["val/v"]) < first + n:
            raise SystemExit(f"{data}: {len(f['val/v'])} validation samples, need {first + n}")
        v, sigma = f["val/v"][first:first + n].astype(np.float64), f["val/sigma"][first:first + n]
    for i in range(min(n, 3)):
        if not np.array_equal(sim.measure(seed, "val", first + i)["sigma"].astype(sigma.dtype), sigma[i]):
            raise SystemExit(f"{data}: validation sample {first + i} is not the study's phantom")
    masks = level_masks(sim.tank.ref.injections, sim.tank.ref.pattern)
    keep = np.stack([masks[level] for level in row_levels(v, masks)])
    truths = np.stack([sim.truth_classes(seed, "val", first + i) for i in range(n)])
    return {"dv": v, "masks": keep, "truths": truths}


def cache_file(cache: Path, key: str, k: int) -> Path:
    """Where one method's per-image scores of training seed ``k`` are cached."""
    return cache / f"{key}_s{k}.npy"


def method_scores(methods: Methods, chosen: dict, val: dict, cache: Path) -> dict[str, np.ndarray]:
    """Per method of ``chosen``: (seeds, images) challenge scores with its own settings and thresholds."""
    out = {}
    for key, record in chosen.items():
        method = get_method(key)
        rows = []
        for k, choice in enumerate(record["seeds"] if method.seeded else [record]):
            path = cache_file(cache, key, k)
            if not path.is_file():
                started = time.perf_counter()
                images = methods.reconstruct(method, val["dv"], val["masks"], choice, k)["recon"]
                classes = segment_images(images, choice["low"], choice["high"])
                scores = np.array([ktc.score(c, t) for c, t in zip(classes, val["truths"])])
                tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, scores)
                os.replace(tmp, path)
                print(f"  {key} seed {k}: {scores.mean():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
            rows.append(np.load(path))
        out[key] = np.stack(rows)
    return out


def public_totals(run: Path) -> dict[str, float]:
    """Per method: the public targets' total (over levels and targets), the mean over its seeds."""
    totals = defaultdict(lambda: defaultdict(float))
    for row in read_scores(run / SCORES):
        totals[row["method"]][row["seed"]] += row["score"]
    return {m: float(np.mean(list(by_seed.values()))) for m, by_seed in totals.items()}


def cached_scores(cache: Path, key: str) -> np.ndarray | None:
    """(seeds, images) scores of one method cached by another run of this script, or None."""
    rows = []
    while cache_file(cache, key, len(rows)).is_file():
        rows.append(np.load(cache_file(cache, key, len(rows))))
    return np.stack(rows) if rows else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished dgm-eit run --profile ktc directory")
    ap.add_argument("--data", required=True, help="comma-separated data sets of the study's seed")
    ap.add_argument("--out", type=Path, required=True, help="where the scores are cached")
    ap.add_argument("--first", type=int, default=100, help="first validation sample scored")
    ap.add_argument("--images", type=int, default=200, help="validation samples scored")
    ap.add_argument("--compare-with", type=Path, help="another study's --out of this script on the same data")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the intervals")
    ap.add_argument("--methods", help="comma-separated methods of the study to score (default: all of them)")
    args = ap.parse_args()
    cfg, chosen = load_study(args.run)
    if args.methods:
        keys = args.methods.split(",")
        unknown = set(keys) - set(chosen)
        if unknown:
            raise SystemExit(f"--methods: the study did not run {', '.join(sorted(unknown))}; it ran {', '.join(chosen)}")
        chosen = {key: chosen[key] for key in keys}
    with h5py.File(args.run / "data" / "ktc.h5") as f:
        seed = int(f.attrs["seed"])
    methods = Methods(cfg, args.run, seed=seed, linear_model=recorded_linear_model(chosen))
    public = {key: total for key, total in public_totals(args.run).items() if key in chosen}
    for data in (Path(p) for p in args.data.split(",")):
        print(f"{data}: validation samples {args.first}-{args.first + args.images - 1}", flush=True)
        cache = args.out / f"{data.parent.name}_{data.stem}_{args.first}_{args.images}"
        cache.mkdir(parents=True, exist_ok=True)
        scores = method_scores(methods, chosen, validation_rows(methods, data, args.first, args.images), cache)
        means = {}
        for key, s in scores.items():
            iv = mean_interval(s, resamples=args.resamples, seed=0)
            means[key] = iv.change
            print(f"  {key:9s} {iv.change:.3f} [{iv.low:.3f}, {iv.high:.3f}]   public {public[key]:.2f}")
        pairs = validation_pairs({k: {"seeds": [{"image_scores": r} for r in s]} for k, s in scores.items()},
                                 resamples=args.resamples)
        split = order_agreement(pairs, public)
        separated = len(split["agree"]) + len(split["disagree"])
        print(f"  rank correlation with the public totals {rank_agreement(means, public):.2f}; of {len(pairs)} pairs "
              f"it separates {separated}, the targets order {len(split['agree'])} alike; not "
              f"{', '.join(f'{a} vs {b}' for a, b in split['disagree']) or '-'}", flush=True)
        for key, s in scores.items() if args.compare_with else ():
            other = cached_scores(args.compare_with / cache.name, key)
            if other is not None:
                iv = paired_interval(s, other, resamples=args.resamples)
                seeds = " / ".join(f"{a.mean() - b.mean():+.3f}" for a, b in zip(s, other)) if len(s) > 1 else ""
                print(f"  {key:9s} minus {args.compare_with}: {iv.change:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]"
                      + (f"; per seed {seeds}" if seeds else ""))


if __name__ == "__main__":
    main()
