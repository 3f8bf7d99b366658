"""How few network evaluations does CSD* need?

Reconstructs the validation split of a data set with a trained score prior, first with
the paper's budget (450 predictor-corrector steps after the GN insertion, about 900 NFE),
then with cheaper samplers, and prints MSE / SSIM / time per image for each. The answer is
the smallest NFE whose MSE stays within ``--tolerance`` (5%) of the 900-NFE result.

    python benchmarks/csd_nfe.py --run RUN_DIR --data FILE [--n-val 32] [--t0 0.35] [--json]

With ``--json`` the last line is one JSON object: the table, ``reference_nfe``,
``reference_mse`` and ``smallest_nfe_within_tolerance``.
"""

from __future__ import annotations

import argparse
import json

# (label, reconstruct options); the first entry is the paper's reference budget
SETTINGS = [
    ("pc 450 steps (paper)", dict(solver="pc", n_steps=450, corrector_steps=1)),
    ("pc 100 steps", dict(solver="pc", n_steps=100, corrector_steps=1)),
    ("pc 50 steps", dict(solver="pc", n_steps=50, corrector_steps=1)),
    ("pc 25 steps", dict(solver="pc", n_steps=25, corrector_steps=1)),
    ("pc 10 steps", dict(solver="pc", n_steps=10, corrector_steps=1)),
    ("predictor 25 steps", dict(solver="pc", n_steps=25, corrector_steps=0)),
    ("predictor 10 steps", dict(solver="pc", n_steps=10, corrector_steps=0)),
    ("predictor 5 steps", dict(solver="pc", n_steps=5, corrector_steps=0)),
    ("heun ode 10 steps", dict(solver="ode", n_steps=10)),
    ("heun ode 5 steps", dict(solver="ode", n_steps=5)),
    ("heun ode 3 steps", dict(solver="ode", n_steps=3)),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory of a trained score prior")
    parser.add_argument("--data", required=True, help="data set file (its val split is used)")
    parser.add_argument("--n-val", type=int, default=32, help="validation images (default: %(default)s)")
    parser.add_argument("--t0", type=float, default=None, help="GN insertion time (default: the run's)")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from dgm_eit.data.storage import read_split
    from dgm_eit.metrics import per_sample
    from dgm_eit.models.posterior import SamplingSettings
    from dgm_eit.runs import load_run, tuned_sampling
    from dgm_eit.runtime import limit_threads
    from dgm_eit.tuning import sweep

    limit_threads()
    model, cfg, _ = load_run(args.run)
    arrays = read_split(args.data, "val", keys=("sigma", "v", "gn"))
    n = min(args.n_val, len(arrays["v"]))
    arrays = {k: a[:n] for k, a in arrays.items()}
    # t0 and insertion mode as a reconstruction of this run would use them
    base = SamplingSettings.resolve(cfg["csd"], tuned_sampling(args.run), {"t0": args.t0})

    gn_metrics = per_sample(arrays["gn"], arrays["sigma"])
    print(f"{'GN':28s} {'':>5s}  MSE {gn_metrics['MSE'].mean():.5f}  SSIM {gn_metrics['SSIM'].mean():.4f}")
    rows = []
    for label, opts in SETTINGS:
        result, = sweep(model, cfg, arrays, t0s=[base.t0], steps=[opts["n_steps"]], modes=[base.mode],
                        solver=opts["solver"], corrector_steps=opts.get("corrector_steps", base.corrector_steps),
                        seed=args.seed, sampler="csd")
        row = dict(setting=label, nfe=int(result["nfe"]), mse=result["mse"], ssim=result["ssim"],
                   ms_per_image=1e3 * result["seconds_per_image"])
        rows.append(row)
        print(f"{label:28s} {row['nfe']:5d}  MSE {row['mse']:.5f}  SSIM {row['ssim']:.4f}  "
              f"{row['ms_per_image']:7.1f} ms/img", flush=True)

    reference = rows[0]
    within = [r for r in rows if r["mse"] <= (1 + args.tolerance) * reference["mse"]]
    smallest = min(within, key=lambda r: r["nfe"])
    print(f"smallest NFE within {args.tolerance:.0%} of the {reference['nfe']}-NFE MSE: "
          f"{smallest['nfe']} ({smallest['setting']}, MSE {smallest['mse']:.5f})")
    if args.json:
        print(json.dumps(dict(rows=rows, reference_nfe=reference["nfe"], reference_mse=reference["mse"],
                              gn_mse=float(gn_metrics["MSE"].mean()),
                              smallest_nfe_within_tolerance=smallest["nfe"], n_val=n)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
