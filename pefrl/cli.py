"""`pefrl` command line. Each subcommand lives in pefrl/commands/<name>.py; run `pefrl --help` for examples."""

from __future__ import annotations

import argparse
import importlib
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
        try:
            module = importlib.import_module(f"pefrl.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"pefrl.commands.{name}":
                raise
            continue  # a subcommand not written yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pefrl.config import ConfigError

    try:
        return args.func(args)
    except ConfigError as e:
        print(f"pefrl: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
