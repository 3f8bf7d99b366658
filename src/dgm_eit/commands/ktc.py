"""``dgm-eit ktc INPUT_DIR OUTPUT_DIR LEVEL``: the KTC2023 entry point with a trained study."""

from __future__ import annotations

import argparse

from dgm_eit.commands.common import add_device_arg, add_seed_arg

HELP = ("reconstruct KTC2023 measurements as the challenge's entry point does: INPUT_DIR/ref.mat and "
        "data<n>.mat -> OUTPUT_DIR/<n>.mat (256 x 256 uint8 classes), with the study shipped with dgm-eit "
        "or one made by dgm-eit run --profile ktc (--run)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", metavar="INPUT_DIR", help="folder with ref.mat and data<n>.mat files")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR",
                        help="folder for <n>.mat (created if missing; not INPUT_DIR, not inside the study)")
    parser.add_argument("level", metavar="LEVEL", type=int, help="difficulty level 1..7 (electrodes 1..2(L-1) dropped)")
    parser.add_argument("--run", default=None, metavar="DIR",
                        help="directory made by dgm-eit run --profile ktc, or a folder packed by dgm-eit ktc-pack "
                             "(default: the study shipped with dgm-eit, one training seed; its provenance is in "
                             "dgm_eit/ktc/shipped/provenance.json)")
    parser.add_argument("--method", default=None, metavar="METHOD",
                        help="a method the study ran (its key: linear, gn, cnf, ...); a trained one uses its first seed's model, <method>-ens the seed "
                             "ensemble of a study run with --seeds K > 1 (default: the study's best on simulated "
                             "validation data, ties going to a seed ensemble; stderr says which and why)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files <n>.mat in OUTPUT_DIR that are not reconstructions (a reconstruction "
                             "file, one variable 'reconstruction', is replaced anyway)")
    add_seed_arg(parser)
    add_device_arg(parser)


def run(args) -> int:
    import sys

    from dgm_eit.ktc.entry import reconstruct_folder

    made = reconstruct_folder(args.input_dir, args.level, args.run, output_dir=args.output_dir,
                              method=args.method, seed=args.seed, device=args.device, overwrite=args.overwrite)
    if made.why is not None:
        print(f"dgm-eit ktc: method {made.name}: {made.why}", file=sys.stderr)
    print(f"{made.name} (val score {made.val_score:.3f}), level {args.level}: wrote "
          f"{len(made.numbers)} reconstruction(s) to {args.output_dir}")
    return 0
