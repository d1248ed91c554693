"""Subcommands of the CLI: each module has `register(subparsers)`, which sets `run` on its parser."""

from . import (batch_command, compare_command, grid_command, kv_similarity_command, metrics_command, models_command,
               render_command)

COMMANDS = [grid_command, render_command, metrics_command, compare_command, kv_similarity_command, batch_command,
            models_command]
