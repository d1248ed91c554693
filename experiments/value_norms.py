"""Weights vs what the heads write, on the offline models: how many sink heads are no-op sinks, plus the
figures of the README (a norm-weighted grid beside the weights, and one layer's query-key maps).

    python -m experiments.value_norms --out docs/experiments

For every prompt of the shipped example sets (`experiments/data/*.jsonl`, 22 prompts) and each offline
model, `head_metrics` with value norms gives per head the weight on the first token
(`sink_score_no_q0`), the first token's share of what the head writes (`norm_sink_score_no_q0`) and
`noop_sink` (a sink by weight, < 0.3 of what it writes). Written into OUT/:

- `value_norms.heads.csv`: one row per model x prompt x head with those columns.
- `value_norms.md` / `.csv`: one row per model: heads, sink heads and no-op sinks per prompt (mean and
  range over prompts), the share of sink heads that are no-op, and the mean weight and mean written
  share of the first token over the sink heads.
- `value_norms.MODEL.{weights,norms}.png`: the grid of one prompt, weights and norm-weighted (every
  layer of MiniLM, every fourth of SmolLM2).
- `value_norms.smollm2-135m.qk-L{layer}.png`: the query-key maps of one layer (every KV group).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llm_heatmap.cli.errors import cli_message

PROMPT = "The cat sat on the warm mat because the sun was shining on it."
QK_LAYER = 5


def prompts() -> list[str]:
    from llm_heatmap.analyses.runs.prompts import read_prompts

    data = Path(__file__).resolve().parent / "data"
    texts = []
    for name in ("seed_experiments.jsonl", "length_matched_pairs.jsonl"):
        texts += [p.text for p in read_prompts(data / name)]
    return list(dict.fromkeys(texts))


def measure(models: list[str]) -> "pd.DataFrame":
    import pandas as pd
    import torch

    from llm_heatmap.analyses import head_metrics
    from llm_heatmap.models import load_model
    from llm_heatmap.probes import capture_prompt

    frames = []
    for name in models:
        model, tokenizer, spec = load_model(name)
        for index, text in enumerate(prompts()):
            with torch.no_grad():
                table = head_metrics(capture_prompt(model, tokenizer, text, spec=spec, value_norms=True))
            table.insert(0, "prompt_id", index)
            table.insert(0, "model", name)
            frames.append(table)
    columns = ["model", "prompt_id", "layer", "head", "kv_group", "sink_score_no_q0", "norm_sink_score_no_q0",
               "sink_head", "noop_sink", "output_norm"]
    return pd.concat(frames, ignore_index=True)[columns]


def summarize(heads) -> "pd.DataFrame":
    per_prompt = heads.groupby(["model", "prompt_id"]).agg(heads=("head", "size"), sinks=("sink_head", "sum"),
                                                           noop=("noop_sink", "sum")).reset_index()
    sinks = heads[heads.sink_head]
    rows = []
    for model, part in per_prompt.groupby("model", sort=False):
        mine = sinks[sinks.model == model]
        rows.append({
            "model": model, "prompts": len(part), "heads": int(part.heads.iloc[0]),
            "sink heads per prompt": f"{part.sinks.mean():.1f} ({part.sinks.min()}-{part.sinks.max()})",
            "no-op sinks per prompt": f"{part.noop.mean():.1f} ({part.noop.min()}-{part.noop.max()})",
            "no-op share of sink heads": f"{part.noop.sum() / max(1, part.sinks.sum()):.0%}",
            "weight on first token (sink heads)": f"{mine.sink_score_no_q0.mean():.2f}",
            "share written from it (sink heads)": f"{mine.norm_sink_score_no_q0.mean():.2f}",
        })
    import pandas as pd

    return pd.DataFrame(rows)


def figures(out: Path) -> list[Path]:
    import torch

    from llm_heatmap.analyses.maps.qk_maps import qk_map
    from llm_heatmap.models import load_model
    from llm_heatmap.probes import capture_prompt
    from llm_heatmap.viz import plot_qk_maps, save_figure, save_grid

    paths = []
    for name, every in (("minilm-l6", 1), ("smollm2-135m", 4)):
        model, tokenizer, spec = load_model(name)
        with torch.no_grad():
            cube = capture_prompt(model, tokenizer, PROMPT, spec=spec, source=name, value_norms=True,
                                  queries_and_keys=True)
        for weighting in ("weights", "norms"):
            path = out / f"value_norms.{name}.{weighting}.png"
            save_grid(cube, path, layers=range(0, spec.num_layers, every), weighting=weighting, per_head_range=True)
            paths.append(path)
    maps = [qk_map(cube, QK_LAYER, group=group) for group in range(spec.num_kv_heads)]
    path = out / f"value_norms.smollm2-135m.qk-L{QK_LAYER}.png"
    save_figure(plot_qk_maps(maps, columns=len(maps)), path)
    return paths + [path]


def main(argv: list[str] | None = None) -> int:
    import sys

    from llm_heatmap.errors import InputError

    parser = argparse.ArgumentParser(prog="python -m experiments.value_norms", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"), help="output folder (default docs/experiments)")
    parser.add_argument("--model", action="append", help="offline model (repeatable; default both)")
    args = parser.parse_args(argv)
    try:
        from llm_heatmap.analyses.runs.table_files import to_markdown, write_table

        args.out.mkdir(parents=True, exist_ok=True)
        heads = measure(args.model or ["smollm2-135m", "minilm-l6"])
        summary = summarize(heads)
        write_table(heads, args.out / "value_norms.heads.csv", force=True)
        write_table(summary, args.out / "value_norms.csv", force=True)
        (args.out / "value_norms.md").write_text(to_markdown(summary))
        written = figures(args.out)
    except InputError as error:
        print(f"value_norms: {cli_message(str(error))}", file=sys.stderr)
        return 2
    print(to_markdown(summary) + "wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
