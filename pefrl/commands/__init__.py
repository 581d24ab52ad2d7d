"""One module per `pefrl` subcommand, each with `register(subparsers)` that adds its parser and sets `func`."""

COMMANDS = ("train", "export", "eval", "plot", "init")
