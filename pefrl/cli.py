"""`pefrl` command line: train, export, plot, eval, init. Run `pefrl --help` for examples."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  pefrl train recipes/configs/arithmetic_ppo.yaml                 # PPO on the embedded tiny model
  pefrl train recipes/configs/arithmetic_ppo.yaml train.steps=50 rollout.temperature=0.8
  accelerate launch recipes/ppo.py --config recipes/configs/arithmetic_ppo.yaml   # same, through Accelerate
"""


def _train(args: argparse.Namespace) -> int:
    from pefrl.config import load_config
    from pefrl.trainer import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pefrl",
        description="Parameter-efficient RL fine-tuning of LLMs on LoRA adapters over one frozen base.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run RL training from a YAML config",
                       description="Run RL training. Overrides are dotted.key=value pairs, e.g. train.steps=10.")
    p.add_argument("config", nargs="?", default=None, help="YAML config (omit for all defaults)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(func=_train)
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
