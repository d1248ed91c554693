"""`llm-heatmap compare`: prompt B vs prompt A (metric deltas, difference cube), or set B vs set A."""

from __future__ import annotations

from pathlib import Path

from llm_heatmap.errors import InputError

from . import options
from .run import emit, load

EXAMPLE = """examples:
  llm-heatmap compare "Tell me a very simple short story." "Explain the core idea behind quantum entanglement." \\
      --out exp2.deltas.csv --cube-out exp2.diff.safetensors
  llm-heatmap compare "the sky is blue" "run a self-meta-cognitive diagnostic" --metrics-only --model minilm-l6
  llm-heatmap compare simple.txt complex.txt --sets --out sets.heads.csv   # also writes sets.layers.csv"""
DIGEST_METRICS = ("norm_entropy", "sink_score_no_q0", "prev_token_mass", "mean_distance")


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "compare", run, summary="compare two prompts (or two prompt files with --sets) head by head",
        description="Per-head metric deltas B - A of two prompts, joined on (layer, head), and, when both have the "
        "same number of tokens, the difference cube (pattern B - A). With --sets, A and B are prompt files "
        "(TXT, one prompt per line, or JSONL) and the result is per-head and per-layer mean deltas with "
        "bootstrap confidence intervals and permutation p-values.", example=EXAMPLE)
    parser.add_argument("a", metavar="A", help="prompt A (the baseline), or a prompt file with --sets")
    parser.add_argument("b", metavar="B", help="prompt B, or a prompt file with --sets")
    parser.add_argument("--metrics-only", action="store_true",
                        help="compare metrics only (allows prompts with different token counts)")
    parser.add_argument("--sets", action="store_true", help="A and B are prompt files: compare the two sets")
    options.add_chat_option(parser)
    options.add_model_options(parser)
    parser.add_argument("--out", type=Path, help="delta table (with --sets: per-head table; the per-layer table "
                        "goes beside it as STEM.layers.EXT)")
    parser.add_argument("--cube-out", type=Path, help="save the difference cube (B - A) as safetensors")
    options.add_metric_option(parser)
    stats = parser.add_argument_group("set statistics (--sets)")
    options.add_bootstrap_options(stats)
    options.add_permutation_options(stats, default=2000, help="label permutations")
    options.add_run_options(parser)


def layers_path(out: Path) -> Path:
    return out.with_name(f"{out.stem.removesuffix('.heads')}.layers{out.suffix}")


def _top_lines(deltas, count: int = 3) -> list[str]:
    import pandas as pd

    lines = []
    for metric in [m for m in DIGEST_METRICS if m in set(deltas["metric"])] or list(pd.unique(deltas["metric"]))[:4]:
        part = deltas[deltas["metric"] == metric]
        top = part.reindex(part["delta"].abs().sort_values(ascending=False).index).head(count)
        heads = ", ".join(f"L{int(r.layer)}H{int(r.head)} ({r.delta:+.3f})" for r in top.itertuples())
        lines.append(f"{metric}: mean delta {part['delta'].mean():+.4f}; largest {heads}")
    return lines


def _run_pair(args, metrics) -> tuple[list[str], dict]:
    import torch

    from llm_heatmap.analyses.measure import stream_head_metrics
    from llm_heatmap.analyses.compare import compare_cubes, compare_tables
    from llm_heatmap.analyses.files import atomic_output
    from llm_heatmap.analyses.prompts import check_length, check_prompt
    from llm_heatmap.analyses.tables import write_table
    from llm_heatmap.probes import capture_prompt

    a = check_prompt(args.a, "prompt A")
    b = check_prompt(args.b, "prompt B")
    if args.cube_out is not None and args.metrics_only:
        raise InputError("--cube-out needs the difference cube, which --metrics-only skips; drop one of them.")
    model, tokenizer, spec = load(args)
    count_a = check_length(tokenizer, spec, a, chat=args.chat, where="prompt A")
    count_b = check_length(tokenizer, spec, b, chat=args.chat, where="prompt B")
    if count_a != count_b and not args.metrics_only:
        raise InputError(f"prompt A has {count_a} tokens and prompt B has {count_b}, so their patterns cannot be "
                         "subtracted; pass --metrics-only to compare metrics only, or use prompts of equal length.")
    with torch.no_grad():
        if args.metrics_only:
            tables = [stream_head_metrics(model, tokenizer, p, spec=spec, chat=args.chat) for p in (a, b)]
            result = compare_tables(*tables, metrics=metrics)
        else:
            cubes = [capture_prompt(model, tokenizer, p, spec=spec, chat=args.chat, source=str(args.model)) for p in (a, b)]
            result = compare_cubes(*cubes, metrics=metrics)
    files = {}
    if args.out is not None:
        files["deltas"] = write_table(result.deltas, args.out, force=args.force)
    if args.cube_out is not None:
        with atomic_output(args.cube_out, force=args.force) as temp:
            result.difference.save(temp)
        files["difference_cube"] = args.cube_out
    lines = [f"{args.model}: {spec.summary}", f"A: {count_a} tokens, B: {count_b} tokens; deltas are B - A"
             + ("" if result.difference is None else "; difference cube computed"), *_top_lines(result.deltas)]
    if files:
        lines.append("wrote " + ", ".join(str(p) for p in files.values()))
    payload = {"model": str(args.model), "spec": spec.summary, "tokens": {"a": count_a, "b": count_b},
               "files": {k: str(v) for k, v in files.items()}, "digest": lines[2:2 + len(_top_lines(result.deltas))]}
    return lines, payload


def _set_table(model, tokenizer, spec, prompts, chat, name):
    import pandas as pd

    from llm_heatmap.analyses.measure import stream_head_metrics

    frames = []
    for prompt in prompts:
        table = stream_head_metrics(model, tokenizer, prompt.text, spec=spec, chat=chat)
        table.insert(0, "prompt_id", f"{name}:{prompt.id}")
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def _run_sets(args, metrics) -> tuple[list[str], dict]:
    import torch

    from llm_heatmap.analyses.compare import compare_sets
    from llm_heatmap.analyses.prompts import check_length, read_prompts
    from llm_heatmap.analyses.tables import write_table

    if args.cube_out is not None:
        raise InputError("--cube-out applies to two prompts, not to --sets; drop --cube-out.")
    set_a, set_b = read_prompts(args.a), read_prompts(args.b)
    layer_out = None if args.out is None else layers_path(args.out)
    model, tokenizer, spec = load(args)
    for name, prompts in (("A", set_a), ("B", set_b)):
        for prompt in prompts:
            check_length(tokenizer, spec, prompt.text, chat=args.chat, where=f"{prompt.where} of set {name}")
    with torch.no_grad():
        table_a = _set_table(model, tokenizer, spec, set_a, args.chat, "A")
        table_b = _set_table(model, tokenizer, spec, set_b, args.chat, "B")
    result = compare_sets(table_a, table_b, metrics=metrics, n_resamples=args.resamples,
                          n_permutations=args.permutations, confidence=args.confidence, seed=args.seed)
    files = {}
    if args.out is not None:
        files["heads"] = write_table(result.heads, args.out, force=args.force)
        files["layers"] = write_table(result.layers, layer_out, force=args.force)
    significant = result.heads[result.heads["q_value"] < 0.05]
    lines = [f"{args.model}: {spec.summary}",
             f"set A: {len(set_a)} prompts ({args.a}), set B: {len(set_b)} prompts ({args.b}); deltas are B - A",
             f"head x metric deltas with q < 0.05 (Benjamini-Hochberg per metric): {len(significant)} of {len(result.heads)}"]
    layers = result.layers
    for metric in [m for m in DIGEST_METRICS if m in set(layers["metric"])]:
        part = layers[layers["metric"] == metric]
        best = part.loc[part["p_value"].idxmin()]
        lines.append(f"{metric}: strongest layer L{int(best.layer)} delta {best.delta:+.4f} "
                     f"[{best.ci_low:+.4f}, {best.ci_high:+.4f}], p = {best.p_value:.3g}")
    if files:
        lines.append("wrote " + ", ".join(str(p) for p in files.values()))
    payload = {"model": str(args.model), "spec": spec.summary, "prompts": {"a": len(set_a), "b": len(set_b)},
               "files": {k: str(v) for k, v in files.items()}, "significant": int(len(significant)),
               "layers": layers.to_dict(orient="records")}
    return lines, payload


def run(args) -> int:
    from llm_heatmap.analyses.bounds import check_statistics
    from llm_heatmap.analyses.files import claim_outputs
    from llm_heatmap.analyses.tables import table_format

    metrics = options.selected_metrics(args)
    if args.sets:
        check_statistics(n_resamples=args.resamples, n_permutations=args.permutations, confidence=args.confidence,
                         seed=args.seed)
    if args.out is not None:
        table_format(args.out)
    outputs = [args.out, args.cube_out] + ([layers_path(args.out)] if args.sets and args.out is not None else [])
    with claim_outputs([path for path in outputs if path is not None], force=args.force):
        lines, payload = (_run_sets if args.sets else _run_pair)(args, metrics)
    emit(args, lines, payload)
    return 0
