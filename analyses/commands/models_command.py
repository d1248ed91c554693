"""`llm-heatmap models`: the offline models, and the spec of any source."""

from __future__ import annotations

import json

from llm_heatmap.models import DEFAULT_MODEL, OFFLINE_MODELS, load_model

from .common import progress_printer


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the offline models, or print the spec of a model source",
        description="List the offline models (installed or not) with their specs, or print the spec of SOURCE.\n\n"
        "example: llm-heatmap models smollm2-135m --json",
    )
    parser.add_argument("source", nargs="?", help="offline model name, local directory, .gguf file or hub id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--quantize", choices=["4bit", "8bit"], help="load quantized with bitsandbytes")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with a hub model to run")
    parser.set_defaults(run=run)


def run(args) -> int:
    progress = progress_printer(args)
    if args.source:
        _, _, spec = load_model(args.source, quantize=args.quantize, trust_remote_code=args.trust_remote_code,
                                progress=progress)
        print(json.dumps(spec.to_dict(), indent=2) if args.json else f"{args.source}: {spec.summary}")
        return 0
    rows = []
    for name, offline in OFFLINE_MODELS.items():
        installed = offline.path() is not None
        summary = load_model(name, progress=progress)[2].summary if installed else None
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
