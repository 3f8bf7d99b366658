"""``dgm-eit run``: the paper's Tests 1-3 end to end (data, training, reconstruction, report)."""

from __future__ import annotations

import argparse

from dgm_eit.commands.common import add_device_arg, add_profile_args, add_seed_arg

HELP = ("the main job (--profile ktc: the same models on the KTC2023 water tank): simulate the 2/4-anomaly data "
        "sets at two noise levels, train the models the methods of run.methods need, reconstruct with each "
        "method, write report.md, metrics.csv and figures (re-run to resume)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_args(parser, default="quick")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (re-use it to resume)")
    add_seed_arg(parser)
    parser.add_argument("--seeds", type=int, default=None, metavar="K",
                        help="train every model K times, with seeds derived from --seed (run.seeds; default: the "
                             "profile's); the tables give the mean and spread over the K, and K > 1 adds a seed "
                             "ensemble of every trained method")
    add_device_arg(parser)


def run(args) -> int:
    import sys

    from dgm_eit.config import load_config
    from dgm_eit.experiments import Experiment
    from dgm_eit.files import output_lock
    from dgm_eit.report import write_outputs
    from dgm_eit.runtime import limit_threads, resolve_device

    overrides = list(args.overrides) + ([] if args.seeds is None else [f"run.seeds={args.seeds}"])
    cfg = load_config(args.profile, overrides)
    limit_threads()
    device = resolve_device(args.device)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    from dgm_eit.ktc.simulate import is_ktc

    if is_ktc(cfg):
        return _run_ktc(cfg, args, str(device), log)
    experiment = Experiment(cfg, args.out, seed=args.seed, device=str(device), log=log)
    # one writer per output directory, taken before any work
    with output_lock(args.out, "dgm-eit run"):
        result = experiment.run()
        paths = write_outputs(result)
    failures = result.failures
    print(f"report: {paths['report']}\nmetrics: {paths['metrics']} (per image: {paths['per_sample'].name}; "
          f"intervals: {paths['intervals'].name})\n"
          f"figures: {len([s for s in result.settings if s.figure]) + ('calibration' in paths)} in "
          f"{result.out / 'figures'}")
    if failures:
        print(f"dgm-eit run: {len(failures)} stage(s) did not complete: " + "; ".join(
            f"{name} ({record.get('status')}: {record.get('message', '')})" for name, record in failures.items()),
            file=sys.stderr)
        return 1
    return 0


def _run_ktc(cfg: dict, args, device: str, log) -> int:
    from dgm_eit.files import output_lock
    from dgm_eit.ktc.study import Study

    study = Study(cfg, args.out, seed=args.seed, device=device, log=log)
    with output_lock(args.out, "dgm-eit run"):
        paths = study.run()["paths"]
    print(f"report: {paths['report']}\nscores: {paths['scores']}\nfigure: {paths['figure']}")
    return 0
