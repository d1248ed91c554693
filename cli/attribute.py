"""`llm-heatmap attribute`: direct logit attribution of one prompt (a table and the all-heads map)."""

from __future__ import annotations

from pathlib import Path

from . import options
from .run import Steps, emit, load

EXAMPLE = """examples:
  llm-heatmap attribute "The Eiffel Tower is located in the city of"                # the predicted token
  llm-heatmap attribute "The Eiffel Tower is located in the city of" --target " Rome" --position -1"""


def register(subparsers) -> None:
    parser = options.add_command(
        subparsers, "attribute", run, summary="each head's and MLP's direct share of one logit",
        description="Run PROMPT once and split the logit of TARGET (default: the predicted next token) at POSITION "
        "into what every head, MLP, the embeddings and the biases write directly into it, through the final norm "
        "with its scale frozen at the observed value; the shares add up to the logit. Writes NAME.dla.csv (one row "
        "per component) and NAME.dla.png (heads coloured by share). Decoders with an LM head only.", example=EXAMPLE)
    options.add_prompt_options(parser)
    options.add_model_options(parser)
    parser.add_argument("--position", type=int, default=-1, help="the row whose logit is split (default -1, the last)")
    parser.add_argument("--target", help="the target token, as text of one token (e.g. ' Paris') or as a token id "
                        "(default: the token the model predicts)")
    parser.add_argument("--top", type=int, default=10, help="components listed in the summary (default 10)")
    options.add_output_options(parser)
    options.add_json_option(parser)


def run(args) -> int:
    from llm_heatmap.models.files import claim_outputs

    prompt = options.read_prompt(args)
    name = f"{options.base_name(args, prompt)}.dla"
    paths = [args.out / f"{name}.csv", args.out / f"{name}.png"]
    with claim_outputs(paths, force=args.force):
        return _run(args, prompt, *paths)


def _run(args, prompt: str, table_path: Path, map_path: Path) -> int:
    from llm_heatmap.analyses.importance.attribution import logit_attribution
    from llm_heatmap.models.files import atomic_output
    from llm_heatmap.analyses.runs.table_files import write_table
    from llm_heatmap.viz import plot_metric_map, save_figure

    step = Steps(args, ["loading", "attributing", "drawing"])
    step("loading")
    model, tokenizer, spec = load(args)
    step("attributing")
    target = int(args.target) if args.target is not None and args.target.lstrip("-").isdigit() else args.target
    result = logit_attribution(model, tokenizer, prompt, position=args.position, target=target, spec=spec,
                               chat=args.chat)
    table = result.table()
    step("drawing")
    title = (f"direct share of the logit of {result.target!r} after {result.tokens[result.position]!r} "
             f"(position {result.position}; logit {result.logit:.3f})")
    write_table(table, table_path, force=args.force)
    with atomic_output(map_path, force=args.force) as temp:
        save_figure(plot_metric_map(result.head_table(), "share", center=0.0, title=title), temp)
    step.close()
    top = table.reindex(table.share.abs().sort_values(ascending=False).index).head(max(args.top, 0))
    listed = [_label(row) + f" {row.share:+.3f}" for row in top.itertuples()]
    lines = [spec.summary, f"target {result.target!r} at position {result.position}: logit {result.logit:.4f}, "
             f"sum of shares {result.reconstructed_logit:.4f}", "largest shares: " + ", ".join(listed),
             f"wrote {table_path} and {map_path}"]
    emit(args, lines, {"spec": spec.summary, "target": result.target, "target_id": result.target_id,
                       "position": result.position, "logit": result.logit, "sum_of_shares": result.reconstructed_logit,
                       "largest": listed, "files": [str(table_path), str(map_path)]})
    return 0


def _label(row) -> str:
    if row.component == "head":
        return f"L{row.layer}H{row.head}"
    if row.component in ("mlp", "attention bias"):
        return f"{row.component} L{row.layer}"
    return row.component
