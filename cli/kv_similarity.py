"""`llm-heatmap kv-similarity`: do heads sharing a KV head attend alike? One table across models."""

from __future__ import annotations

from pathlib import Path

from llm_heatmap.errors import InputError
from llm_heatmap.models.offline import DEFAULT_MODEL

from . import options
from .run import emit, load, progress_off

EXAMPLE = """example:
  llm-heatmap kv-similarity --model smollm2-135m --model minilm-l6 "the sky is blue" \\
      "Explain the core idea behind quantum entanglement." --out kv.csv     # also writes kv.summary.csv"""


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "kv-similarity", run,
        summary="within- vs between-KV-group head similarity, per layer, across models",
        description="For every model and prompt, per layer: mean similarity of heads sharing a KV head (within), of "
        "heads in different groups (between), the gap and a permutation p-value, for JS, cosine and Pearson "
        "similarity, with and without the first-token column. MHA models use pseudo-groups of the GQA models' "
        "group size, so GQA and MHA sit in one table. Prints a model-level summary.", example=EXAMPLE)
    parser.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt texts")
    options.add_prompt_file_option(parser, help="one more prompt: the whole file (as in every command)")
    parser.add_argument("--prompts", dest="prompt_set", type=Path, metavar="FILE",
                        help="more prompts, a prompt set: .txt (one per line), .jsonl, .csv or .parquet")
    parser.add_argument("--column", default="prompt", help="field or column of a JSONL/CSV/Parquet --prompts file "
                        "that holds the prompt (default: prompt)")
    options.add_chat_option(parser)
    options.add_model_options(parser, several=True)
    parser.add_argument("--site", help="the attention site read on every model, one of " + ", ".join(options.SITES) +
                        "; a model with several sites (an encoder-decoder, a VLM) needs it; records of a --prompts "
                        "file give their images and targets (JSONL fields or columns image, target); without a target "
                        "an encoder-decoder's decoder reads what it generates greedily from the source")
    parser.add_argument("--out", type=Path, help="output folder (NAME.kv.csv per layer, NAME.kv.summary.csv, and a chart "
                        "per model, NAME.kv.MODEL.png), or the per-layer table's own path (the summary and charts go "
                        "beside it as STEM.summary.EXT and STEM.MODEL.png)")
    parser.add_argument("--name", help="base name of the tables in --out (default: from the models and prompts)")
    parser.add_argument("--resume", action="store_true", help="with --out: keep the prompts an interrupted run already "
                        "measured (in NAME.kv/ beside the table), measure the rest")
    options.add_pseudo_group_option(parser)
    parser.add_argument("--measure", action="append", choices=options.MEASURES,
                        help="similarity measure (repeat; default all three)")
    options.add_permutation_options(parser, default=1000, help="permutations per layer")
    options.add_run_options(parser)


def run_folder(out: Path) -> Path:
    """The resumable run beside the per-layer table NAME.kv.csv: NAME.kv/ (its parts, settings and rows)."""
    return out.with_suffix("")


def summary_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.summary{out.suffix}")


def figure_paths(out: Path, models: list[str]) -> dict[str, Path]:
    """One chart per model beside the per-layer table: STEM.MODEL.png (with a hash of the source where two
    models' names would match, e.g. two folders called `model`)."""
    names = {model: options.slug(Path(model).stem, 24) for model in models}
    shared = {name for name in names.values() if list(names.values()).count(name) > 1}
    return {model: out.with_name(f"{out.stem}.{name}{'-' + options.prompt_hash(model) if name in shared else ''}.png")
            for model, name in names.items()}


def kv_chart(layers, model: str, seed: int = 0):
    """Within- vs between-group similarity per layer of `model` (the mean over the prompts) for the table's
    first measure (JS by default), first token kept, as `viz.plot_kv_similarity` draws it; with several prompts,
    below it the gap per layer with a bootstrap interval over the prompts (seeded by `seed`)."""
    from llm_heatmap.viz import plot_kv_similarity

    measure = layers["measure"].iloc[0]
    part = layers[(layers["model"] == model) & (layers["measure"] == measure) & (layers["first_token"] == "kept")]
    grouping = part["grouping"].iloc[0]
    per_layer = part.groupby("layer", as_index=False)[["within", "between"]].mean().assign(grouping=grouping)
    size, prompts = int(part["group_size"].iloc[0]), part["prompt"].nunique()
    groups = "KV groups" if grouping == "kv" else "pseudo-groups"
    note = ""
    if prompts > 1:  # the gap per layer with a bootstrap interval over the prompts
        from llm_heatmap.analyses.stats import bootstrap_means

        gaps = part.pivot_table(index="prompt", columns="layer", values="gap")[per_layer["layer"]]
        stats = bootstrap_means(gaps.to_numpy(), seed=seed)
        per_layer = per_layer.assign(gap=stats["mean"], gap_low=stats["ci_low"], gap_high=stats["ci_high"])
        note = "; gap: 95% bootstrap interval over prompts"
    return plot_kv_similarity(per_layer, title=f"{model}: {measure} similarity per layer, first token kept\n"
                              f"{groups} of {size} heads; mean over {prompts} prompt{'s' * (prompts != 1)}{note}")


def run(args) -> int:
    from llm_heatmap.analyses.bounds import check_pseudo_group_size, check_statistics
    from llm_heatmap.models.files import claim_outputs
    from llm_heatmap.analyses.runs.prompts import Prompt, check_prompt, read_prompt_text, read_prompts
    from llm_heatmap.analyses.runs.table_files import table_format

    prompts = [Prompt(f"argument-{i + 1}", check_prompt(text, f"prompt {i + 1}"), origin=f"argument {i + 1}")
               for i, text in enumerate(args.prompts)]
    if args.prompt_file is not None:
        prompts.append(Prompt("prompt-file", read_prompt_text(args.prompt_file), origin=str(args.prompt_file)))
    if args.prompt_set is not None:
        prompts += read_prompts(args.prompt_set, column=args.column)
    if not prompts:
        raise InputError("no prompt given; pass PROMPT arguments, --prompt-file FILE (one prompt) or --prompts FILE "
                         "(one per line).")
    check_statistics(n_permutations=args.permutations, seed=args.seed)
    check_pseudo_group_size(args.pseudo_group_size)
    options.check_site_options(args)
    if args.out is not None:
        models = "-".join(options.slug(Path(str(m)).stem, 16) for m in args.model or [DEFAULT_MODEL])
        site = f".{args.site}" if args.site else ""
        name = options.plain_name(args.name) or f"{models}_{options.prompt_slug(' '.join(p.text for p in prompts), 24)}{site}"
        args.out = options.table_or_folder(args.out, name, "kv")
        table_format(args.out)
    models = list(dict.fromkeys(args.model or [DEFAULT_MODEL]))
    outputs = [] if args.out is None else [args.out, summary_path(args.out), *figure_paths(args.out, models).values()]
    if args.resume and args.out is None:
        raise InputError("--resume continues the run kept beside the tables of --out; add --out, or drop --resume.")
    with claim_outputs(outputs, force=args.force or args.resume):
        return _run(args, prompts)


def _run(args, prompts: list[str]) -> int:
    import torch

    from llm_heatmap.analyses.runs.engine import RunOptions
    from llm_heatmap.analyses.runs.table_files import write_table
    from llm_heatmap.analyses.similarity.kv_report import kv_report

    models = list(dict.fromkeys(args.model or [DEFAULT_MODEL]))
    with torch.no_grad():
        report = kv_report(models, prompts, pseudo_group_size=args.pseudo_group_size, chat=args.chat,
                           measures=args.measure, n_permutations=args.permutations, seed=args.seed,
                           loader=lambda source: load(args, source), site=args.site,
                           out_dir=None if args.out is None else run_folder(args.out),
                           run=RunOptions(resume=args.resume, force=args.force, quiet=progress_off(args)))
    files = {}
    if args.out is not None:
        files["layers"] = write_table(report.layers, args.out, force=True)  # claimed above
        files["summary"] = write_table(report.summary, summary_path(args.out), force=True)
        from llm_heatmap.viz import save_figure

        files["figures"] = [save_figure(kv_chart(report.layers, model, args.seed), path)
                            for model, path in figure_paths(args.out, models).items()]
    summary = report.summary
    lines = [f"{len(models)} model(s) x {len(prompts)} prompt(s)" + (f", {args.site} site" if args.site else "") +
             "; gap = within - between (mean over prompts and layers)"]
    for row in summary.itertuples():
        lines.append(f"{row.model} ({row.attention_kind}, {row.grouping} groups of {row.group_size}) {row.measure:7s} "
                     f"first token {row.first_token:7s}: within {row.within:.3f} between {row.between:.3f} "
                     f"gap {row.gap:+.3f}; gap > 0 in {row.share_gap_positive:.0%} of layers, p < 0.05 in {row.share_significant:.0%}")
    if files:
        lines.append("wrote " + ", ".join(str(p) for p in [files["layers"], files["summary"], *files["figures"]]))
    payload = {"models": models, "prompts": [p.text for p in prompts],
               "files": {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in files.items()},
               "summary": summary.to_dict(orient="records")}
    emit(args, lines, payload)
    return 0
