"""Subcommands of the CLI: each module has `register(subparsers)`, which sets `run` on its parser."""

from . import models_command

COMMANDS = [models_command]
