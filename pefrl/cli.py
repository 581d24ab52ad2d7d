"""`pefrl` command line. Each subcommand lives in pefrl/commands/<name>.py; run `pefrl --help` for examples."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from pefrl import _quiet  # noqa: F401  (known third-party noise off before any command imports the libraries)

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


OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")
"""A `dotted.key=value` token: what argparse would otherwise take for a positional in the wrong place."""


def split_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """argv -> (argv without its dotted.key=value overrides, the overrides in order), so that options and
    overrides mix in any order (`pefrl eval RUN --data X key=value`): argparse stops filling a nargs='*'
    positional at the first option and then rejects what follows it. A token that is an option's value
    (`--data a=b.jsonl`) or an existing file (a config named `x=y.yaml`) stays where it is."""
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = _subparsers(parser).get(command)
    if sub is None or not any(action.dest == "overrides" for action in sub._actions):
        return argv, []
    takes_value = {opt for action in sub._actions if action.option_strings and action.nargs != 0
                   for opt in action.option_strings}
    kept, overrides = [], []
    for i, token in enumerate(argv):
        after_option = i > 0 and argv[i - 1] in takes_value
        if argv.index(command) < i and not after_option and OVERRIDE.match(token) and not os.path.isfile(token):
            overrides.append(token)
        else:
            kept.append(token)
    return kept, overrides


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. pefrl's own errors (a bad config, data, reward, path, checkpoint) print as one line
    naming what is wrong and exit 1; PEFRL_DEBUG=1 shows their traceback too. Other exceptions are bugs and
    keep their traceback."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, overrides = split_overrides(parser, argv)
    args = parser.parse_args(argv)
    if overrides:
        args.overrides = [*overrides, *args.overrides]
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
