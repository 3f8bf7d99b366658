"""``dgm-eit ktc INPUT_DIR OUTPUT_DIR LEVEL``: the KTC2023 entry point with a trained study."""

from __future__ import annotations

import argparse

from dgm_eit.commands.common import add_device_arg, add_seed_arg
from dgm_eit.ktc import ALL_METHODS

HELP = ("reconstruct KTC2023 measurements as the challenge's entry point does: INPUT_DIR/ref.mat and "
        "data<n>.mat -> OUTPUT_DIR/<n>.mat (256 x 256 uint8 classes), with a study made by "
        "dgm-eit run --profile ktc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", metavar="INPUT_DIR", help="folder with ref.mat and data<n>.mat files")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder for <n>.mat (created if missing)")
    parser.add_argument("level", metavar="LEVEL", type=int, help="difficulty level 1..7 (electrodes 1..2(L-1) dropped)")
    parser.add_argument("--run", required=True, metavar="DIR", help="directory made by dgm-eit run --profile ktc")
    parser.add_argument("--method", default=None, choices=ALL_METHODS,
                        help="method to use; a trained one uses its first seed's model, <method>-ens the seed "
                             "ensemble of a study run with --seeds K > 1 (default: the study's best on simulated "
                             "validation data, ties going to a seed ensemble; stderr says which and why)")
    add_seed_arg(parser)
    add_device_arg(parser)


def run(args) -> int:
    import sys
    from pathlib import Path

    from dgm_eit.datasets.ktc2023 import removed_electrodes
    from dgm_eit.errors import InputError
    from dgm_eit.ktc.segment import segment_images
    from dgm_eit.ktc import METHOD_NAMES
    from dgm_eit.ktc.study import Methods, default_method, load_study, real_targets, seeded, write_submission
    from dgm_eit.runtime import check_seed, limit_threads, resolve_device

    removed_electrodes(args.level)   # refuses a bad level before any work
    check_seed(args.seed)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"OUTPUT_DIR {out} exists and is not a directory")
    cfg, chosen = load_study(args.run)
    chosen = {m: record for m, record in chosen.items() if "score" in record}   # a seed's choice may be pending
    if args.method is None:
        method, why = default_method(chosen, resamples=int(cfg["run"]["bootstrap_resamples"]))
    else:
        method, why = args.method, None
    if method not in chosen:
        raise InputError(f"{args.run} has no settings for method {method!r} (it ran {', '.join(chosen)})")
    record = chosen[method]["seeds"][0] if seeded(method) else chosen[method]
    limit_threads()
    numbers, real = real_targets(args.input_dir, [args.level])
    if why is not None:   # after the inputs are read: a refused command says one line
        print(f"dgm-eit ktc: method {METHOD_NAMES[method]}: {why}", file=sys.stderr)
    methods = Methods(cfg, Path(args.run), seed=args.seed, device=str(resolve_device(args.device)))
    data = real["levels"][args.level]
    recon = methods.reconstruct(method, data["dv"], data["masks"], record)["recon"]
    classes = segment_images(recon, record["low"], record["high"])
    write_submission(out, numbers, classes)
    print(f"{METHOD_NAMES[method]} (val score {record['score']:.3f}), level {args.level}: wrote "
          f"{len(numbers)} reconstruction(s) to {out}")
    return 0
