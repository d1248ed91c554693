"""`llm-heatmap batch`: per-head metrics for every prompt of a file, resumable and shardable."""

from __future__ import annotations

from llm_heatmap.errors import InputError

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
    options.add_site_option(parser, "a site column in the table; a JSONL field or column `image` names each "
                            "prompt's image, relative to the prompt file")
    options.add_model_options(parser)
    options.add_run_options(parser)


def run(args) -> int:
    import torch

    from llm_heatmap.analyses.runs.batch import check_fresh_run, run_batch
    from llm_heatmap.analyses.runs.prompts import parse_shard, read_prompts

    options.check_site_options(args)
    shard = None if args.shard is None else parse_shard(args.shard)
    prompts = read_prompts(args.file, column=args.column)
    if args.chat and (args.site or any(p.image or p.target for p in prompts)):
        raise InputError("--chat works on the one site of a text model; drop it with --site, images or targets.")
    check_fresh_run(args.out, prompts, shard, resume=args.resume, force=args.force)  # before the model loads
    ranks = launched(args)
    try:
        model, tokenizer, spec = load(args, device=ranks.device())
        chosen, processor, summary = site_choice(args, model, prompts), None, spec.summary
        if chosen is not None:
            from llm_heatmap.models import site_specs
            from llm_heatmap.models.loading import load_processor

            if any(p.image for p in prompts):
                processor = load_processor(args.model, trust_remote_code=args.trust_remote_code)
            summary = "; ".join(f"{site} {s.summary}" for site, s in site_specs(model).items() if site in chosen)
        with torch.no_grad():
            result = run_batch(model, tokenizer, prompts, args.out, spec=spec, source=str(args.model), chat=args.chat,
                               shard=shard, resume=args.resume, force=args.force, quiet=progress_off(args), ranks=ranks,
                               sites=chosen, processor=processor)
    finally:
        ranks.close()
    if not ranks.is_main:
        return 0
    which = "" if shard is None else f" (shard {shard[0]}/{shard[1]})"
    if ranks.distributed:
        which += f" by {ranks.world_size} processes"
    lines = [f"{args.model}: {summary}",
             f"{len(result.computed)} prompts computed, {len(result.skipped)} already done{which}; "
             f"{len(result.table)} rows",
             f"wrote {result.parquet}, {result.csv}"]
    payload = {"model": str(args.model), "spec": summary, "computed": result.computed, "skipped": result.skipped,
               "rows": len(result.table), "files": {"parquet": str(result.parquet), "csv": str(result.csv)}}
    emit(args, lines, payload)
    return 0


def site_choice(args, model, prompts) -> list[str] | None:
    """The sites a batch measures (--site, or every site of a model with several, or of one whose prompts name
    images or targets), or None for the one site of a text model."""
    from llm_heatmap.models import site_specs

    from . import sites

    specs = site_specs(model)
    if not (args.site or set(specs) != {"self"} or any(p.image or p.target for p in prompts)):
        return None
    return sites.chosen_sites(args, model, specs)
