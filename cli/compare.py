"""`llm-heatmap compare`: prompt B vs prompt A (metric deltas, difference cube), or set B vs set A."""

from __future__ import annotations

from pathlib import Path

from llm_heatmap.errors import InputError

from . import options
from .run import Steps, emit, load, progress_off

EXAMPLE = """examples:
  llm-heatmap compare "Tell me a very simple short story." "Explain the core idea behind quantum entanglement." --html
      # writes NAME.deltas.csv, NAME.diff.png, NAME.diff.html and NAME.diff.cube.safetensors into ./heatmaps/
  llm-heatmap compare "the sky is blue" "run a self-meta-cognitive diagnostic" --metrics-only --model minilm-l6
  llm-heatmap compare simple.txt complex.txt --sets --out results/   # NAME.heads.csv and NAME.layers.csv"""
DIGEST_METRICS = ("norm_entropy", "sink_score_no_q0", "prev_token_mass", "mean_distance")


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "compare", run, summary="compare two prompts (or two prompt files with --sets) head by head",
        description="Per-head metric deltas B - A of two prompts, joined on (layer, head), and, when both have the "
        "same number of tokens, the difference cube (pattern B - A), drawn on a diverging colour map centred on 0 "
        "(red: B attends more). Writes into --out: NAME.deltas.csv, NAME.diff.png, NAME.diff.cube.safetensors "
        "(skip it with --no-cube) and, with --html, NAME.diff.html. With --sets, A and B are prompt files "
        "(TXT, one prompt per line, JSONL, CSV or Parquet) and the result is per-head and per-layer mean deltas with "
        "bootstrap confidence intervals and permutation p-values (NAME.heads.csv, NAME.layers.csv); each prompt's "
        "per-head rows are kept in NAME.sets/ (a resumable run: --resume after an interruption).", example=EXAMPLE)
    parser.add_argument("a", metavar="A", help="prompt A (the baseline), or a prompt file with --sets")
    parser.add_argument("b", metavar="B", nargs="?", help="prompt B, or a prompt file with --sets (none with "
                        "--group-column: both sets come from A)")
    parser.add_argument("--metrics-only", action="store_true",
                        help="compare metrics only (allows prompts with different token counts; no difference drawn)")
    parser.add_argument("--sets", action="store_true", help="A and B are prompt files: compare the two sets")
    options.add_chat_option(parser)
    options.add_model_options(parser)
    options.add_site_options(parser)
    options.add_output_options(parser)
    parser.add_argument("--no-cube", action="store_true", help="do not write the difference cube file")
    parser.add_argument("--cube-out", type=Path, help="write the difference cube (B - A) to this file instead of "
                        "NAME.diff.cube.safetensors in --out")
    options.add_metric_option(parser)
    options.add_drawing_options(parser)
    sets = parser.add_argument_group("prompt sets (--sets)")
    sets.add_argument("--column", default="prompt", help="field or column of a JSONL/CSV/Parquet prompt file that "
                      "holds the prompt (default: prompt)")
    sets.add_argument("--group-column", metavar="FIELD", help="both sets from one file A: its prompts split by this "
                      "field (e.g. group)")
    sets.add_argument("--groups", metavar="A,B", help="with --group-column: the two group values to compare, A first "
                      "(default: the file's two groups in order of appearance)")
    sets.add_argument("--resume", action="store_true", help="keep the prompts an interrupted run already measured "
                      "(in OUT/NAME.sets/), measure the rest")
    sets.add_argument("--paired", metavar="FIELD", help="with --group-column: prompts matched by this field (e.g. "
                      "pair), one of each group per value; paired statistics (sign-flip permutation test)")
    stats = parser.add_argument_group("set statistics (--sets)")
    options.add_bootstrap_options(stats)
    options.add_permutation_options(stats, default=2000, help="label permutations")
    options.add_json_option(parser)


def layers_path(out: Path) -> Path:
    return out.with_name(f"{out.stem.removesuffix('.heads')}.layers{out.suffix}")


def output_paths(args) -> dict[str, Path]:
    """Every file this run writes. --out is a folder; a --out ending in a table extension is the
    (older) spelling of the delta (or per-head) table's own path, with the other files beside it."""
    out = args.out
    if out.suffix and not out.is_dir():  # as options.table_or_folder: the table format is checked by its suffix
        folder, name = out.parent, options.plain_name(args.name) or out.stem.removesuffix(".heads")
        table = out
    else:
        site = f".{args.site}" if getattr(args, "site", None) else ""
        folder, name = out, options.plain_name(args.name) or _default_name(args) + site + options.drawing_suffix(args)
        table = folder / f"{name}.{'heads' if args.sets else 'deltas'}.csv"
    if args.sets:  # "run": the folder of the resumable run measuring both sets (not an output file)
        return {"heads": table, "layers": layers_path(table), "run": folder / f"{name}.sets"}
    paths = {"deltas": table}
    if not args.metrics_only:
        paths["grid"] = folder / f"{name}.diff.{args.format}"
        if args.html:
            paths["html"] = folder / f"{name}.diff.html"
        if args.cube_out is not None:
            paths["cube"] = args.cube_out
        elif not args.no_cube:
            paths["cube"] = folder / f"{name}.diff.cube.safetensors"
    return paths


def _default_name(args) -> str:
    """The model, both prompts' first words, and a short hash of both prompts (so that prompts sharing
    their first words never share a name)."""
    digest = options.prompt_hash(args.a, args.b, args.chat)
    kind = "sets" if args.sets else "compare"
    if args.b is None:  # one file split by --group-column
        return f"{options.slug(Path(str(args.model)).stem, 24)}_sets_{options.slug(Path(args.a).stem, 30)}_{digest}"
    return (f"{options.slug(Path(str(args.model)).stem, 24)}_{kind}_{options.slug(Path(args.a).stem if args.sets else args.a, 20)}"
            f"_vs_{options.slug(Path(args.b).stem if args.sets else args.b, 20)}_{digest}")


def _top_lines(deltas, count: int = 3) -> list[str]:
    import pandas as pd

    lines = []
    for metric in [m for m in DIGEST_METRICS if m in set(deltas["metric"])] or list(pd.unique(deltas["metric"]))[:4]:
        part = deltas[deltas["metric"] == metric]
        top = part.reindex(part["delta"].abs().sort_values(ascending=False).index).head(count)
        heads = ", ".join(f"L{int(r.layer)}H{int(r.head)} ({r.delta:+.3f})" for r in top.itertuples())
        lines.append(f"{metric}: mean delta {part['delta'].mean():+.4f}; largest {heads}")
    return lines


def _run_pair(args, metrics, paths: dict) -> tuple[list[str], dict]:
    import torch

    from llm_heatmap.analyses.heads.measure import stream_head_metrics
    from llm_heatmap.analyses.compare import compare_cubes, compare_tables
    from llm_heatmap.analyses.runs.prompts import check_length, check_prompt
    from llm_heatmap.models import site_specs
    from llm_heatmap.probes import capture_prompt

    from . import sites

    a = check_prompt(args.a, "prompt A")
    b = check_prompt(args.b, "prompt B")
    style, layers, heads = options.grid_style(args)
    step = Steps(args, ["loading model", "capturing A", "capturing B", "writing"])
    step("loading model")
    model, tokenizer, spec = load(args)
    specs = site_specs(model)
    if sites.wants_sites(args, specs):
        result, summary, counts = _compare_site(args, model, tokenizer, specs, a, b, metrics, step)
        count_a, count_b = counts
        return _write_pair(args, paths, result, summary, count_a, count_b, style, layers, heads, step)
    count_a = check_length(tokenizer, spec, a, chat=args.chat, where="prompt A")
    count_b = check_length(tokenizer, spec, b, chat=args.chat, where="prompt B")
    if count_a != count_b and not args.metrics_only:
        raise InputError(f"prompt A has {count_a} tokens and prompt B has {count_b}, so their patterns cannot be "
                         "subtracted; pass --metrics-only to compare metrics only, or use prompts of equal length.")
    with torch.no_grad():
        if args.metrics_only:
            tables = []
            for name, prompt in (("A", a), ("B", b)):
                step(f"capturing {name}")
                tables.append(stream_head_metrics(model, tokenizer, prompt, spec=spec, chat=args.chat))
            result = compare_tables(*tables, metrics=metrics)
        else:
            cubes = []
            for name, prompt in (("A", a), ("B", b)):
                step(f"capturing {name}")
                cubes.append(capture_prompt(model, tokenizer, prompt, spec=spec, chat=args.chat, source=str(args.model)))
            result = compare_cubes(*cubes, metrics=metrics)
    return _write_pair(args, paths, result, spec.summary, count_a, count_b, style, layers, heads, step)


def _compare_site(args, model, tokenizer, specs: dict, a: str, b: str, metrics, step):
    """(comparison, the site's summary, (keys of A, keys of B)) of one site of a model read through its sites:
    prompts A and B as the text (an encoder-decoder's source), with the same --image and --target."""
    from llm_heatmap.analyses.compare import compare_cubes
    from llm_heatmap.analyses.heads.measure import site_metrics

    from . import sites

    sites.check_single_site_flags(args)
    site = sites.one_site(args, model, specs, "compare")
    picture = sites.one_picture(args, "compare")
    cubes = []
    for name, prompt in (("A", a), ("B", b)):
        step(f"capturing {name}")
        cubes.append(sites.capture_cubes(args, model, tokenizer, specs, [site], prompt, picture)[site])
    result = compare_cubes(*cubes, metrics=metrics, metrics_only=args.metrics_only, head_metrics=site_metrics)
    return result, specs[site].summary, (cubes[0].num_keys, cubes[1].num_keys)


def _write_pair(args, paths: dict, result, summary: str, count_a: int, count_b: int, style, layers, heads, step):
    from llm_heatmap.analyses.runs.table_files import write_table
    from llm_heatmap.models.files import atomic_output
    from llm_heatmap.viz import save_grid, write_html

    step("writing")
    write_table(result.deltas, paths["deltas"], force=args.force)
    if "grid" in paths:
        with atomic_output(paths["grid"], force=args.force) as temp:
            save_grid(result.difference, temp, style, layers=layers, heads=heads)
    if "html" in paths:
        with atomic_output(paths["html"], force=args.force) as temp:
            write_html(result.difference, temp, style=style)
    if "cube" in paths:
        with atomic_output(paths["cube"], force=args.force) as temp:
            result.difference.save(temp)
    step.close()
    digest = _top_lines(result.deltas)
    lines = [f"{args.model}: {summary}", f"A: {count_a} tokens, B: {count_b} tokens; deltas are B - A"
             + ("" if result.difference is None else "; difference cube computed"), *digest,
             "wrote " + ", ".join(str(p) for p in paths.values())]
    payload = {"model": str(args.model), "spec": summary, "tokens": {"a": count_a, "b": count_b},
               "files": {k: str(v) for k, v in paths.items()}, "digest": digest}
    return lines, payload


def _run_sets(args, metrics, paths: dict, run_folder) -> tuple[list[str], dict]:
    import torch

    from llm_heatmap.analyses.compare import run_set_comparison
    from llm_heatmap.analyses.runs.engine import RunOptions
    from llm_heatmap.analyses.runs.sites import loaded_with_processor, resolve_site
    from llm_heatmap.analyses.runs.table_files import write_table

    set_a, set_b, pairs, names = read_sets(args)
    model, tokenizer, spec, processor = loaded_with_processor(args.model, lambda source: load(args, source),
                                                              [*set_a, *set_b], trust_remote_code=args.trust_remote_code)
    with torch.no_grad():
        result = run_set_comparison(model, tokenizer, set_a, set_b, run_folder, spec=spec, source=str(args.model),
                                    chat=args.chat, pairs=pairs, metrics=metrics, site=args.site, processor=processor,
                                    run=RunOptions(resume=args.resume, force=args.force, quiet=progress_off(args)),
                                    n_resamples=args.resamples, n_permutations=args.permutations,
                                    confidence=args.confidence, seed=args.seed)
    again = args.force or args.resume
    files = {"heads": write_table(result.heads, paths["heads"], force=again),
             "layers": write_table(result.layers, paths["layers"], force=again)}
    significant = result.heads[result.heads["q_value"] < 0.05]
    spec = resolve_site(model, spec, args.site, str(args.model)).spec  # the site's, as run_set_comparison read it
    lines = [f"{args.model}: {spec.summary}",
             f"set A: {len(set_a)} prompts ({names[0]}), set B: {len(set_b)} prompts ({names[1]}); "
             f"deltas are B - A" + (f", paired by {args.paired} ({len(pairs)} pairs, sign-flip test)" if pairs else ""),
             f"head x metric deltas with q < 0.05 (Benjamini-Hochberg per metric): {len(significant)} of {len(result.heads)}"]
    layers = result.layers
    for metric in [m for m in DIGEST_METRICS if m in set(layers["metric"])]:
        part = layers[layers["metric"] == metric]
        best = part.loc[part["p_value"].idxmin()]
        lines.append(f"{metric}: strongest layer L{int(best.layer)} delta {best.delta:+.4f} "
                     f"[{best.ci_low:+.4f}, {best.ci_high:+.4f}], p = {best.p_value:.3g}")
    lines.append("wrote " + ", ".join(str(p) for p in files.values()))
    payload = {"model": str(args.model), "spec": spec.summary, "prompts": {"a": len(set_a), "b": len(set_b)},
               "files": {k: str(v) for k, v in files.items()}, "significant": int(len(significant)),
               "layers": layers.to_dict(orient="records")}
    return lines, payload


def _group_names(args) -> list[str] | None:
    if args.groups is None:
        return None
    names = [name.strip() for name in args.groups.split(",")]
    if len(names) != 2 or not all(names):
        raise InputError(f"--groups '{args.groups}' must name two groups, A first, like simple,complex.")
    return names


def read_sets(args):
    """(prompts of set A, prompts of set B, matched id pairs or None, the two sets' names) from --sets' files."""
    from llm_heatmap.analyses.compare import split_groups
    from llm_heatmap.analyses.runs.prompts import prompt_fields, read_prompts

    if args.group_column is None:
        return (read_prompts(args.a, column=args.column), read_prompts(args.b, column=args.column), None,
                (str(args.a), str(args.b)))
    prompts = read_prompts(args.a, column=args.column)
    names = [args.group_column] + ([args.paired] if args.paired else [])
    fields = prompt_fields(args.a, names)
    values = list(dict.fromkeys(f[args.group_column] for f in fields if f[args.group_column] is not None))
    groups = _group_names(args)
    if groups is None and len(values) != 2:
        raise InputError(f"{args.a} holds {len(values)} values of '{args.group_column}' ({', '.join(values) or 'none'}); "
                         "name the two to compare with --groups A,B.")
    ids = [p.id for p in prompts]
    a_ids, b_ids, pairs = split_groups(ids, fields, args.group_column, groups, args.paired)
    by_id = {p.id: p for p in prompts}
    names = tuple(f"{args.group_column} '{g}' of {args.a}" for g in groups or values)
    return [by_id[i] for i in a_ids], [by_id[i] for i in b_ids], pairs, names


def run(args) -> int:
    from llm_heatmap.analyses.bounds import check_statistics
    from llm_heatmap.models.files import claim_outputs
    from llm_heatmap.analyses.runs.table_files import table_format

    metrics = options.selected_metrics(args)
    if args.sets:
        check_statistics(n_resamples=args.resamples, n_permutations=args.permutations, confidence=args.confidence,
                         seed=args.seed)
    if args.sets and (args.b is None) != (args.group_column is not None):
        raise InputError("--sets compares two prompt files A B, or the two groups of one file A with --group-column; "
                         "give B or --group-column, not both." if args.b is not None else
                         "--sets needs a second prompt file B, or --group-column FIELD to split file A into two sets.")
    if not args.sets and args.b is None:
        raise InputError("prompt B is missing; give two prompts A B (or prompt files with --sets).")
    for flag, value in (("--group-column", args.group_column), ("--groups", args.groups), ("--paired", args.paired)):
        if value is not None and not args.sets:
            raise InputError(f"{flag} applies to prompt sets; add --sets and a prompt file.")
    for flag, value in (("--groups", args.groups), ("--paired", args.paired)):
        if value is not None and args.group_column is None:
            raise InputError(f"{flag} needs --group-column FIELD (the field that says which set a prompt belongs to).")
    if args.sets:
        _group_names(args)
    options.check_site_options(args)
    if args.sets and (args.image or args.target is not None):
        raise InputError("--image and --target are the inputs of two prompts; with --sets each record names its own "
                         "(JSONL fields or columns image, target), so drop them.")
    drawn = not (args.sets or args.metrics_only)
    for flag, given in (("--cube-out", args.cube_out is not None), ("--no-cube", args.no_cube), ("--html", args.html)):
        if given and not drawn:
            reason = "--sets compares metric tables" if args.sets else "--metrics-only skips it"
            raise InputError(f"{flag} needs the difference cube of two prompts, and {reason}; drop {flag}.")
    if args.cube_out is not None and args.no_cube:
        raise InputError("--cube-out and --no-cube contradict each other; drop one of them.")
    _, layers, heads = options.grid_style(args)  # drawing options checked before the model loads
    options.check_model_indices(args.model, layers, heads)
    paths = output_paths(args)
    for key in ("deltas", "heads", "layers"):
        if key in paths:
            table_format(paths[key])
    if args.resume and not args.sets:
        raise InputError("--resume continues an interrupted --sets run; drop it, or add --sets and two prompt files.")
    run_folder = paths.pop("run", None)
    with claim_outputs(paths.values(), force=args.force or args.resume):
        lines, payload = _run_sets(args, metrics, paths, run_folder) if args.sets else _run_pair(args, metrics, paths)
    emit(args, lines, payload)
    return 0
