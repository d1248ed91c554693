"""`llm-heatmap`: the command line. Each subcommand lives in `analyses/commands/<name>.py`."""

from __future__ import annotations

import argparse
import sys

from llm_heatmap.errors import InputError

from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-heatmap",
        description="Capture every attention head of a transformer and turn it into heatmap grids and metric tables.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")
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
        print(f"llm-heatmap {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llm-heatmap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
