"""Simple vs complex prompts as a measured result: the seed's experiments plus 8 length-matched pairs.

    python -m experiments.prompt_sets [--model minilm-l6] [--out prompt_sets/]

1. The 16 prompts of `data/length_matched_pairs.jsonl` (8 simple/complex pairs with equal token
   counts on SmolLM2) go through `run_batch` (streaming capture, resumable: a rerun reuses them).
2. `compare_sets` with the pairs: per-head and per-layer mean delta (complex - simple) of every
   metric, a bootstrap 95% interval over pairs, a sign-flip permutation p-value and a BH q-value.
3. The seed's Experiment 1 and 2 prompts (`data/seed_experiments.jsonl`): per-head metric deltas
   and, when the two prompts have the same token count, the difference cube.

Writes into OUT: `batch/` (one row per prompt x head), `sets.heads.csv`, `sets.layers.csv` and
`.md`, `seed_exp{1,2}.deltas.csv`, `seed_exp{n}.difference.safetensors` where it exists, and
`reading.md`, the printed summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from llm_heatmap.analyses.runs.batch import run_batch
from llm_heatmap.analyses.compare import compare_cubes, compare_sets
from llm_heatmap.models.files import atomic_output
from llm_heatmap.analyses.runs.prompts import check_length, read_prompts
from llm_heatmap.analyses.runs.table_files import write_table
from llm_heatmap.errors import InputError

from llm_heatmap.cli import options
from llm_heatmap.cli.errors import cli_message
from llm_heatmap.cli.run import load, progress_off

DATA = Path(__file__).resolve().parent / "data"  # the prompt sets the experiments read
KEY_METRICS = ("norm_entropy", "sink_score_no_q0", "prev_token_mass", "mean_distance", "special_mass")


def data_path(name: str) -> Path:
    return DATA / name


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(simple id, complex id) for every `pair` number of a JSONL file with `group` and `pair` fields."""
    members: dict[int, dict[str, str]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            members.setdefault(record["pair"], {})[record["group"]] = record["id"]
    return [(m["simple"], m["complex"]) for _, m in sorted(members.items())]


def set_reading(result, pairs: int, permutations: int, alpha: float = 0.05) -> list[str]:
    heads, layers = result.heads, result.layers
    smallest = 2 / 2 ** pairs if 2 ** pairs <= permutations else 1 / (1 + permutations)
    lines = [f"- with {pairs} pairs the smallest attainable two-sided p-value is {smallest:.3g}",
             f"- head x metric deltas with q < {alpha} (BH within each metric): "
             f"{int((heads['q_value'] < alpha).sum())} of {len(heads)}; uncorrected p < {alpha}: "
             f"{int((heads['p_value'] < alpha).sum())} (about {alpha * len(heads):.0f} expected by chance)"]
    for metric in [m for m in KEY_METRICS if m in set(layers["metric"])]:
        part = layers[layers["metric"] == metric]
        excluding = part[(part["ci_low"] > 0) | (part["ci_high"] < 0)]
        best = part.loc[part["p_value"].idxmin()]
        lines.append(f"- {metric}: {len(excluding)} of {len(part)} layers have a 95% interval excluding 0; "
                     f"strongest L{int(best.layer)}: delta {best.delta:+.4f} [{best.ci_low:+.4f}, {best.ci_high:+.4f}], "
                     f"p = {best.p_value:.3g}, q = {best.q_value:.3g}")
    return lines


def seed_reading(name, comparison, tokens) -> list[str]:
    deltas = comparison.deltas
    lines = [f"- {name}: {tokens[0]} vs {tokens[1]} tokens; "
             + ("difference cube written" if comparison.difference is not None else "token counts differ: metrics only")]
    for metric in [m for m in KEY_METRICS if m in set(deltas["metric"])]:
        part = deltas[deltas["metric"] == metric]
        lines.append(f"  - {metric}: mean delta {part['delta'].mean():+.4f}, mean |delta| {part['delta'].abs().mean():.4f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.prompt_sets",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model_options(parser)
    parser.add_argument("--out", type=Path, default=Path("prompt_sets"), help="output folder (default ./prompt_sets/)")
    parser.add_argument("--pairs", type=Path, default=None, help="JSONL with id, group (simple/complex), pair, prompt")
    parser.add_argument("--resamples", type=int, default=2000)
    options.add_permutation_options(parser, default=2000, help="sign-flip permutations")
    options.add_force_option(parser, help="recompute and overwrite everything in OUT")
    options.add_quiet_option(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InputError as error:
        print(f"prompt_sets: {cli_message(str(error))}", file=sys.stderr)
        return 2


def run(args) -> int:
    pairs_file = args.pairs or data_path("length_matched_pairs.jsonl")
    prompts = read_prompts(pairs_file)
    pairs = read_pairs(pairs_file)
    model, tokenizer, spec = load(args)
    out = args.out
    with torch.no_grad():
        batch = run_batch(model, tokenizer, prompts, out / "batch", spec=spec, source=str(args.model),
                          resume=not args.force, force=args.force, quiet=progress_off(args))
    table = batch.table
    result = compare_sets(table[table["group"] == "simple"], table[table["group"] == "complex"], pairs=pairs,
                          n_resamples=args.resamples, n_permutations=args.permutations, seed=args.seed)
    write_table(result.heads, out / "sets.heads.csv", force=True)
    write_table(result.layers, out / "sets.layers.csv", force=True)
    key_layers = result.layers[result.layers["metric"].isin(KEY_METRICS)]
    write_table(key_layers, out / "sets.layers.md", force=True)
    counts = table.drop_duplicates("prompt_id")["n_tokens"].tolist()
    reading = [f"# Simple vs complex prompts on {args.model} ({spec.summary})", "",
               f"## {len(pairs)} length-matched pairs (paired: complex - simple; token counts {min(counts)}-{max(counts)})",
               *set_reading(result, len(pairs), args.permutations), "", "## The seed's experiments (one prompt per side: a description, not a test)"]

    seed = read_prompts(data_path("seed_experiments.jsonl"))
    for number in (1, 2):
        simple = next(p for p in seed if p.id == f"exp{number}-simple")
        hard = next(p for p in seed if p.id == f"exp{number}-complex")
        tokens = [check_length(tokenizer, spec, p.text) for p in (simple, hard)]
        with torch.no_grad():
            cubes = [capture_prompt_cube(model, tokenizer, spec, p.text, str(args.model)) for p in (simple, hard)]
        comparison = compare_cubes(*cubes, metrics_only=tokens[0] != tokens[1])
        write_table(comparison.deltas, out / f"seed_exp{number}.deltas.csv", force=True)
        if comparison.difference is not None:
            with atomic_output(out / f"seed_exp{number}.difference.safetensors", force=True) as temp:
                comparison.difference.save(temp)
        reading += seed_reading(f"Experiment {number}: '{simple.text}' -> '{hard.text}'", comparison, tokens)
    reading += ["", "A single pair's deltas mix the effect of difficulty with that of the particular words; only the",
                "set statistics above say whether a difference is larger than what relabelling the prompts gives."]
    text = "\n".join(reading) + "\n"
    with atomic_output(out / "reading.md", force=True) as temp:
        temp.write_text(text)
    print(text, end="")
    return 0


def capture_prompt_cube(model, tokenizer, spec, prompt, source):
    from llm_heatmap.probes import capture_prompt

    return capture_prompt(model, tokenizer, prompt, spec=spec, source=source)


if __name__ == "__main__":
    sys.exit(main())
