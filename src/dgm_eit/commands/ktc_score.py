"""``dgm-eit ktc-score --pred DIR --truth DIR``: the KTC2023 challenge's score of a submission.

Reads every ``true<n>.mat`` (variable ``truth``) in ``--truth`` and the matching ``<n>.mat``
(variable ``reconstruction``) in ``--pred``, as the challenge's entry point writes them, and
prints per-target scores (conductive SSIM, resistive SSIM, their mean) and the total. As in
the challenge, a missing or wrongly shaped reconstruction scores 0 (with a warning); a
``--pred`` with none of the targets is an error (most likely the wrong directory).
"""

from __future__ import annotations

import argparse

HELP = "score KTC2023 reconstructions (<n>.mat 'reconstruction') against ground truths (true<n>.mat 'truth')"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, metavar="DIR",
                        help="directory of reconstructions <n>.mat, each with a 256 x 256 'reconstruction' "
                             "(0 water, 1 resistive, 2 conductive)")
    parser.add_argument("--truth", required=True, metavar="DIR",
                        help="directory of ground truths true<n>.mat, each with a 256 x 256 'truth'")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _targets(truth_dir):
    import re
    from pathlib import Path

    from dgm_eit.errors import InputError

    truth_dir = Path(truth_dir)
    if not truth_dir.is_dir():
        raise InputError(f"--truth {truth_dir} is not a directory" if truth_dir.exists()
                         else f"--truth {truth_dir} does not exist")
    found = {}
    for p in truth_dir.iterdir():
        m = re.fullmatch(r"true(\d+)\.mat", p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    if not found:
        raise InputError(f"--truth {truth_dir} holds no true<n>.mat files")
    return dict(sorted(found.items()))


def score_directories(pred_dir, truth_dir) -> dict:
    """Per-target and total scores; targets numbered as in the file names (not glob order)."""
    import warnings
    from pathlib import Path

    from dgm_eit.datasets import ktc2023
    from dgm_eit.errors import InputError

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError(f"--pred {pred_dir} is not a directory" if pred_dir.exists()
                         else f"--pred {pred_dir} does not exist")
    targets = _targets(truth_dir)
    present = {n: pred_dir / f"{n}.mat" for n in targets if (pred_dir / f"{n}.mat").is_file()}
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
            pred = ktc2023.load_reconstruction(present[n])
            c, r = ktc2023.score_parts(pred, truth)
            row.update(conductive=c, resistive=r, score=0.5 * (c + r))
        rows.append(row)
    extra = sorted(p.name for p in pred_dir.glob("*.mat")
                   if p.stem.isdigit() and int(p.stem) not in targets)
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
