"""``dgm-eit tune-t0 --run RUN_DIR --data FILE``: choose CSD*'s insertion time and step count.

The paper picks the step at which the Gauss-Newton image enters the reverse process by
trial; this sweeps ``t0`` x ``n_steps`` (x insertion mode) on the validation split, scores
each setting by MSE against the ground truth, and records the table and the best setting
in ``RUN_DIR/tuned_csd.json``, which ``dgm-eit reconstruct`` then uses for the score model.
"""

from __future__ import annotations

import argparse
import sys

from dgm_eit.commands.common import add_device_arg, add_seed_arg

HELP = "sweep CSD*'s insertion time t0 and step count on the validation split; record the best in the run dir"


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a trained score run (dgm-eit train score)")
    parser.add_argument("--data", required=True, metavar="FILE", help="data set file with a val split")
    parser.add_argument("--t0", type=_float_list, default=None, metavar="LIST",
                        help="insertion times, e.g. 0.3,0.4,0.5 (default: 6 values from the config's t0 - 0.3 to t0 + 0.2)")
    parser.add_argument("--steps", type=_int_list, default=None, metavar="LIST",
                        help="reverse step counts, e.g. 25,50,100 (default: the config's n_steps)")
    parser.add_argument("--modes", type=_str_list, default=None, metavar="LIST",
                        help="insertion modes: replace, ccdf, or replace,ccdf for both (default: the config's mode)")
    parser.add_argument("--sampler", default=None, choices=("csd", "dds"),
                        help="csd (the paper's CSD*) or dds (CSD* with data consistency; the noise level is the "
                             "data set's) (default: the config's csd.sampler when it is one of these, else csd)")
    parser.add_argument("--solver", default=None, choices=("pc", "ode"), help="inner sampler of csd (default: the config's)")
    parser.add_argument("--corrector-steps", type=int, default=None, metavar="C",
                        help="Langevin steps per predictor step (default: the config's)")
    parser.add_argument("--n-val", type=int, default=64, metavar="K",
                        help="validation images used (default: %(default)s; 0 = all)")
    parser.add_argument("--tolerance", type=float, default=0.0, metavar="TOL",
                        help="best = the cheapest setting whose MSE is within (1 + TOL) of the lowest "
                             "(default: %(default)s, the lowest)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per batch (default: %(default)s)")
    parser.add_argument("--weights", default="model", choices=("model", "best"),
                        help="final weights or best-on-validation (default: %(default)s)")
    add_seed_arg(parser)
    add_device_arg(parser)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import numpy as np

    from dgm_eit import runtime
    from dgm_eit.data.storage import dataset_config, read_split
    from dgm_eit.errors import InputError
    from dgm_eit.files import write_text
    from dgm_eit.metrics import per_sample
    from dgm_eit.models.posterior import SETTING_KEYS, TUNABLE_SAMPLERS
    from dgm_eit.runs import TUNED_FILE, load_run
    from dgm_eit.tuning import default_t0_grid, pick_best, sweep

    if args.n_val < 0:
        raise InputError(f"--n-val must be >= 0, got {args.n_val}")
    if args.tolerance < 0:
        raise InputError(f"--tolerance must be >= 0, got {args.tolerance}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    runtime.check_seed(args.seed)
    runtime.seed_everything(args.seed)
    model, cfg, info = load_run(args.run, runtime.resolve_device(args.device), weights=args.weights)
    if model.name != "score":
        raise InputError(f"{args.run} holds a {model.name!r} run; tune-t0 needs a score run")
    csd = cfg["csd"]
    sampler = args.sampler or (csd["sampler"] if csd["sampler"] in TUNABLE_SAMPLERS else "csd")
    t0s = args.t0 or default_t0_grid(float(csd["t0"]))
    steps = args.steps or [int(csd["n_steps"])]
    modes = args.modes or [csd["mode"]]
    solver = args.solver or csd["solver"]
    corrector = int(csd["corrector_steps"]) if args.corrector_steps is None else args.corrector_steps
    bad = [t for t in t0s if not 0 <= t <= 1]
    if bad:
        raise InputError(f"--t0 values must lie in [0, 1], got {bad}")
    if any(s < 1 for s in steps):
        raise InputError(f"--steps values must be >= 1, got {steps}")
    if any(m not in ("replace", "ccdf") for m in modes):
        raise InputError(f"--modes must be replace and/or ccdf, got {modes}")

    arrays = read_split(args.data, "val", keys=("sigma", "gn", "v"))
    if args.n_val:
        arrays = {k: a[:args.n_val] for k, a in arrays.items()}
    if arrays["gn"].shape[-1] != info.image_size:
        raise InputError(f"{args.data} has {arrays['gn'].shape[-1]}-pixel images, the run was trained on {info.image_size}")
    arrays = {k: np.ascontiguousarray(a, dtype=np.float32) for k, a in arrays.items()}
    # dds weighs the measurements by their noise level: the one this data set was made with
    snr_db = dataset_config(args.data).get("data", {}).get("snr_db")
    if snr_db is not None:
        cfg = {**cfg, "data": {**cfg["data"], "snr_db": snr_db}}
    n = len(arrays["gn"])
    gn_metrics = per_sample(arrays["gn"], arrays["sigma"])
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    log(f"tune-t0: sampler {sampler}, {len(t0s) * len(steps) * len(modes)} settings on {n} validation images; "
        f"GN: MSE={np.mean(gn_metrics['MSE']):.5f} SSIM={np.mean(gn_metrics['SSIM']):.4f}")
    rows = sweep(model, cfg, arrays, t0s=t0s, steps=steps, modes=modes, solver=solver,
                 corrector_steps=corrector, seed=args.seed, batch_size=args.batch_size, log=log, sampler=sampler)
    best = pick_best(rows, args.tolerance)
    result = {
        "metric": "mse", "split": "val", "n_val": n, "seed": int(args.seed),
        "data": str(Path(args.data).resolve()), "tolerance": float(args.tolerance),
        "gn": {"mse": float(np.mean(gn_metrics["MSE"])), "ssim": float(np.mean(gn_metrics["SSIM"]))},
        "table": rows,
        "best": {"sampler": sampler, **{k: best[k] for k in SETTING_KEYS}},
        "best_scores": {k: best[k] for k in ("mse", "ssim", "nfe")},
    }
    path = Path(args.run) / TUNED_FILE
    write_text(path, json.dumps(result, indent=2))
    print(f"{path}: best {sampler} t0={best['t0']:g} n_steps={best['n_steps']} mode={best['mode']} "
          f"(NFE {best['nfe']}, val MSE {best['mse']:.5f}, SSIM {best['ssim']:.4f})")
    return 0
