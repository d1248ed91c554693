"""`llm-heatmap grid`: prompt -> all-heads grid PNG, per-head metrics table and cube file."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import torch

from llm_heatmap.errors import InputError
from llm_heatmap.models import parse_dtype
from llm_heatmap.probes import Downsampler, capture_prompt
from llm_heatmap.probes.capture import MEMORY_SHARE, available_memory_bytes, estimate_cube_bytes

from ..digest import digest_lines
from ..files import atomic_output, check_writable
from ..metrics import HeadMetricsReducer, head_metrics
from ..prompts import check_length
from ..tables import write_table
from . import common

EXAMPLE = 'example: llm-heatmap grid "the sky is blue" --model minilm-l6 --out heatmaps/ --html'


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "grid", help="draw every attention head for a prompt, with its metrics table and cube",
        description="Capture every attention head of a model for PROMPT and write NAME.png (all-heads grid), "
        f"NAME.metrics.csv (one row per head) and NAME.cube.safetensors (re-render with `render`).\n\n{EXAMPLE}")
    common.add_prompt_options(parser)
    common.add_model_options(parser)
    common.add_output_options(parser)
    common.add_grid_options(parser)
    parser.add_argument("--stream", action="store_true",
                        help="long prompts: keep one layer at a time; the saved cube is downsampled to --max-tokens")
    parser.add_argument("--cube-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="dtype of the captured cube (default float32)")
    parser.add_argument("--max-cube-mb", type=float,
                        help="refuse a full cube larger than this (default: 80%% of the available memory)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(run=run)


def output_paths(args, name: str) -> dict:
    paths = {"grid": args.out / f"{name}.{args.format}", "metrics": args.out / f"{name}.metrics.csv",
             "cube": args.out / f"{name}.cube.safetensors"}
    if args.html:
        paths["html"] = args.out / f"{name}.html"
    return paths


def check_cube_memory(args, spec, num_tokens: int, dtype, layers, heads) -> None:
    size = estimate_cube_bytes(spec, num_tokens, num_layers=len(layers) if layers else None,
                               num_heads=len(heads) if heads else None, dtype=dtype)
    available = available_memory_bytes()
    limit = args.max_cube_mb * 2**20 if args.max_cube_mb else (available or float("inf")) * MEMORY_SHARE
    if size > limit:
        raise InputError(f"the full cube for {num_tokens} tokens needs {size / 2**20:,.2f} MiB, more than the "
                         f"{limit / 2**20:,.2f} MiB allowed; pass --stream (one layer at a time, downsampled grid), "
                         "--cube-dtype float16, or fewer --layers.")


def capture_for_grid(args, model, tokenizer, spec, prompt, layers=None, heads=None):
    """(cube to draw and save, per-head metrics table); streaming keeps one layer at a time.
    Only the chosen layers and heads are captured."""
    num_tokens = check_length(tokenizer, spec, prompt, chat=args.chat)
    dtype = parse_dtype(args.cube_dtype)
    options = dict(spec=spec, chat=args.chat, source=str(args.model), dtype=dtype, layers=layers, heads=heads)
    if not args.stream:
        check_cube_memory(args, spec, num_tokens, dtype, layers, heads)
        cube = capture_prompt(model, tokenizer, prompt, **options)
        return cube, head_metrics(cube)
    downsampler, reducer = Downsampler(args.max_tokens), HeadMetricsReducer()
    capture_prompt(model, tokenizer, prompt, consumers=[downsampler, reducer], keep=False, **options)
    return replace(downsampler.cube(), prompt=prompt, source=options["source"]), reducer.table()


def run(args) -> int:
    from llm_heatmap.viz import save_grid, write_html

    prompt = common.read_prompt(args)
    name = common.base_name(args, prompt)
    paths = output_paths(args, name)
    for path in paths.values():
        check_writable(path, force=args.force)
    style, layers, heads = common.grid_style(args)
    step = common.Steps(args, ["loading model", "capturing", "drawing grid", "writing metrics and cube"]
                        + (["writing HTML"] if "html" in paths else []))
    step("loading model")
    model, tokenizer, spec = common.load(args)
    step("capturing")
    with torch.no_grad():
        cube, metrics = capture_for_grid(args, model, tokenizer, spec, prompt, layers, heads)
    step("drawing grid")
    with atomic_output(paths["grid"], force=args.force) as temp:
        save_grid(cube, temp, style, layers=layers, heads=heads)
    step("writing metrics and cube")
    write_table(metrics, paths["metrics"], force=args.force)
    with atomic_output(paths["cube"], force=args.force) as temp:
        cube.save(temp)
    if "html" in paths:
        step("writing HTML")
        with atomic_output(paths["html"], force=args.force) as temp:
            write_html(cube, temp, metrics=metrics, style=style)
    step.close()
    digest = digest_lines(metrics, spec)
    num_tokens = cube.metadata.get("downsample", {}).get("num_keys", len(cube.tokens))
    drawn = f" (drawn downsampled to {cube.num_keys} x {cube.num_keys} per head)" if cube.num_keys < num_tokens else ""
    if args.json:
        print(json.dumps({"spec": spec.summary, "tokens": num_tokens, "files": {k: str(v) for k, v in paths.items()},
                          "digest": digest}, indent=2))
    else:
        print(f"{args.model}: {spec.summary}")
        print(f"{num_tokens} tokens{drawn}; wrote " + ", ".join(str(p) for p in paths.values()))
        print("\n".join(digest))
    sys.stdout.flush()
    return 0
