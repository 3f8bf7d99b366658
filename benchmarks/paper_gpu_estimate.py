"""The paper study's time on the measured device, from ``benchmarks/paper_gpu.sh``'s outputs.

    python benchmarks/paper_gpu_estimate.py OUT_DIR [PROFILE]

Reads ``OUT_DIR/bench_train.json`` (optimiser steps per second of every model stage at the
paper's batch sizes, per variant), ``OUT_DIR/run`` (the shortened ``dgm-eit run --profile
paper``: its stage times and reconstruction files) and the paper profile, and prints each
stage's measured time, then the full study's: training = the profile's optimiser steps / the
measured rate (the ``profile`` variant, i.e. the profile's own speed settings, and the best
kept variant); reconstruction = the measured seconds per network evaluation x the profile's
evaluations per image x its test images (plus CSD*'s validation sweeps); data = the measured
seconds per sample x the profile's samples. Validation passes during training are not in it
(a forward pass over 2,160 images per epoch, a few per cent of an epoch's steps).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dgm_eit.config import load_config
from dgm_eit.experiments import Experiment
from dgm_eit.methods import select_methods
from dgm_eit.models import MODELS
from dgm_eit.results import recon_attrs


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(out: Path, profile: str = "paper") -> None:
    cfg = load_config(profile)
    seeds = int(cfg["run"]["seeds"])
    bench = json.loads((out / "bench_train.json").read_text())
    rates: dict[tuple[str, str], dict[str, float]] = {}
    for row in bench["rows"]:
        if "steps_per_s" in row:
            rates.setdefault((row["model"], row["stage"]), {})[row["variant"]] = row
    print(f"device {bench['device']}; {profile} profile, {seeds} seed(s) per model")
    print("\nmeasured: optimiser steps per second at the paper's batch sizes")
    for (model, stage), rows in rates.items():
        kept = [v for v, r in rows.items() if r.get("keep")]
        line = ", ".join(f"{v} {r['steps_per_s']:.1f}" for v, r in rows.items())
        print(f"  {model}/{stage}: {line}; kept (faster, val loss within 1%): {', '.join(kept) or 'none'}")

    exp = Experiment(cfg, out / "unused", seed=0)
    runs = exp.training_runs()   # (run label, data set, seed index) of the full study
    n_train = int(cfg["data"]["n_train"])
    total = {"profile": 0.0, "fp32": 0.0}
    print("\nfull study, training (optimiser steps / measured rate):")
    for label in dict.fromkeys(m for m, _, _ in runs):
        count = sum(1 for m, _, _ in runs if m == label)
        method = exp.trains(label)   # a run label is a model's name or a method's own (cvae-v)
        model, own = method.model, method.configure(cfg)
        for stage in MODELS[model].stages:
            sc = own[model][stage]
            steps = n_train // int(sc["batch_size"]) * int(sc["epochs"])
            measured = rates.get((model, stage), {})
            for variant in total:
                if variant in measured:
                    total[variant] += count * steps / measured[variant]["steps_per_s"]
            if "profile" in measured:
                print(f"  {label}/{stage}: {count} runs x {steps:,} steps at {measured['profile']['steps_per_s']:.1f}/s "
                      f"= {hours(count * steps / measured['profile']['steps_per_s'])}")
    print(f"  training in all: {hours(total['profile'])} with the profile's settings, "
          f"{hours(total['fp32'])} in plain fp32")

    run_dir = out / "run"
    stages = json.loads((run_dir / "stages.json").read_text()) if (run_dir / "stages.json").exists() else {}
    print("\nmeasured stages of the shortened run (seconds):")
    for name, record in stages.items():
        print(f"  {name}: {record.get('status')} {record.get('seconds', record.get('seconds_per_image', ''))}"
              f" {record.get('device', '')} {record.get('message', '')[:120]}")
    short = json.loads((run_dir / "run.json").read_text())["config"] if (run_dir / "run.json").exists() else None
    recon = 0.0
    if short is not None:
        n_test = int(cfg["data"]["n_test"])
        tables = len(exp.settings)
        print("\nfull study, reconstruction (measured seconds per network evaluation x the profile's):")
        for method in select_methods(cfg["run"]["methods"]):
            if method.model is None:
                continue
            files = sorted((run_dir / "recon").glob(f"{method.key}_*_seed0.h5"))
            attrs = [recon_attrs(f) for f in files]
            if not attrs:
                continue
            per_nfe = sum(a["seconds_per_image"] / max(1, a["nfe"]) for a in attrs) / len(attrs)
            nfe = attrs[0]["nfe"]
            if method.sampler(cfg["run"]) is not None:   # the score prior: the profile's reverse steps, not the shortened run's
                steps = int(cfg["csd"]["n_steps"]) * (1 + int(cfg["csd"]["corrector_steps"]))
                nfe = nfe / (int(short["csd"]["n_steps"]) * (1 + int(short["csd"]["corrector_steps"]))) * steps
            seconds = per_nfe * nfe * n_test * tables * seeds
            if method.tunes_t0:
                sweep = len(cfg["run"]["csd_tune_t0"]) * int(cfg["run"]["csd_tune_images"]) * nfe / int(cfg["run"]["csd_samples"])
                seconds += per_nfe * sweep * tables * seeds
            recon += seconds
            print(f"  {method.name}: {per_nfe * 1e3:.2f} ms per evaluation, {nfe:.0f} per image -> {hours(seconds)}")
        data = [r["seconds"] for k, r in stages.items() if k.startswith("data ") and "seconds" in r]
        n_short = sum(int(short["data"][k]) for k in ("n_train", "n_val", "n_test"))
        n_full = sum(int(cfg["data"][k]) for k in ("n_train", "n_val", "n_test"))
        data_s = (sum(data) / len(data)) / n_short * n_full * len(exp.datasets()) if data else 0.0
        print(f"\nfull study, data: {len(exp.datasets())} sets x {n_full:,} samples -> {hours(data_s)} "
              "(the device's CPU cores; GN and the FEM run on the CPU)")
        print(f"\nfull {profile} study on this device: about {hours(total['profile'] + recon + data_s)} "
              f"(training {hours(total['profile'])}, reconstruction {hours(recon)}, data {hours(data_s)})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3])
