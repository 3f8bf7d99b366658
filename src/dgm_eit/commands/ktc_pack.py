"""``dgm-eit ktc-pack RUN_DIR --out DIR``: pack a finished KTC study for shipping (the study
``dgm-eit ktc`` uses without ``--run`` is made this way; :mod:`dgm_eit.ktc.bundle`)."""

from __future__ import annotations

import argparse

HELP = ("pack a finished dgm-eit run --profile ktc directory into a small folder that dgm-eit ktc reads without "
        "the data set: config, methods.json, the trained weights of the first --seeds training seeds, the "
        "linearised step's settings, "
        "provenance and a manifest of SHA-256 checksums")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory made by dgm-eit run --profile ktc (finished)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder to write (new or empty; written whole or not at all)")
    parser.add_argument("--seeds", type=int, default=1, metavar="N",
                        help="pack the first N training seeds (default 1: seed 0 alone, no seed ensembles); N = the "
                             "study's --seeds keeps its seed ensembles and its default method")
    parser.add_argument("--overwrite", action="store_true", help="replace a packed study already in --out")
    parser.add_argument("--commit", default="unknown",
                        help="git commit of the code that ran the study, for the provenance (the study itself does "
                             "not record it)")
    parser.add_argument("--note", default="", help="anything else known about how the study was made")


def run(args) -> int:
    from dgm_eit.ktc.bundle import pack_study
    from dgm_eit.methods import get_method

    made = pack_study(args.run_dir, args.out, seeds=args.seeds, overwrite=args.overwrite, commit=args.commit,
                      note=args.note)
    scores = ", ".join(f"{get_method(m).name} {s['level_1']:.2f} / {s['all_levels']:.2f}"
                       for m, s in made["public_scores"].items())
    print(f"packed {args.run_dir} (--seed {made['seed']}, config {made['config_sha256'][:12]}) into {args.out}; "
          f"default method {get_method(made['default_method']).name}; public targets, level 1 / all levels: {scores}")
    return 0
