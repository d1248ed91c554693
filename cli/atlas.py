"""`llm-heatmap atlas`: every head of one or more models characterised over a prompt file: tables + one page."""

from __future__ import annotations

from pathlib import Path

from llm_heatmap.errors import InputError
from llm_heatmap.models.offline import DEFAULT_MODEL

from . import options
from .run import emit, launched, load, progress_off

EXAMPLE = """examples:
  llm-heatmap atlas prompts.jsonl --model smollm2-135m --model minilm-l6 --out atlas/
  llm-heatmap atlas prompts.csv --column text --out atlas/ --resume          # after an interruption
  torchrun --standalone --nproc_per_node 8 -m llm_heatmap.cli atlas prompts.parquet --model smollm2-135m --out atlas/
  accelerate launch -m llm_heatmap.cli atlas prompts.txt --out atlas/      # as configured by accelerate config
  llm-heatmap atlas prompts.txt --out atlas/ --shard $SLURM_ARRAY_TASK_ID/8   # parts only; then once:
  llm-heatmap atlas prompts.txt --out atlas/ --resume                        # merges every shard's parts"""
PAGE = "atlas.html"


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "atlas", run, summary="every head of one or more models over a prompt file: tables and one HTML page",
        description="Capture every prompt of PROMPTS (TXT: one per line; JSONL, CSV, Parquet: --column) on every "
        "--model and write, to OUT: per-head metrics of every prompt (prompt_heads.parquet), each head's means and "
        "rates with bootstrap intervals over prompts, pattern-class frequencies, induction- and retrieval-probe "
        "scores and map position (heads.parquet), per-layer means and KV-group similarity (layers.parquet, "
        "prompt_layers.parquet), per-model means (models.parquet), each head's top prompts (top_prompts.parquet), the prompt-mean divergence "
        "of every pair of heads (head_distances.parquet), and atlas.html, one offline page with every model side by "
        "side. Each prompt is kept in OUT/parts/, so --resume computes only what is missing. Under torchrun or "
        "accelerate launch each process takes its share of the prompts on its own device and rank 0 writes the "
        "tables; --shard i/n writes parts only, and a last run with --resume merges them.", example=EXAMPLE)
    options.add_prompt_set_options(parser, "PROMPTS")
    options.add_model_options(parser, several=True)
    atlas = parser.add_argument_group("atlas")
    atlas.add_argument("--site", help="the attention site characterised: self (the one stack of a decoder LLM or "
                       "BERT, or a VLM's language model, the default), encoder or decoder (an encoder-decoder's; PROMPTS "
                       "are the sources, a record's target the decoder's text), cross (its cross-attention: alignment, "
                       "monotonicity, coverage, source entropy), vision (a ViT, CLIP's or a VLM's vision tower; records "
                       "name an image, relative to PROMPTS) or text (CLIP's text tower); a model with several sites "
                       "needs it")
    atlas.add_argument("--measure", choices=options.HEAD_MEASURES, default="js",
                       help="head divergence: js (exact Jensen-Shannon, default) or hellinger (one matrix product)")
    atlas.add_argument("--max-rows", type=int, help="query rows per prompt the divergence averages over (default all)")
    atlas.add_argument("--top-k", type=int, default=3, help="top prompts kept per head and ranking metric (default 3)")
    atlas.add_argument("--rank-by", action="append", metavar="METRIC",
                       help="metric that ranks a head's top prompts (repeat; default: the site's, e.g. sink, "
                       "previous-token, duplicate-token, induction, diagonal and vertical scores for text, alignment, "
                       "monotonicity, coverage and source entropy for cross)")
    atlas.add_argument("--thumbnail-size", type=int, default=16, help="pooled size of the top prompts' patterns (default 16)")
    atlas.add_argument("--probe-length", type=int, default=50,
                       help="random tokens of the induction probe, repeated once (default 50; 0 skips it)")
    options.add_retrieval_probe_option(atlas)
    atlas.add_argument("--ablation", choices=("zero", "mean"), help="also ablate every head alone on every prompt "
                       "(its output zero, or its mean over the prompts) and add the importance columns "
                       "ablation_delta_log_prob and ablation_delta_loss (as `ablate`: a decoder LM, or a site of an "
                       "encoder-decoder or an image classifier)")
    options.add_pseudo_group_option(atlas)
    options.add_bootstrap_options(atlas)
    options.add_permutation_options(atlas, default=1000, help="head-grouping permutations per layer")
    options.add_run_options(parser)


def _summary_lines(result, page: Path | None) -> list[str]:
    lines = []
    for row in result.tables["models"].itertuples(index=False):
        heads = result.tables["heads"]
        mine = heads[heads["model"] == row.model]
        classes = mine["pattern_class"].value_counts() if "pattern_class" in mine else None
        lines.append(f"{row.model}: {row.summary}; {row.n_prompts} prompts, {len(result.computed[row.model])} computed now")
        if classes is not None:
            lines.append("  heads by most frequent pattern: " + ", ".join(f"{name} {count}" for name, count in classes.items()))
        if getattr(row, "notes", ""):
            lines.append(f"  {row.notes}")
        if row.gap_mean != row.gap_mean:  # NaN: too few heads per layer for a pair within and a pair between groups
            lines.append(f"  KV-group gap: none ({row.num_heads} heads per layer cannot be split into {row.grouping} groups "
                         f"of {row.group_size} with pairs within and between them)")
        else:
            lines.append(f"  KV-group gap ({row.grouping} groups of {row.group_size}, {row.measure}): {row.gap_mean:+.3f} "
                         f"[{row.gap_low:+.3f}, {row.gap_high:+.3f}]")
    files = [*result.files.values(), *([page] if page else [])]
    lines.append("wrote " + ", ".join(str(p) for p in files))
    return lines


def _processor(args, source, with_images: bool):
    """The model's own image processor where a record names an image, else None."""
    if not with_images:
        return None
    from llm_heatmap.models.loading import load_processor

    return load_processor(source, trust_remote_code=args.trust_remote_code)


def run(args) -> int:
    import torch

    from llm_heatmap.analyses.atlas.run import run_atlas
    from llm_heatmap.analyses.atlas.sites import atlas_site
    from llm_heatmap.models.files import atomic_output
    from llm_heatmap.analyses.runs.prompts import parse_shard, read_prompts
    from llm_heatmap.viz.atlas import atlas_view

    options.check_site_options(args)
    atlas_site(args.site)  # before any model loads
    shard = None if args.shard is None else parse_shard(args.shard)
    retrieval_lengths = options.needle_lengths(args.retrieval_probe)
    prompts = read_prompts(args.prompts, column=args.column)
    with_images = any(p.image is not None for p in prompts)
    page = args.out / PAGE
    if page.exists() and not (args.resume or args.force) and shard is None:
        raise InputError(f"{args.out} already holds an atlas ({PAGE}); pass --resume to continue it, --force to "
                         "recompute, or choose another --out.")
    models = list(dict.fromkeys(args.model or [DEFAULT_MODEL]))
    ranks = launched(args)
    try:
        with torch.no_grad():
            result = run_atlas(models, prompts, args.out, chat=args.chat, measure=args.measure, max_rows=args.max_rows,
                               top_k=args.top_k, rank_by=tuple(args.rank_by) if args.rank_by else None,
                               thumbnail_size=args.thumbnail_size, probe_length=args.probe_length,
                               retrieval_lengths=retrieval_lengths, ablation=args.ablation,
                               pseudo_group_size=args.pseudo_group_size, site=args.site, n_resamples=args.resamples,
                               confidence=args.confidence, n_permutations=args.permutations, seed=args.seed,
                               shard=shard, resume=args.resume, force=args.force, quiet=progress_off(args),
                               ranks=ranks, loader=lambda source: (*load(args, source, device=ranks.device()),
                                                                   _processor(args, source, with_images)))
    finally:
        ranks.close()
    if not ranks.is_main:
        return 0
    if shard is not None:
        counts = ", ".join(f"{name}: {len(ids)} computed, {len(result.skipped[name])} already done"
                           for name, ids in result.computed.items())
        lines = [f"shard {shard[0]}/{shard[1]}: {counts}; parts in {args.out / 'parts'}",
                 f"merge every shard's parts with: llm-heatmap atlas {args.prompts} --out {args.out} --resume (same options)"]
        emit(args, lines, {"shard": list(shard), "computed": result.computed, "skipped": result.skipped})
        return 0
    with atomic_output(page, force=True) as temp:
        atlas_view(**result.page_inputs()).save(temp)
    lines = _summary_lines(result, page)
    payload = {"models": models, "computed": result.computed, "skipped": result.skipped,
               "files": {**{k: str(v) for k, v in result.files.items()}, "page": str(page)},
               "summary": result.tables["models"].to_dict(orient="records")}
    emit(args, lines, payload)
    return 0
