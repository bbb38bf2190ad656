"""The `kvzoo` command: one subcommand per module here, each with HELP, `add_arguments` and `run`."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# subcommand -> module providing HELP, add_arguments(parser) and run(args) -> exit status
COMMANDS = {
    "check": "zoo.cli.check",
    "generate": "zoo.cli.generate",
    "info": "zoo.cli.info",
    "bench": "zoo.cli.bench",
    "study": "zoo.cli.study",
    "train": "zoo.cli.train",
    "convert": "zoo.cli.convert",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvzoo",
        description="Compose, run and study transformer KV caches on MLX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.add_argument(
            "--plugin", action="append", default=[], metavar="MODULE_OR_FILE.py",
            help="import a module or .py file that registers caches, schemes, samplers or "
                 "families before running (repeatable); installed plugins (entry-point group "
                 "kvzoo.plugins) load by themselves")
        command.set_defaults(run=module.run)
    return parser


def load_plugins(args: argparse.Namespace) -> None:
    """Installed plugins, then each --plugin, before the command runs."""
    from kvzoo import plugins

    plugins.load_installed()
    for spec in getattr(args, "plugin", []):
        plugins.load(spec)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        load_plugins(args)
        from zoo.distributed import setup_cli

        setup_cli(args)  # under mlx.launch -n N: load shards, rank 0 prints (docs/distributed.md)
        return int(args.run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"kvzoo {args.command}: error: {error}", file=sys.stderr)
        return 2

