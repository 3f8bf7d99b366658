"""``dgm-eit ktc INPUT_DIR OUTPUT_DIR LEVEL``: the KTC2023 entry point with a trained study."""

from __future__ import annotations

import argparse

from dgm_eit.commands.common import add_device_arg, add_seed_arg

HELP = ("reconstruct KTC2023 measurements as the challenge's entry point does: INPUT_DIR/ref.mat and "
        "data<n>.mat -> OUTPUT_DIR/<n>.mat (256 x 256 uint8 classes), with a study made by "
        "dgm-eit run --profile ktc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", metavar="INPUT_DIR", help="folder with ref.mat and data<n>.mat files")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder for <n>.mat (created if missing; not INPUT_DIR)")
    parser.add_argument("level", metavar="LEVEL", type=int, help="difficulty level 1..7 (electrodes 1..2(L-1) dropped)")
    parser.add_argument("--run", required=True, metavar="DIR", help="directory made by dgm-eit run --profile ktc")
    parser.add_argument("--method", default=None, choices=("linear", "gn", "cvae", "cnf", "csd"),
                        help="method to use (default: the study's best on simulated validation data)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files <n>.mat in OUTPUT_DIR that are not reconstructions (a reconstruction "
                             "file, one variable 'reconstruction', is replaced anyway)")
    add_seed_arg(parser)
    add_device_arg(parser)


def run(args) -> int:
    from pathlib import Path

    from dgm_eit.datasets.ktc2023 import is_reconstruction_file, removed_electrodes, write_reconstruction
    from dgm_eit.errors import InputError
    from dgm_eit.files import check_output
    from dgm_eit.ktc.segment import segment_images
    from dgm_eit.ktc import METHOD_NAMES
    from dgm_eit.ktc.study import Methods, load_study, real_targets
    from dgm_eit.runtime import check_seed, limit_threads, resolve_device

    removed_electrodes(args.level)   # refuses a bad level before any work
    check_seed(args.seed)
    source, out = Path(args.input_dir), Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"OUTPUT_DIR {out} exists and is not a directory")
    if out.resolve() == source.resolve():
        raise InputError(f"OUTPUT_DIR {out} is INPUT_DIR {source}: <n>.mat would land among the inputs; "
                         "choose another folder")
    cfg, chosen = load_study(args.run)
    method = args.method or max(chosen, key=lambda m: chosen[m]["score"])
    if method not in chosen:
        raise InputError(f"{args.run} has no settings for method {method!r} (it ran {', '.join(chosen)})")
    # the inputs, then every output file, are checked before the models are loaded
    numbers, real = real_targets(source, [args.level], truths=False)
    targets = [out / f"{n}.mat" for n in numbers]
    for target in targets:
        check_output(target, own_kind=is_reconstruction_file, overwrite=args.overwrite, option="OUTPUT_DIR file",
                     kind="reconstruction file (one variable 'reconstruction')")
    limit_threads()
    methods = Methods(cfg, Path(args.run), seed=args.seed, device=str(resolve_device(args.device)))
    data = real["levels"][args.level]
    recon = methods.reconstruct(method, data["dv"], data["masks"], chosen[method])["recon"]
    classes = segment_images(recon, chosen[method]["low"], chosen[method]["high"])
    out.mkdir(parents=True, exist_ok=True)
    for target, image in zip(targets, classes):
        write_reconstruction(target, image)
    print(f"{METHOD_NAMES[method]} (val score {chosen[method]['score']:.3f}), level {args.level}: wrote "
          f"{len(numbers)} reconstruction(s) to {out}")
    return 0
