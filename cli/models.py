"""`llm-heatmap models`: the offline models, and the spec of any source."""

from __future__ import annotations

import json

from llm_heatmap.models.offline import DEFAULT_MODEL, OFFLINE_MODELS

from . import options
from .run import load


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "models", run, summary="list the offline models, or print the spec of a model source",
        description="List the offline models (installed or not) with their specs, or print the spec of SOURCE (of "
        "each attention site for a model with several: an encoder-decoder, a dual encoder, a VLM; with --json an "
        "object keyed by site).",
        example="example: llm-heatmap models smollm2-135m --json")
    parser.add_argument("source", nargs="?", help="offline model name, local directory, .gguf file or hub id")
    options.add_json_option(parser, help="print JSON instead of text")
    options.add_loading_options(parser)


def run(args) -> int:
    if args.source:
        from llm_heatmap.models import site_specs

        model, _, spec = load(args, args.source)
        specs = site_specs(model)
        if len(specs) < 2:
            print(json.dumps(spec.to_dict(), indent=2) if args.json else f"{args.source}: {spec.summary}")
        elif args.json:
            print(json.dumps({site: site_spec.to_dict() for site, site_spec in specs.items()}, indent=2))
        else:
            print(f"{args.source}: {len(specs)} attention sites")
            print("\n".join(f"  {site}: {site_spec.summary}" for site, site_spec in specs.items()))
        return 0
    rows = []
    for name, offline in OFFLINE_MODELS.items():
        installed = offline.path() is not None
        summary = load(args, name)[2].summary if installed else None
        rows.append({"name": name, "default": name == DEFAULT_MODEL, "installed": installed,
                     "description": offline.description, "spec": summary, "install": offline.install_command})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        mark = " (default)" if row["default"] else ""
        state = row["spec"] if row["installed"] else f"not installed: {row['install']}"
        print(f"{row['name']}{mark}  {row['description']}\n    {state}")
    return 0
