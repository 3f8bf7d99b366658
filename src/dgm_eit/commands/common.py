"""Arguments shared by several sub-commands, so they read the same everywhere."""

from __future__ import annotations

import argparse


def add_profile_args(parser: argparse.ArgumentParser, default: str = "quick",
                     example: str = "data.n_train=500") -> None:
    parser.add_argument("--profile", default=default,
                        help="smoke | quick | paper | ktc, or a .toml file (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config key, e.g. --set {example} (repeatable)")


def add_seed_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: %(default)s)")
