"""`llm-heatmap ablate`: every head ablated alone over a prompt file, its mean effect with an interval."""

from __future__ import annotations

from . import options
from .run import emit, launched, load, progress_off

EXAMPLE = """examples:
  llm-heatmap ablate prompts.txt --out runs/ablation/                 # zero ablation
  llm-heatmap ablate prompts.txt --out runs/ablation/ --mode mean     # each head's mean output over the prompts
  llm-heatmap ablate prompts.txt --out runs/ablation/ --resume        # after an interruption
  llm-heatmap ablate digits.jsonl --model examples/toy_models/digit-reverser --site cross --out runs/rev/
  llm-heatmap ablate pictures.jsonl --model examples/toy_models/shape-vit --out runs/vit/   # {"image": "a.png"}"""

FILES = ("ablation.parquet", "importance.csv", "importance.png")


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "ablate", run, summary="every head ablated alone over a prompt file: does it matter?",
        description="For every prompt of FILE and every head, run the prompt with that head's output replaced by zero "
        "(--mode zero) or by its mean over every token of the prompt set (--mode mean), many heads per batched "
        "forward, and record the change in log p of the clean prediction at the last position (delta_log_prob) "
        "and in the prompt's mean next-token loss (delta_loss). Writes OUT/ablation.parquet (one row per prompt x "
        "head), OUT/importance.csv (per head: the mean change over the prompts with a bootstrap interval) and "
        "OUT/importance.png (the mean delta_log_prob per head). Resumable (--resume), shardable (--shard i/n) and "
        "data-parallel under torchrun or accelerate launch, like batch. A decoder-only LM is scored by its next token; "
        "an encoder-decoder (--site encoder, decoder or cross; records give their target, else the greedy output) by "
        "the teacher-forced log p of the target, summed over its tokens, and the mean loss per target token; an "
        "image classifier (records give their image) by log p of the class it predicts.",
        example=EXAMPLE)
    options.add_prompt_set_options(parser, "FILE")
    parser.add_argument("--mode", choices=("zero", "mean"), default="zero",
                        help="what replaces a head's output: zero (default) or its mean over the prompt set")
    parser.add_argument("--site", help="the attention site whose heads are ablated: encoder, decoder or cross of an "
                        "encoder-decoder (needed there), vision of an image classifier; a decoder-only LM has one, self")
    options.add_bootstrap_options(parser)
    options.add_model_options(parser)
    options.add_run_options(parser)


def run(args) -> int:
    from llm_heatmap.analyses.bounds import check_statistics
    from llm_heatmap.models.files import claim_outputs
    from llm_heatmap.analyses.runs.prompts import parse_shard, read_prompts

    check_statistics(n_resamples=args.resamples, confidence=args.confidence)
    options.check_site_options(args)
    shard = None if args.shard is None else parse_shard(args.shard)
    prompts = read_prompts(args.file, column=args.column)
    outputs = [args.out / name for name in FILES[1:]] if shard is None else []
    with claim_outputs(outputs, force=args.force or args.resume):
        return _run(args, prompts, shard)


def _run(args, prompts, shard) -> int:
    import torch

    from llm_heatmap.analyses.importance.ablation import run_head_ablation
    from llm_heatmap.analyses.runs.engine import RunOptions
    from llm_heatmap.analyses.runs.parts import shard_suffix
    from llm_heatmap.analyses.runs.table_files import write_table
    from llm_heatmap.analyses.stats import Bootstrap
    from llm_heatmap.models.files import atomic_output
    from llm_heatmap.viz import plot_metric_map, save_figure

    ranks = launched(args)
    try:
        from llm_heatmap.analyses.runs.sites import loaded_with_processor

        model, tokenizer, spec, processor = loaded_with_processor(
            args.model, lambda source: load(args, source, device=ranks.device()), prompts,
            trust_remote_code=args.trust_remote_code)
        with torch.no_grad():
            result = run_head_ablation(model, tokenizer, prompts, args.out, spec=spec, source=str(args.model),
                                       chat=args.chat, mode=args.mode, bootstrap=Bootstrap(args.resamples, args.confidence),
                                       run=RunOptions(shard=shard, resume=args.resume, force=args.force,
                                                      quiet=progress_off(args), ranks=ranks),
                                       site=args.site, processor=processor)
        if args.site is not None:  # the site's own spec, as the ablation read it
            from llm_heatmap.analyses.runs.sites import resolve_site

            spec = resolve_site(model, spec, args.site, str(args.model)).spec
    finally:
        ranks.close()
    if result is None:
        return 0
    importance = result.importance
    files = [args.out / f"ablation{shard_suffix(shard)}.parquet"]
    scored = {"next token": "the predicted token", "target": "the target", "class": "the predicted class"}[result.scored]
    if shard is None:
        files.append(write_table(importance, args.out / "importance.csv", force=True))
        site = f"{args.site} site, " if args.site else ""
        title = (f"{site}{args.mode} ablation: mean change in log p of {scored} over {len(prompts)} prompt"
                 f"{'s' * (len(prompts) != 1)}")
        with atomic_output(args.out / "importance.png", force=True) as temp:
            save_figure(plot_metric_map(importance, "delta_log_prob", center=0.0, title=title), temp)
        files.append(args.out / "importance.png")
    top = importance.sort_values("delta_log_prob").head(5)
    listed = [f"L{r.layer}H{r.head} {r.delta_log_prob:+.3f} [{r.delta_log_prob_low:+.3f}, {r.delta_log_prob_high:+.3f}]"
              for r in top.itertuples()]
    lines = [f"{args.model}: {spec.summary}",
             f"{args.mode} ablation of {len(importance)} heads on {importance['n_prompts'].iloc[0]} prompts; "
             f"largest drops in log p of {'the prediction' if result.scored == 'next token' else scored}: "
             + ", ".join(listed),
             "wrote " + ", ".join(map(str, files))]
    emit(args, lines, {"model": str(args.model), "spec": spec.summary, "mode": args.mode, "largest_drops": listed,
                       "files": [str(p) for p in files]})
    return 0
