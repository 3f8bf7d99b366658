"""The ``dgm-eit`` command.

Each sub-command lives in ``dgm_eit/commands/<name>.py`` and defines ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Those modules import only
argparse-level things at top level, so ``dgm-eit --help`` stays fast; heavy imports
happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dgm_eit import __version__

# command name -> module under dgm_eit.commands
COMMANDS = {
    "run": "run",
    "simulate": "simulate",
    "inspect": "inspect",
    "show": "show",
    "train": "train",
    "reconstruct": "reconstruct",
    "evaluate": "evaluate",
    "tune-t0": "tune_t0",
    "bench": "bench",
    "ktc": "ktc",
    "ktc-score": "ktc_score",
    "ktc-pack": "ktc_pack",
}


def _available_commands():
    for name, module in COMMANDS.items():
        try:
            yield name, importlib.import_module(f"dgm_eit.commands.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"dgm_eit.commands.{module}":
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgm-eit", description="EIT with deep generative priors: simulate, train, reconstruct, evaluate.")
    parser.add_argument("--version", action="version", version=f"dgm-eit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available_commands():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    import warnings

    # a warning is one line, like an error: "dgm-eit CMD: warning: ..."
    warnings.formatwarning = lambda message, category, *rest, **kw: f"dgm-eit {args.command}: warning: {message}\n"
    import dgm_eit.studies  # noqa: F401  (every command finds the simulator of a shipped study's config)
    from dgm_eit.runtime import Terminated, stop_signals

    try:
        with stop_signals():
            return int(args._run(args) or 0)
    except Terminated:
        print("dgm-eit: terminated; re-run the same command to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("dgm-eit: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        if os.environ.get("DGM_EIT_DEBUG"):
            raise
        print(f"dgm-eit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
