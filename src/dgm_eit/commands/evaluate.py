"""``dgm-eit evaluate``: score any reconstruction file against a data set with the report's metrics."""

from __future__ import annotations

import argparse

HELP = "score reconstructions (HDF5 'recon' or .npy (N,H,W)) against a data set: MSE, PSNR, SSIM, RE, AE, DR"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, metavar="FILE",
                        help="reconstructions: an HDF5 file with a 'recon' array, or a .npy array (N,H,W)")
    parser.add_argument("--data", required=True, metavar="FILE", help="data-set file (dgm-eit simulate)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"),
                        help="split whose ground truth is compared (default: %(default)s)")
    parser.add_argument("--name", default=None, help="method name shown in the table (default: the file name)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--force", action="store_true",
                        help="score even when the reconstruction file says it was made from another data "
                             "set or split")


def check_pairing(pred, data, split: str) -> None:
    """A reconstruction file (``dgm-eit reconstruct --data``) records its ``data`` and ``split``:
    scoring it against another data set or split gives plausible but meaningless numbers."""
    import os
    from pathlib import Path

    import h5py

    from dgm_eit.errors import InputError
    from dgm_eit.results import recon_attrs

    pred = Path(pred)
    if pred.suffix == ".npy" or not pred.is_file() or not h5py.is_hdf5(pred):
        return
    try:
        attrs = recon_attrs(pred)
    except InputError:
        return   # load_prediction names the damaged file
    made_from, made_split = attrs.get("data"), attrs.get("split")
    if made_split is not None and str(made_split) != split:
        raise InputError(f"{pred} reconstructs the {str(made_split)!r} split, not {split!r}; pass --split "
                         f"{made_split} (or --force to score it anyway)")
    if made_from is not None:
        made_from = Path(str(made_from))
        same = made_from.resolve() == Path(data).resolve()
        if not same and made_from.exists() and Path(data).exists():
            same = os.path.samefile(made_from, data)
        if not same:
            raise InputError(f"{pred} was reconstructed from {made_from}, not {data}; pass that data set "
                             "(or --force to score it anyway)")


def run(args) -> int:
    import json
    from pathlib import Path

    from dgm_eit.metrics import METRICS
    from dgm_eit.report import metrics_table
    from dgm_eit.results import evaluate_file

    if not args.force:
        check_pairing(args.pred, args.data, args.split)
    summaries, _ = evaluate_file(args.pred, args.data, args.split)
    name = args.name or Path(args.pred).stem
    if args.json:
        print(json.dumps({
            "name": name, "pred": str(args.pred), "data": str(args.data), "split": args.split,
            "n": next(iter(summaries.values())).n,
            "metrics": {m: {"mean": summaries[m].mean, "std": summaries[m].std} for m in METRICS},
        }, indent=2))
    else:
        print(metrics_table({name: summaries}))
        print(f"\n{next(iter(summaries.values())).n} images of the {args.split!r} split; mean ± std. "
              f"Lower is better for MSE, RE, AE; higher for PSNR, SSIM; DR closest to 1.")
    return 0
