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
    parser.add_argument("--t0", type=float, default=None, metavar="T",
                        help="score run, samplers that start from the GN image (csd, dds, dps): its insertion "
                             "time in (0, 1] (default: the run's tune-t0 choice, else its csd.t0)")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="score run: reverse steps (default: the run's tune-t0 choice, else its csd.n_steps)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B",
                        help="images per batch (default: %(default)s); a sampling model draws its noise batch "
                             "by batch, so its images can depend on it")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N samples of the split")
    parser.add_argument("--weights", default="model", choices=("model", "best"),
                        help="final weights or best-on-validation (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file that is not a reconstruction file "
                             "(an input is never overwritten)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads of torch (default: torch's own choice); another count can change "
                             "the last bits of the images (dgm-eit run records the count in each "
                             "reconstruction file)")
    add_seed_arg(parser)
    add_device_arg(parser)


def run(args: argparse.Namespace) -> int:
    from dgm_eit import reconstruct as rec
    from dgm_eit.errors import InputError
    from dgm_eit.files import check_output, is_image_file, is_npy_file
    from dgm_eit.results import is_recon_file

    for option, value in (("--limit", args.limit), ("--steps", args.steps), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise InputError(f"{option} must be >= 1, got {value}")
    if args.t0 is not None and not 0 < args.t0 <= 1:
        raise InputError(f"--t0 must lie in (0, 1], got {args.t0}")
    # before any work: never over the user's data, voltages or weights, nor over a file of
    # another kind unless --overwrite
    suffix = args.out.lower().rsplit(".", 1)[-1]
    own_kind, kind = {"h5": (is_recon_file, "reconstruction file"), "hdf5": (is_recon_file, "reconstruction file"),
                      "npy": (is_npy_file, ".npy array"), "png": (is_image_file, "PNG image")}.get(
        suffix, (None, "output"))
    check_output(args.out, inputs=[("--data", args.data), ("--voltages", args.voltages)], own_kind=own_kind,
                 kind=kind, overwrite=args.overwrite)
    sampling = [f"{option} {value}" for option, value in (("--sampler", args.sampler), ("--t0", args.t0),
                                                            ("--steps", args.steps)) if value is not None]
    if sampling:
        model_name = _run_model_name(args.run)
        # only the score model has samplers; the others ignore these options, and the output
        # would name a sampler that never ran
        if model_name not in (None, "score"):
            raise InputError(f"{', '.join(sampling)} {'applies' if len(sampling) == 1 else 'apply'} to score runs "
                             f"only; {args.run} holds a {model_name!r} run")
    if args.threads is not None:
        from dgm_eit.runtime import limit_threads

        limit_threads(args.threads)
    common = dict(n_samples=args.samples, sampler=args.sampler, seed=args.seed, device=args.device,
                  batch_size=args.batch_size, weights=args.weights, t0=args.t0, n_steps=args.steps)
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
