"""``dgm-eit train MODEL --data FILE --out RUN_DIR``: train a generative model (resumable)."""

from __future__ import annotations

import argparse
import os
import sys

from dgm_eit.commands.common import add_device_arg, add_profile_args, add_seed_arg
from dgm_eit.models import MODEL_NAMES

HELP = f"train a model ({', '.join(MODEL_NAMES)}) into a run directory; re-run the same command to resume"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=MODEL_NAMES, help="which model to train")
    parser.add_argument("--data", required=True, metavar="FILE", help="data set file (dgm-eit simulate)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory (created, or resumed)")
    # the data set is fixed by --data: [data] keys change nothing here, training keys do
    add_profile_args(parser, example="cnf.flow.epochs=50")
    add_seed_arg(parser)
    add_device_arg(parser)
    parser.add_argument("--max-minutes", type=float, default=None, metavar="M",
                        help="stop after M minutes of training with a resumable checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dgm_eit.config import load_config
    from dgm_eit.train import train

    cfg = load_config(args.profile, args.overrides)
    result = train(args.model, args.data, args.out, cfg, seed=args.seed, device=args.device,
                   max_minutes=args.max_minutes, progress=False if args.no_progress else None)
    if os.environ.get("RANK", "0") != "0":
        return 0   # under torchrun, rank 0 speaks for the run
    if result.completed:
        if result.step < 0:
            print(f"{args.out}: training already finished", file=sys.stderr)
        else:
            print(f"{args.out}: trained {args.model} ({result.step} steps) -> {args.out}/model.safetensors",
                  file=sys.stderr)
        return 0
    print(f"{args.out}: stopped after --max-minutes at step {result.step}; "
          "re-run the same command to resume", file=sys.stderr)
    return 0
