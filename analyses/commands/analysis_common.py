"""Options and helpers shared by the analysis subcommands (`metrics`, `compare`, `kv-similarity`, `batch`)."""

from __future__ import annotations

import argparse
import json
import sys

from llm_heatmap.errors import InputError

from . import common


def add_run_options(parser, *, json_help: str = "print the summary as JSON") -> None:
    """--force, --json and --quiet (the last also accepted before the subcommand name)."""
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    parser.add_argument("--json", action="store_true", help=json_help)
    common.add_quiet_option(parser)


def add_metric_option(parser) -> None:
    parser.add_argument("--metric", action="append", metavar="NAME",
                        help="keep only this metric column (repeat, or separate names with commas); default: all")


def metric_names() -> list[str]:
    """Every column of a head-metric table that `--metric` may select."""
    from ..metrics import COLUMNS

    return [c for c in COLUMNS if c not in ("layer", "head", "kv_group")]


def selected_metrics(args) -> list[str] | None:
    """The `--metric` names, checked before any work; None when all metrics are wanted."""
    if not args.metric:
        return None
    names = [name.strip() for value in args.metric for name in value.split(",") if name.strip()]
    valid = metric_names()
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise InputError(f"metric '{unknown[0]}' does not exist; valid metrics are: {', '.join(valid)}.")
    return list(dict.fromkeys(names))


def load(args, source: str | None = None):
    """(model, tokenizer, spec) for `source` (default `--model`) with the other model options of `args`."""
    if source is not None:
        args = argparse.Namespace(**{**vars(args), "model": source})
    if getattr(args, "quiet", False):
        args = argparse.Namespace(**{**vars(args), "quiet": True})
    return common.load(args)


def emit(args, text_lines: list[str], payload: dict) -> None:
    """Print the summary: `payload` as JSON with --json, otherwise the text lines."""
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print("\n".join(text_lines))
    sys.stdout.flush()
