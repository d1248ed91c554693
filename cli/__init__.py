"""`llm-heatmap`: the command line. Each command is a module here with `register(subparsers)`, which
sets `run` on its parser; `run` imports torch and the library only when the command runs."""

from __future__ import annotations

import argparse
import sys

from llm_heatmap.errors import InputError

from . import atlas, batch, compare, grid, kv_similarity, metrics, models, qk_map, render
from .errors import cli_message
from .options import add_quiet_option

COMMANDS = [grid, render, metrics, compare, kv_similarity, qk_map, batch, atlas, models]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-heatmap",
        description="Capture every attention head of a transformer and turn it into heatmap grids and metric tables.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    add_quiet_option(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except InputError as error:
        if args.debug:
            raise
        print(f"llm-heatmap {args.command}: {cli_message(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llm-heatmap {args.command}: interrupted", file=sys.stderr)
        return 130
