"""``dgm-eit ktc-score --pred DIR --truth DIR``: the KTC2023 challenge's score of a submission.

Reads every ``true<n>.mat`` (variable ``truth``) in ``--truth`` and the matching ``<n>.mat``
(variable ``reconstruction``) in ``--pred``, as the challenge's entry point writes them, and
prints per-target scores (conductive SSIM, resistive SSIM, their mean) and the total. As in
the challenge, a missing or wrongly shaped reconstruction scores 0 (with a warning); a
``--pred`` with none of the targets is an error (most likely the wrong directory), and so is
a reconstruction holding anything but the classes 0, 1, 2 (NaN, infinite, complex values, a
raw image), as in a truth file. Numbers are ASCII digits (``true01.mat`` is target 1); two
files of one number are refused, a name with other digits is ignored with a warning
(:func:`dgm_eit.datasets.ktc2023.numbered_files`).
"""

from __future__ import annotations

import argparse

HELP = ("score KTC2023 reconstructions (<n>.mat 'reconstruction') against ground truths (true<n>.mat 'truth'); "
        "as in the challenge, a missing or wrongly shaped reconstruction scores 0 (with a warning), and one "
        "holding anything but the classes 0, 1, 2 is refused")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, metavar="DIR",
                        help="directory of reconstructions <n>.mat, each with a 256 x 256 'reconstruction' "
                             "(0 water, 1 resistive, 2 conductive)")
    parser.add_argument("--truth", required=True, metavar="DIR",
                        help="directory of ground truths true<n>.mat, each with a 256 x 256 'truth'")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def score_directories(pred_dir, truth_dir) -> dict:
    """Per-target and total scores; targets numbered as in the file names (not glob order)."""
    import warnings

    from dgm_eit.datasets import ktc2023
    from dgm_eit.errors import InputError
    from dgm_eit.files import require_dir

    pred_dir = require_dir(pred_dir, "--pred")
    truth_dir = require_dir(truth_dir, "--truth")
    targets = ktc2023.numbered_files(truth_dir, "true", "--truth")
    if not targets:
        raise InputError(f"--truth {truth_dir} holds no true<n>.mat files")
    predictions = ktc2023.numbered_files(pred_dir, "", "--pred")
    present = {n: p for n, p in predictions.items() if n in targets}
    if not present:
        names = ", ".join(f"{n}.mat" for n in list(targets)[:4])
        raise InputError(f"--pred {pred_dir} holds none of the reconstructions {names}"
                         f"{' ...' if len(targets) > 4 else ''} for the targets in --truth")
    rows = []
    for n, truth_path in targets.items():
        truth = ktc2023.load_truth(truth_path)
        row = {"target": n, "truth": str(truth_path), "pred": None, "conductive": 0.0, "resistive": 0.0,
               "score": 0.0, "note": ""}
        if n not in present:
            warnings.warn(f"no {n}.mat in {pred_dir}: target {n} scores 0, as in the challenge")
            row["note"] = "missing"
        else:
            row["pred"] = str(present[n])
            pred = ktc2023.load_reconstruction(present[n], any_shape=True)
            if pred.shape != truth.shape:
                warnings.warn(f"{present[n]}: the reconstruction is {pred.shape}, not {truth.shape[0]} x "
                              f"{truth.shape[1]}: target {n} scores 0, as in the challenge")
                row["note"] = "wrong shape"
            else:
                c, r = ktc2023.score_parts(pred, truth)
                row.update(conductive=c, resistive=r, score=0.5 * (c + r))
        rows.append(row)
    extra = sorted(p.name for n, p in predictions.items() if n not in targets)
    if extra:
        warnings.warn(f"{len(extra)} reconstruction(s) without a ground truth ignored: {', '.join(extra[:5])}")
    return {"pred": str(pred_dir), "truth": str(truth_dir), "targets": rows,
            "total": float(sum(r["score"] for r in rows)), "max": len(rows)}


def run(args: argparse.Namespace) -> int:
    import json

    result = score_directories(args.pred, args.truth)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'target':>6}  {'conductive':>10}  {'resistive':>9}  {'score':>6}")
    for r in result["targets"]:
        note = f"  ({r['note']})" if r["note"] else ""
        print(f"{r['target']:>6}  {r['conductive']:>10.4f}  {r['resistive']:>9.4f}  {r['score']:>6.4f}{note}")
    print(f"{'total':>6}  {'':>10}  {'':>9}  {result['total']:>6.4f} / {result['max']}")
    return 0
