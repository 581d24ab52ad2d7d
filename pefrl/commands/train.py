"""`pefrl train CONFIG [dotted.key=value ...]`."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from pefrl.config import load_config
    from pefrl.trainer import train

    train(load_config(args.config, args.overrides))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="run RL training from a YAML config",
                       description="Run RL training. Overrides are dotted.key=value pairs, e.g. train.steps=10.")
    p.add_argument("config", nargs="?", default=None, help="YAML config (omit for all defaults)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(func=run)
