"""`llm-heatmap batch`: per-head metrics for every prompt of a file, resumable and shardable."""

from __future__ import annotations

from . import options
from .run import emit, launched, load, progress_off

EXAMPLE = """examples:
  llm-heatmap batch prompts.jsonl --out runs/smollm2/
  llm-heatmap batch prompts.txt --out runs/smollm2/ --resume          # after an interruption
  llm-heatmap batch prompts.txt --out runs/smollm2/ --shard $SLURM_ARRAY_TASK_ID/8   # one job of an array
  torchrun --standalone --nproc_per_node 4 -m llm_heatmap.cli batch prompts.csv --out runs/smollm2/   # 4 processes / GPUs"""


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "batch", run, summary="per-head metrics for every prompt of a file (Parquet + CSV), resumable",
        description="Capture every prompt of FILE (TXT: one prompt per line; JSONL: {\"prompt\", \"id\", \"group\"} "
        "per line; CSV or Parquet: a prompt column, optional id and group columns; --column names the prompt "
        "field) in streaming mode and write one row per prompt x head to OUT/heads.parquet and OUT/heads.csv. "
        "Each finished prompt is kept in OUT/parts/, so --resume recomputes only the prompts not yet done; "
        "--shard i/n takes prompt k when k % n == i (write shards into one OUT; their tables are "
        "heads.shard-i-of-n.*). Under torchrun or accelerate launch each process measures its share of the prompts "
        "(of the shard's prompts, with --shard) on its own device, and rank 0 writes the tables.", example=EXAMPLE)
    options.add_prompt_set_options(parser, "FILE")
    options.add_model_options(parser)
    options.add_run_options(parser)


def run(args) -> int:
    import torch

    from llm_heatmap.analyses.runs.batch import check_fresh_run, run_batch
    from llm_heatmap.analyses.runs.prompts import parse_shard, read_prompts

    shard = None if args.shard is None else parse_shard(args.shard)
    prompts = read_prompts(args.file, column=args.column)
    check_fresh_run(args.out, prompts, shard, resume=args.resume, force=args.force)  # before the model loads
    ranks = launched(args)
    try:
        model, tokenizer, spec = load(args, device=ranks.device())
        with torch.no_grad():
            result = run_batch(model, tokenizer, prompts, args.out, spec=spec, source=str(args.model), chat=args.chat,
                               shard=shard, resume=args.resume, force=args.force, quiet=progress_off(args), ranks=ranks)
    finally:
        ranks.close()
    if not ranks.is_main:
        return 0
    which = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    if ranks.distributed:
        which += f" by {ranks.world_size} processes"
    lines = [f"{args.model}: {spec.summary}",
             f"{len(result.computed)} prompts computed, {len(result.skipped)} already done{which}; "
             f"{len(result.table)} rows",
             f"wrote {result.parquet}, {result.csv}"]
    payload = {"model": str(args.model), "spec": spec.summary, "computed": result.computed, "skipped": result.skipped,
               "rows": len(result.table), "files": {"parquet": str(result.parquet), "csv": str(result.csv)}}
    emit(args, lines, payload)
    return 0
