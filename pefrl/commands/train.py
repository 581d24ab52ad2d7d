"""`pefrl train CONFIG [dotted.key=value ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from pefrl.config_loader import load_config
    from pefrl.trainer import train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        config, overrides = None, [config, *overrides]  # `pefrl train key=value ...`: no config file, all defaults
    train(load_config(config, overrides))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="run RL training from a YAML config",
                       description="Run RL training. Overrides are dotted.key=value pairs, e.g. train.steps=10.")
    p.add_argument("config", nargs="?", default=None, help="YAML config (omit for all defaults)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(func=run)
