"""``dgm-eit simulate``: make a data set (phantoms, voltages, Gauss-Newton images) in one HDF5 file."""

from __future__ import annotations

import argparse

from dgm_eit.commands.common import add_profile_args, add_seed_arg

HELP = "simulate a data set: phantoms, noisy voltages and Gauss-Newton images (resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_args(parser, default="quick")
    parser.add_argument("--anomalies", type=int, default=None,
                        help="anomalies per phantom (the paper: 2 or 4); sets data.anomalies")
    parser.add_argument("--snr-db", type=float, default=None, help="noise level in dB; sets data.snr_db")
    parser.add_argument("--out", default=None,
                        help="output HDF5 file (default: data/PROFILE-aA-snrS-seedN.h5)")
    parser.add_argument("--workers", type=int, default=None,
                        help="local worker processes (default: all usable cores)")
    add_seed_arg(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output (or unfinished .partial file) made with another config")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="run the samples on a Dask distributed cluster, e.g. tcp://host:8786 "
                             "(needs pip install 'dgm-eit[distributed]'; dgm-eit installed on the workers)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="samples per resumable chunk (default 16; an unfinished run keeps its own)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dgm_eit.config import load_config
    from dgm_eit.data.simulate import default_output, resolve_simulation_config, simulate_dataset
    from dgm_eit.errors import InputError

    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise InputError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    cfg = resolve_simulation_config(load_config(args.profile, args.overrides),
                                    anomalies=args.anomalies, snr_db=args.snr_db)
    out = args.out or default_output(cfg, args.seed)
    # the output's folder is made once the config has been checked (nothing left by a refusal)
    result = simulate_dataset(cfg, out, seed=args.seed, workers=args.workers, overwrite=args.overwrite,
                              scheduler=args.scheduler, chunk_size=args.chunk_size, progress=not args.quiet)
    if result.status == "done":
        sizes = ", ".join(f"{k} {v}" for k, v in result.sizes.items())
        rate = result.samples_run / result.seconds if result.seconds > 0 else float("nan")
        resumed = f", {result.resumed_samples} resumed" if result.resumed_samples else ""
        print(f"wrote {result.path} ({sizes}; {result.samples_run} samples in {result.seconds:.1f} s, "
              f"{rate:.1f} samples/s{resumed})")
    else:
        print(f"{result.path} is already complete with this config and seed; nothing to do")
    return 0
