"""Subcommands of the CLI: each module has `register(subparsers)`, which sets `run` on its parser."""

from . import grid_command, models_command, render_command

COMMANDS = [grid_command, render_command, models_command]
