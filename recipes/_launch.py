"""Shared command line of the recipes: --config FILE [dotted.key=value ...]."""

from __future__ import annotations

import argparse
import sys

from pefrl.config import Config, ConfigError
from pefrl.config_loader import load_config


def parse_config(algo: str, argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=f"{algo} on LoRA adapters over one frozen base")
    parser.add_argument("--config", required=True, help="YAML config, e.g. recipes/configs/arithmetic_ppo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, [f"algo={algo}", *args.overrides])
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    return cfg
