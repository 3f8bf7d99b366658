"""``dgm-eit reconstruct``: images from a trained run, for a data-set split or your own voltages."""

from __future__ import annotations

import argparse
import sys

from dgm_eit.commands.common import add_device_arg, add_seed_arg

HELP = "reconstruct images with a trained run (a data-set split, or --voltages FILE.npy)"
# the score model's samplers (dgm_eit.models.samplers.SAMPLERS; a test keeps them equal),
# listed here so that --help stays fast
SAMPLER_NAMES = ("pc", "ode", "csd", "dds", "dps")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory made by dgm-eit train")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="FILE", help="data set file; reconstruct one of its splits")
    source.add_argument("--voltages", metavar="FILE.npy", help="your measurements: (M,) or (N, M) absolute voltages (not differences) "
                        "in the run's protocol order (adjacent: value 13 i + j is the j-th pair U[m+1] - U[m] "
                        "not touching electrodes i, i+1 while unit current enters i and leaves i+1, as pyEIT), "
                        "for unit current and background conductivity 1")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"),
                        help="split of --data (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="RECON.h5 for --data; X.npy or X.png for --voltages")
    parser.add_argument("--samples", type=int, default=None, metavar="K",
                        help="posterior samples per image for sampling models (default: the model's own)")
    parser.add_argument("--sampler", default=None, metavar="NAME",
                        help="sampler of a score run: " + " | ".join(SAMPLER_NAMES)
                        + " (default: the run's csd.sampler)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per batch (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N samples of the split")
    parser.add_argument("--weights", default="model", choices=("model", "best"),
                        help="final weights or best-on-validation (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file that is not a reconstruction file "
                             "(an input is never overwritten)")
    add_seed_arg(parser)
    add_device_arg(parser)


def run(args: argparse.Namespace) -> int:
    from dgm_eit import reconstruct as rec
    from dgm_eit.errors import InputError
    from dgm_eit.files import check_output, is_image_file, is_npy_file
    from dgm_eit.results import is_recon_file

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    # before any work: never over the user's data, voltages or weights, nor over a file of
    # another kind unless --overwrite
    suffix = args.out.lower().rsplit(".", 1)[-1]
    own_kind, kind = {"h5": (is_recon_file, "reconstruction file"), "hdf5": (is_recon_file, "reconstruction file"),
                      "npy": (is_npy_file, ".npy array"), "png": (is_image_file, "PNG image")}.get(
        suffix, (None, "output"))
    check_output(args.out, inputs=[("--data", args.data), ("--voltages", args.voltages)], own_kind=own_kind,
                 kind=kind, overwrite=args.overwrite)
    if args.sampler is not None:
        model_name = _run_model_name(args.run)
        # only the score model has samplers; the others ignore the option, and the output
        # would name a sampler that never ran
        if model_name not in (None, "score"):
            raise InputError(f"--sampler {args.sampler} applies to score runs only; "
                             f"{args.run} holds a {model_name!r} run")
    common = dict(n_samples=args.samples, sampler=args.sampler, seed=args.seed, device=args.device,
                  batch_size=args.batch_size, weights=args.weights)
    if args.data:
        if not args.out.endswith((".h5", ".hdf5")):
            raise InputError(f"--out {args.out}: reconstructions of a data set go to an .h5 file")
        result = rec.reconstruct_split(args.run, args.data, args.split, args.out, limit=args.limit,
                                       progress=sys.stderr.isatty(), **common)
    else:
        v, single = rec.load_voltages(args.voltages)
        if args.limit is not None:
            v = v[:args.limit]
        if not args.out.lower().endswith((".npy", ".png")):
            raise InputError(f"--out {args.out}: use a .npy or .png file for --voltages")
        result = rec.reconstruct_voltages(args.run, v, source=str(args.voltages), **common)
        rec.save_user_output(args.out, result, single)
    n = len(result["recon"])
    print(f"{args.out}: {n} image(s), {result['seconds_per_image'] * 1000:.2f} ms per image, "
          f"{result['nfe']} network evaluation(s) each", file=sys.stderr)
    return 0


def _run_model_name(run_dir) -> str | None:
    """The model named in RUN_DIR/config.json, or None when unreadable (load_run then says why)."""
    import json
    from pathlib import Path

    try:
        return json.loads((Path(run_dir) / "config.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
