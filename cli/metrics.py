"""`llm-heatmap metrics`: one prompt -> per-head metric table (CSV, Parquet, JSON or Markdown)."""

from __future__ import annotations

from pathlib import Path

from llm_heatmap.errors import InputError

from . import options, sites
from .run import emit, load

EXAMPLE = ('example: llm-heatmap metrics "the sky is blue" --model minilm-l6 --out sky.metrics.csv '
           "--metric norm_entropy --metric sink_score")


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "metrics", run, summary="per-head metrics of one prompt as a table",
        description="Capture PROMPT layer by layer (streaming, one layer in memory) and write one row per "
        "layer x head: entropy, sink, positional, induction scores and pattern class. The table format follows "
        "the --out extension (.csv, .parquet, .json, .md); without --out it is printed as Markdown.", example=EXAMPLE)
    options.add_prompt_options(parser)
    options.add_site_options(parser)
    options.add_model_options(parser)
    parser.add_argument("--out", type=Path, help="output folder (writes NAME.metrics.csv; --name picks NAME), or a "
                        "table file whose extension (.csv, .parquet, .json, .md) picks the format; without it the "
                        "table is printed")
    parser.add_argument("--name", help="base name of the table in --out (default: from the model and prompt)")
    parser.add_argument("--induction-probe", type=int, metavar="N", default=0,
                        help="also score every head on BOS + N random tokens repeated twice (probe_* columns)")
    options.add_retrieval_probe_option(parser)
    options.add_metric_option(parser)
    options.add_attention_output_option(parser)
    options.add_run_options(parser)


def run(args) -> int:
    from llm_heatmap.models.files import claim_outputs
    from llm_heatmap.analyses.runs.table_files import table_format

    options.check_site_options(args)
    prompt = options.read_prompt(args, optional=bool(args.image or args.audio))
    metrics = options.selected_metrics(args)
    if args.induction_probe < 0:
        raise InputError(f"--induction-probe {args.induction_probe} must be a number of random tokens of at least 0 "
                         "(0: no probe).")
    args.retrieval_probe = options.needle_lengths(args.retrieval_probe)
    args.out_given = args.out  # a model with several sites writes one table per site into this folder
    per_site = bool(args.site or args.image or args.audio or args.target is not None)
    if per_site:
        check_per_site(args, metrics)
    if args.out is not None and not per_site:
        args.out = options.table_or_folder(args.out, options.base_name(args, prompt), "metrics")
        table_format(args.out)
    if per_site and args.site and sites.planned_before_loading(args):  # one site named: its tables claimed first
        claimed = site_table_paths(args, sites.runs(args, prompt, options.base_name(args, prompt)), [args.site])
        with claim_outputs(claimed.values(), force=args.force):
            return _run(args, prompt, metrics, claimed)
    with claim_outputs([args.out] if args.out is not None and not per_site else [], force=args.force):
        return _run(args, prompt, metrics)


def site_table_paths(args, planned, chosen: list[str]) -> dict:
    """(run name, site) -> RUN.SITE.metrics.csv in --out for each planned forward pass (`sites.runs`) and site;
    {} without --out."""
    if args.out_given is None:
        return {}
    return {(run_name, site): args.out_given / f"{run_name}.{site}.metrics.csv" for run_name, _ in planned for site in chosen}


def _run(args, prompt: str, metrics, claimed: dict | None = None) -> int:
    import torch

    from llm_heatmap.analyses.heads.measure import stream_head_metrics
    from llm_heatmap.analyses.heads.digest import digest_lines
    from llm_heatmap.analyses.heads.induction_probe import induction_probe_scores
    from llm_heatmap.analyses.runs.prompts import check_length
    from llm_heatmap.analyses.runs.table_files import to_markdown, write_table

    model, tokenizer, spec = load(args)
    from llm_heatmap.models import site_specs


    specs = site_specs(model)
    if sites.wants_sites(args, specs):
        return _run_sites(args, model, tokenizer, specs, prompt, metrics, claimed)
    tokens = check_length(tokenizer, spec, prompt, chat=args.chat)
    with torch.no_grad():
        table = stream_head_metrics(model, tokenizer, prompt, spec=spec, chat=args.chat,
                                    compute_output=options.compute_output(args))
    digest = digest_lines(table, spec)
    if args.induction_probe:
        probe = induction_probe_scores(model, tokenizer, spec=spec, length=args.induction_probe)
        table = table.merge(probe, on=["layer", "head", "kv_group"])
        digest.append(f"strongest induction heads on {args.induction_probe} repeated random tokens: "
                      + ", ".join(f"L{r.layer}H{r.head} ({r.probe_induction_score:.2f})"
                                  for r in probe.nlargest(3, "probe_induction_score").itertuples()))
    if args.retrieval_probe:
        from llm_heatmap.analyses.heads.retrieval_probe import retrieval_head_scores

        retrieval = retrieval_head_scores(model, tokenizer, spec=spec, context_lengths=args.retrieval_probe)
        table = table.merge(retrieval.heads, on=["layer", "head", "kv_group"])
        chosen = retrieval.retrieval_heads()
        top = ", ".join(f"L{r.layer}H{r.head} ({r.probe_retrieval_score:.2f})" for r in chosen.head(3).itertuples())
        digest.append(f"retrieval heads on {len(retrieval.runs)} needle prompts ({int(retrieval.runs['recalled'].sum())} "
                      f"recalled): {len(chosen)} of {len(table)} score above 0.1" + (f", strongest {top}" if top else ""))
    if metrics is not None:
        probe_columns = [c for c in table.columns if c.startswith("probe_") and c not in metrics]
        table = table[["layer", "head", "kv_group", *metrics, *probe_columns]]
    if args.out is not None:
        write_table(table, args.out, force=args.force)
    lines = [f"{args.model}: {spec.summary}", f"{tokens} tokens, {len(table)} heads"
             + (f"; wrote {args.out}" if args.out else ""), *digest]
    if args.out is None and not args.json:
        lines += ["", to_markdown(table).rstrip("\n")]
    payload = {"model": str(args.model), "spec": spec.summary, "tokens": tokens, "heads": len(table),
               "out": None if args.out is None else str(args.out), "digest": digest}
    if args.out is None:
        payload["table"] = table.to_dict(orient="records")
    emit(args, lines, payload)
    return 0


def _run_sites(args, model, tokenizer, specs: dict, prompt, metrics, claimed: dict | None) -> int:
    """One table per site (and per image): NAME.SITE.metrics.csv in --out, or printed one after another
    (`claimed`: the paths of the one site of --site, already claimed)."""
    from llm_heatmap.analyses.heads.measure import site_metrics
    from llm_heatmap.analyses.runs.table_files import to_markdown, write_table
    from llm_heatmap.models.files import claim_outputs


    check_per_site(args, metrics)
    chosen = sites.chosen_sites(args, model, specs)
    out = args.out_given
    planned = sites.runs(args, prompt, options.base_name(args, prompt), one_pass=sites.one_pass(model))
    paths = site_table_paths(args, planned, chosen) if claimed is None else claimed
    lines, payload = [f"{args.model}: " + "; ".join(f"{site} {specs[site].summary}" for site in chosen)], {}
    with claim_outputs(paths.values() if claimed is None else [], force=args.force):
        for run_name, image in planned:
            for site, cube in sites.capture_cubes(args, model, tokenizer, specs, chosen, prompt, image).items():
                table = site_metrics(cube)
                key = f"{run_name}.{site}"
                if out is not None:
                    write_table(table, paths[(run_name, site)], force=args.force)
                    lines.append(f"{site}: {len(table)} heads; wrote {paths[(run_name, site)]}")
                    payload[key] = str(paths[(run_name, site)])
                else:
                    lines += [f"{site}: {len(table)} heads", "", to_markdown(table).rstrip("\n"), ""]
                    payload[key] = table.to_dict(orient="records")
    emit(args, lines, {"sites": payload})
    return 0


def check_per_site(args, metrics) -> None:
    """What a run with one table per site cannot take."""

    sites.check_single_site_flags(args)
    if args.induction_probe or metrics is not None:
        raise InputError("--induction-probe and --metric work on the one site of a text model; drop them with "
                         "--site, --image, --target or a model with several sites.")
    out = args.out_given
    if out is not None and out.suffix and not out.is_dir():
        raise InputError(f"--out {out} names one table, but each site gets its own; give a folder.")
