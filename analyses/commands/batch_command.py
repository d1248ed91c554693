"""`llm-heatmap batch`: per-head metrics for every prompt of a file, resumable and shardable."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..batch import run_batch
from ..prompts import parse_shard, read_prompts
from . import analysis_common, common

EXAMPLE = """examples:
  llm-heatmap batch prompts.jsonl --out runs/smollm2/
  llm-heatmap batch prompts.txt --out runs/smollm2/ --resume          # after an interruption
  llm-heatmap batch prompts.txt --out runs/smollm2/ --shard $SLURM_ARRAY_TASK_ID/8   # one job of an array"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch", help="per-head metrics for every prompt of a file (Parquet + CSV), resumable",
        description="Capture every prompt of FILE (TXT: one prompt per line; JSONL: {\"prompt\", \"id\", \"group\"} "
        "per line) in streaming mode and write one row per prompt x head to OUT/heads.parquet and OUT/heads.csv. "
        "Each finished prompt is kept in OUT/parts/, so --resume recomputes only the prompts not yet done; "
        "--shard i/n takes prompt k when k % n == i (write shards into one OUT; their tables are "
        f"heads.shard-i-of-n.*).\n\n{EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, metavar="FILE", help="prompt file (.txt or .jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--shard", metavar="i/n", help="only prompts k with k %% n == i")
    parser.add_argument("--resume", action="store_true", help="keep prompts already done in OUT, compute the rest")
    common.add_chat_option(parser)
    common.add_model_options(parser)
    analysis_common.add_run_options(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    shard = None if args.shard is None else parse_shard(args.shard)
    prompts = read_prompts(args.file)
    model, tokenizer, spec = analysis_common.load(args)
    with torch.no_grad():
        result = run_batch(model, tokenizer, prompts, args.out, spec=spec, source=str(args.model), chat=args.chat,
                           shard=shard, resume=args.resume, force=args.force, quiet=common.progress_off(args))
    which = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    lines = [f"{args.model}: {spec.summary}",
             f"{len(result.computed)} prompts computed, {len(result.skipped)} already done{which}; "
             f"{len(result.table)} rows",
             f"wrote {result.parquet}, {result.csv}"]
    payload = {"model": str(args.model), "spec": spec.summary, "computed": result.computed, "skipped": result.skipped,
               "rows": len(result.table), "files": {"parquet": str(result.parquet), "csv": str(result.csv)}}
    analysis_common.emit(args, lines, payload)
    return 0
