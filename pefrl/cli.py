"""`pefrl` command line. Each subcommand lives in pefrl/commands/<name>.py; run `pefrl --help` for examples."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

EXAMPLES = """examples:
  pefrl train recipes/configs/arithmetic_ppo.yaml                 # PPO on the embedded tiny model
  pefrl train recipes/configs/arithmetic_ppo.yaml train.steps=50 rollout.temperature=0.8
  accelerate launch recipes/ppo.py --config recipes/configs/arithmetic_ppo.yaml   # same, through Accelerate
  pefrl init myproject                                            # starter config.yaml + my_reward.py
  pefrl plot runs/arithmetic_ppo                                  # -> runs/arithmetic_ppo/metrics.png
  pefrl eval runs/arithmetic_ppo --data builtin:arithmetic-eval --size 200   # {"reward_mean": ..., "n": 200}
"""


def build_parser() -> argparse.ArgumentParser:
    from pefrl.commands import COMMANDS

    parser = argparse.ArgumentParser(
        prog="pefrl",
        description="Parameter-efficient RL fine-tuning of LLMs on LoRA adapters over one frozen base.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pefrl.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. pefrl's own errors (a bad config, data, reward, path, checkpoint) print as one line
    naming what is wrong and exit 1; PEFRL_DEBUG=1 shows their traceback too. Other exceptions are bugs and
    keep their traceback."""
    args = build_parser().parse_args(argv)
    from pefrl.config import ConfigError
    from pefrl.errors import PefrlError

    try:
        return args.func(args)
    except PefrlError as e:
        if os.environ.get("PEFRL_DEBUG", "") not in ("", "0"):
            raise
        kind = "config error" if isinstance(e, ConfigError) else "error"
        print(f"pefrl {args.command}: {kind}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
