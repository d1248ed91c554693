"""`llm-heatmap metrics`: one prompt -> per-head metric table (CSV, Parquet, JSON or Markdown)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..batch import stream_head_metrics
from ..digest import digest_lines
from ..files import check_writable
from ..induction_probe import induction_probe_scores
from ..prompts import check_length
from ..tables import table_format, to_markdown, write_table
from . import analysis_common, common

EXAMPLE = ('example: llm-heatmap metrics "the sky is blue" --model minilm-l6 --out sky.metrics.csv '
           "--metric norm_entropy --metric sink_score")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "metrics", help="per-head metrics of one prompt as a table",
        description="Capture PROMPT layer by layer (streaming, one layer in memory) and write one row per "
        "layer x head: entropy, sink, positional, induction scores and pattern class. The table format follows "
        f"the --out extension (.csv, .parquet, .json, .md); without --out it is printed as Markdown.\n\n{EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_prompt_options(parser)
    common.add_model_options(parser)
    parser.add_argument("--out", type=Path, help="table file; its extension picks the format")
    parser.add_argument("--induction-probe", type=int, metavar="N", default=0,
                        help="also score every head on BOS + N random tokens repeated twice (probe_* columns)")
    analysis_common.add_metric_option(parser)
    analysis_common.add_run_options(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    prompt = common.read_prompt(args)
    metrics = analysis_common.selected_metrics(args)
    if args.out is not None:
        table_format(args.out)
        check_writable(args.out, force=args.force)
    model, tokenizer, spec = analysis_common.load(args)
    tokens = check_length(tokenizer, spec, prompt, chat=args.chat)
    with torch.no_grad():
        table = stream_head_metrics(model, tokenizer, prompt, spec=spec, chat=args.chat)
    digest = digest_lines(table, spec)
    if args.induction_probe:
        probe = induction_probe_scores(model, tokenizer, spec=spec, length=args.induction_probe)
        table = table.merge(probe, on=["layer", "head", "kv_group"])
        digest.append(f"strongest induction heads on {args.induction_probe} repeated random tokens: "
                      + ", ".join(f"L{r.layer}H{r.head} ({r.probe_induction_score:.2f})"
                                  for r in probe.nlargest(3, "probe_induction_score").itertuples()))
    if metrics is not None:
        probe_columns = [c for c in table.columns if c.startswith("probe_")]
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
    analysis_common.emit(args, lines, payload)
    return 0
