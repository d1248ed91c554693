"""The seed README's Experiments 1 and 2, reproduced on the offline models, plus its MHA/GQA claim as a measurement.

    python -m experiments.seed_experiments --out docs/experiments

For each model (`minilm-l6` standing in for bert-base-uncased, `smollm2-135m` for Qwen3-0.6B) and
each experiment (the prompt pairs of `data/seed_experiments.jsonl`, A = simple, B = complex, plus
`CONTROL`, two simple prompts of equal length, A = simple-a, B = simple-b) it writes into `OUT/MODEL/`
(STEM = exp1, exp2, control; LABEL = the experiment's two labels):

- `STEM.LABEL.grid.png`: all heads of each prompt (`viz.save_grid`).
- when A and B have the same token count: `STEM.difference.grid.png` (pattern B - A, all heads,
  diverging colours on a symmetric range) and `STEM.comparison.png` (the head whose pattern
  changes most: B, A and B - A with token labels). When the counts differ there is no
  position-by-position difference: the experiment compares metrics only (`compare_cubes(...,
  metrics_only=True)`) and its summary row says so (`difference` = False).
- `STEM.metrics.LABEL.csv`: `head_metrics` of each prompt.
- `STEM.deltas.csv` (every metric) and `.md` (`KEY_METRICS`): one row per head, value B - A.
- `STEM.layers.csv`: per layer and metric, the means over the layer's heads of A, B and B - A, and
  the mean |B - A|; `STEM.layers.md`: the per-layer mean deltas of `KEY_METRICS`.
- `STEM.delta_norm_entropy.png`: the layer x head map of the norm_entropy delta.
- `kv_similarity.csv`: `kv_group_similarity` of each distinct prompt (every layer, measure and
  first-token handling; SmolLM2 grouped by its real KV heads, MiniLM by pseudo-groups of
  `PSEUDO_GROUP_SIZE` consecutive heads); `kv_similarity.layers.csv`/`.md`: the per-layer
  statistic pooled over the prompts (`kv_tables`); `kv_similarity.js.{kept,dropped}.png`.

and into `OUT/`: `experiments.csv`/`.md` (one row per model x experiment: token counts, whether a
difference cube exists, mean and mean-absolute deltas of `KEY_METRICS`), `kv_summary.csv`/`.md`
(one row per model x measure x first-token handling, `stats.group_gap` over the layers) and `summary.json`. CSV files
hold floats to `CSV_DIGITS` significant digits.

Pooled KV statistic of one layer: S_p is the head x head similarity of prompt p
(`kv_similarity.layer_similarity`) and S = mean_p S_p. within, across and gap are those of S
(equal to the means over prompts of each prompt's within/across/gap, the pairs being the same),
p_value is `kv_similarity.group_gap`'s permutation p-value on S (head-to-group assignment
shuffled, group sizes kept). Model level: gap = mean over layers of the pooled gaps; its p-value
shuffles each layer's assignment independently, `(1 + #{perm: mean gap >= observed}) / (1 + n)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llm_heatmap.analyses.compare import compare_cubes, metric_columns
from llm_heatmap.models.files import atomic_output
from llm_heatmap.analyses.bounds import PSEUDO_GROUP_SIZE
from llm_heatmap.analyses.similarity.kv_similarity import (FIRST_TOKEN, MEASURES, group_gap, head_groups, kv_group_similarity,
                                                layer_similarity)
from llm_heatmap.analyses.heads.metrics import head_metrics
from llm_heatmap.analyses.runs.prompts import read_prompts
from llm_heatmap.analyses.runs.table_files import write_table
from llm_heatmap.errors import InputError

from llm_heatmap.cli import options
from llm_heatmap.cli.errors import cli_message

MODELS = ("minilm-l6", "smollm2-135m")
STANDS_IN_FOR = {"minilm-l6": "bert-base-uncased", "smollm2-135m": "Qwen3-0.6B"}
KEY_METRICS = ("norm_entropy", "effective_keys_frac", "max_weight", "sink_score_no_q0", "prev_token_mass",
               "distance_ratio", "special_mass")
N_PERMUTATIONS = 2000
CSV_DIGITS = 6


@dataclass
class Experiment:
    """One prompt pair: A (the baseline, `labels[0]`) and B (`labels[1]`); deltas are B - A.

    `name` is the file stem (`exp1`), `title` names it in figures (`Exp. 1`).
    """

    name: str
    title: str
    a: str
    b: str
    labels: tuple[str, str] = ("simple", "complex")


# Two simple prompts of equal token count on both models (10 WordPiece / 8 SmolLM2 tokens): how much one
# prompt pair's metrics differ when nothing about difficulty changes.
CONTROL = Experiment("control", "Control", "Tell me a very simple short story.", "Describe a sunny day at the beach.",
                     labels=("simple-a", "simple-b"))


@dataclass
class ExperimentResult:
    model: str
    experiment: Experiment
    n_tokens: tuple[int, int]
    tables: tuple[pd.DataFrame, pd.DataFrame]  # head_metrics of A and B
    deltas: pd.DataFrame  # one row per head, one column per metric: B - A
    layers: pd.DataFrame  # layer, metric, mean_a, mean_b, delta, mean_abs_delta
    difference: object | None  # AttentionCube B - A, or None when the token counts differ
    cubes: tuple = ()
    files: list[Path] = field(default_factory=list)

    def summary(self) -> dict:
        e = self.experiment
        row = {"model": self.model, "experiment": e.name, "label_a": e.labels[0], "label_b": e.labels[1],
               "prompt_a": e.a, "prompt_b": e.b, "tokens_a": self.n_tokens[0], "tokens_b": self.n_tokens[1],
               "difference": self.difference is not None}
        if self.difference is not None:
            row["max_abs_pattern_diff"] = float(self.difference.pattern.abs().max())
        for metric in KEY_METRICS:
            row[f"{metric}_delta"] = float(self.deltas[metric].mean())
            row[f"{metric}_abs_delta"] = float(self.deltas[metric].abs().mean())
        return row


def seed_prompts() -> list[Experiment]:
    """Experiments 1 and 2 of the seed README, from `experiments/data/seed_experiments.jsonl`."""
    path = Path(__file__).resolve().parent / "data" / "seed_experiments.jsonl"
    prompts = {p.id: p.text for p in read_prompts(path)}
    return [Experiment(f"exp{n}", f"Exp. {n}", prompts[f"exp{n}-simple"], prompts[f"exp{n}-complex"]) for n in (1, 2)]


# ---- one prompt pair ------------------------------------------------------------------------

def wide_deltas(table_a: pd.DataFrame, table_b: pd.DataFrame) -> pd.DataFrame:
    """One row per head (layer, head, kv_group), one column per metric of `table_a`: B - A."""
    metrics = metric_columns(table_a)
    keys = ["layer", "head", "kv_group"]
    a, b = table_a.set_index(keys), table_b.set_index(keys)
    if not a.index.equals(b.index):
        raise InputError("the two metric tables hold different heads; capture both prompts with the same layers and heads.")
    return (b[metrics] - a[metrics]).reset_index()


def layer_summary(table_a: pd.DataFrame, table_b: pd.DataFrame, deltas: pd.DataFrame) -> pd.DataFrame:
    """Per layer x metric: mean over the layer's heads of A, of B, of B - A and of |B - A|."""
    metrics = [m for m in deltas.columns if m not in ("layer", "head", "kv_group")]
    frames = []
    for name, table in (("mean_a", table_a), ("mean_b", table_b), ("delta", deltas), ("mean_abs_delta", deltas.abs())):
        frames.append(table.groupby("layer")[metrics].mean().stack().rename(name))
    out = pd.concat(frames, axis=1).reset_index()
    out.columns = ["layer", "metric", *out.columns[2:]]
    return out.sort_values(["metric", "layer"], kind="stable").reset_index(drop=True)


def run_experiment(model, tokenizer, spec, experiment: Experiment, *, name: str) -> ExperimentResult:
    """Capture A and B, compute their head metrics, the deltas B - A, and the difference cube when possible."""
    from llm_heatmap.probes import capture_prompt

    with torch.no_grad():
        cubes = tuple(capture_prompt(model, tokenizer, p, spec=spec, source=name)
                      for p in (experiment.a, experiment.b))
    counts = (cubes[0].num_keys, cubes[1].num_keys)
    comparison = compare_cubes(*cubes, metrics_only=counts[0] != counts[1], head_metrics=head_metrics)
    tables = (comparison.table_a, comparison.table_b)
    deltas = wide_deltas(*tables)
    return ExperimentResult(model=name, experiment=experiment, n_tokens=counts, tables=tables, deltas=deltas,
                            layers=layer_summary(*tables, deltas), difference=comparison.difference, cubes=cubes)


def write_experiment(result: ExperimentResult, folder: Path, *, figures: bool = True) -> list[Path]:
    """Write the tables (and figures) of one experiment into `folder` (module docstring)."""
    stem, labels = result.experiment.name, result.experiment.labels
    written = [
        write_csv(result.tables[0], folder / f"{stem}.metrics.{labels[0]}.csv"),
        write_csv(result.tables[1], folder / f"{stem}.metrics.{labels[1]}.csv"),
        write_csv(result.deltas, folder / f"{stem}.deltas.csv"),
        write_table(result.deltas[["layer", "head", "kv_group", *KEY_METRICS]], folder / f"{stem}.deltas.md", force=True),
        write_csv(result.layers, folder / f"{stem}.layers.csv"),
        write_table(layer_markdown(result.layers), folder / f"{stem}.layers.md", force=True),
    ]
    if figures:
        written += write_experiment_figures(result, folder)
    result.files = written
    return written


def write_csv(table: pd.DataFrame, path: Path, digits: int = CSV_DIGITS) -> Path:
    """`write_table` to CSV with floats rounded to `digits` significant digits (keeps the committed files small)."""
    table = table.copy()
    for column in table.columns:
        if pd.api.types.is_float_dtype(table[column]):
            table[column] = [float(f"{value:.{digits}g}") for value in table[column]]
    return write_table(table, path, force=True)


def layer_markdown(layers: pd.DataFrame) -> pd.DataFrame:
    """Per layer, the mean delta of each key metric (columns named after the metric)."""
    part = layers[layers["metric"].isin(KEY_METRICS)]
    wide = part.pivot(index="layer", columns="metric", values="delta")[list(KEY_METRICS)].reset_index()
    wide.columns.name = None
    return wide


def write_experiment_figures(result: ExperimentResult, folder: Path) -> list[Path]:
    # viz (matplotlib) is imported only where figures are drawn, so --no-figures runs without it.
    from llm_heatmap.viz import plot_comparison, plot_metric_map, save_figure, save_grid

    experiment = result.experiment
    stem, (label_a, label_b) = experiment.name, experiment.labels
    written = []
    for label, cube in zip(experiment.labels, result.cubes):
        path = folder / f"{stem}.{label}.grid.png"
        save_grid(cube, path, cell_px=_cell_px(cube), title=f"{result.model} · {experiment.title}, {label} prompt")
        written.append(path)
    if result.difference is not None:
        diff = result.difference
        path = folder / f"{stem}.difference.grid.png"
        save_grid(diff, path, cell_px=_cell_px(diff),
                  title=f"{result.model} · {experiment.title}: {label_b} − {label_a}")
        written.append(path)
        layer, head = most_changed_head(diff)
        fig = plot_comparison(result.cubes[0], result.cubes[1], layer, head, labels=(label_a, label_b))
        written.append(save_figure(fig, folder / f"{stem}.comparison.png"))
    fig = plot_metric_map(result.deltas, "norm_entropy", center=0.0,
                          title=f"{result.model} · {experiment.title}: norm_entropy {label_b} − {label_a}")
    written.append(save_figure(fig, folder / f"{stem}.delta_norm_entropy.png"))
    return written


def _cell_px(cube) -> int:
    """Token cell size that keeps a grid of this cube near 1800 px on its long side (at most 12 px)."""
    long_side = max(cube.num_layers * cube.num_queries, cube.num_heads * cube.num_keys)
    return int(np.clip(1800 // max(long_side, 1), 2, 12))


def most_changed_head(difference) -> tuple[int, int]:
    """(layer, head) of the head whose pattern changes most: largest mean |B - A| over attendable cells."""
    mask = difference.attendable()[:, None]
    change = (difference.pattern.abs() * mask).sum((-1, -2)) / mask.sum((-1, -2)).clamp(min=1)
    index = int(change.flatten().argmax())
    return difference.layers[index // difference.num_heads], difference.heads[index % difference.num_heads]


# ---- KV groups ------------------------------------------------------------------------------

def similarity_stack(cubes, measure: str, first_token: str) -> torch.Tensor:
    """`"p l h h"`: each prompt's head x head similarity per layer (`kv_similarity.layer_similarity`)."""
    out = []
    for cube in cubes:
        attendable = cube.attendable() & cube.query_mask.bool()[None, :, None]
        drop = int(cube.key_mask.bool().nonzero()[0]) if first_token == "dropped" else None
        out.append(torch.stack([layer_similarity(cube.pattern[i], attendable[i], measure, drop)
                                for i in range(cube.num_layers)]))
    return torch.stack(out)


def _across(result: dict) -> dict:
    """A `group_gap` result in this script's words: "across" groups for "between"."""
    return {"within": result["within"], "across": result["between"], "gap": result["gap"], "p_value": result["p_value"]}


def kv_tables(cubes, prompts, *, pseudo_group_size: int = PSEUDO_GROUP_SIZE, n_permutations: int = N_PERMUTATIONS,
              seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per prompt x layer table, pooled per-layer table, model-level table) for one model's cubes."""
    groups, grouping = head_groups(cubes[0], pseudo_group_size)
    per_prompt = []
    for cube, prompt in zip(cubes, prompts):
        table = kv_group_similarity(cube, pseudo_group_size=pseudo_group_size, n_permutations=n_permutations, seed=seed)
        table.insert(0, "n_tokens", cube.num_keys)
        table.insert(0, "prompt", prompt)
        per_prompt.append(table)
    per_prompt = pd.concat(per_prompt, ignore_index=True).rename(columns={"between": "across"})
    size = per_prompt["group_size"].iloc[0]
    pooled, model_rows = [], []
    for measure in MEASURES:
        for first_token in FIRST_TOKEN:
            mean_similarity = similarity_stack(cubes, measure, first_token).mean(0)  # l h h
            subset = per_prompt[(per_prompt["measure"] == measure) & (per_prompt["first_token"] == first_token)]
            for index, layer in enumerate(cubes[0].layers):
                result = group_gap(mean_similarity[index], groups, n_permutations, seed)
                significant = int((subset.loc[subset["layer"] == layer, "p_value"] < 0.05).sum())
                pooled.append({"layer": layer, "measure": measure, "first_token": first_token, "grouping": grouping,
                               "group_size": size, "within": result["within"], "across": result["between"],
                               "gap": result["gap"], "p_value": result["p_value"],
                               "prompts_p_below_0.05": significant, "n_prompts": len(cubes)})
            model_rows.append({"measure": measure, "first_token": first_token, "grouping": grouping,
                               "group_size": size, **_across(group_gap(mean_similarity, groups, n_permutations, seed)),
                               "n_permutations": n_permutations})
    pooled = pd.DataFrame.from_records(pooled)
    model = pd.DataFrame.from_records(model_rows)
    layer_p = pooled.groupby(["measure", "first_token"], sort=False)
    model["layers_gap_positive"] = layer_p["gap"].apply(lambda g: int((g > 0).sum())).to_numpy()
    model["layers_p_below_0.05"] = layer_p["p_value"].apply(lambda p: int((p < 0.05).sum())).to_numpy()
    model["n_layers"] = cubes[0].num_layers
    return per_prompt, pooled, model


def write_kv(model_name: str, per_prompt, pooled, folder: Path, *, figures: bool = True) -> list[Path]:
    written = [write_csv(per_prompt, folder / "kv_similarity.csv"), write_csv(pooled, folder / "kv_similarity.layers.csv")]
    js = pooled[pooled["measure"] == "js"]
    md = js.pivot(index="layer", columns="first_token", values=["within", "across", "gap", "p_value"])
    md.columns = [f"{value} ({first})" for value, first in md.columns]
    order = [f"{v} ({f})" for f in FIRST_TOKEN for v in ("within", "across", "gap", "p_value")]
    written.append(write_table(md[order].reset_index(), folder / "kv_similarity.layers.md", force=True))
    if figures:
        from llm_heatmap.viz import plot_kv_similarity, save_figure

        real = pooled["grouping"].iloc[0] == "kv"
        for first_token in FIRST_TOKEN:
            part = js[js["first_token"] == first_token]
            size, prompts = int(part["group_size"].iloc[0]), int(part["n_prompts"].iloc[0])
            note = (f"real KV groups of {size} heads" if real else
                    f"MHA: 'KV head' = pseudo-group of {size}")
            fig = plot_kv_similarity(part, title=f"{model_name}: JS similarity, first token {first_token}\n"
                                     f"{note}; {prompts} prompts")
            written.append(save_figure(fig, folder / f"kv_similarity.js.{first_token}.png"))
    return written


# ---- the whole run --------------------------------------------------------------------------

def run(out: Path, *, models=MODELS, experiments=None, loader=None, figures: bool = True,
        n_permutations: int = N_PERMUTATIONS, seed: int = 0, progress=print) -> dict:
    """Run every experiment on every model and write everything into `out` (module docstring).

    `loader(name) -> (model, tokenizer, spec)` defaults to `load_model`. Returns a dict with the
    `ExperimentResult`s, the experiment summary, the pooled KV tables and the model-level KV summary.
    """
    if loader is None:
        from llm_heatmap.models import load_model as loader
    experiments = list(experiments or [*seed_prompts(), CONTROL])
    out = Path(out)
    results, summaries, kv_models, kv_layers = [], [], [], []
    for name in models:
        model, tokenizer, spec = loader(name)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        cubes, prompts = [], []
        for experiment in experiments:
            result = run_experiment(model, tokenizer, spec, experiment, name=name)
            write_experiment(result, folder, figures=figures)
            results.append(result)
            row = {"attention_kind": spec.attention_kind, **result.summary()}
            summaries.append(row)
            for prompt, cube in zip((experiment.a, experiment.b), result.cubes):
                if prompt not in prompts:  # a prompt used twice counts once in the KV statistic
                    cubes.append(cube)
                    prompts.append(prompt)
            if progress:
                progress(f"{name} {experiment.name}: {result.n_tokens[0]} vs {result.n_tokens[1]} tokens, "
                         + ("difference cube" if result.difference is not None else "metrics only (token counts differ)"))
        per_prompt, pooled, model_table = kv_tables(cubes, prompts, n_permutations=n_permutations, seed=seed)
        write_kv(name, per_prompt, pooled, folder, figures=figures)
        model_table.insert(0, "attention_kind", spec.attention_kind)
        model_table.insert(0, "model", name)
        kv_models.append(model_table)
        kv_layers.append(pooled.assign(model=name))
        del model
    summary = pd.DataFrame.from_records(summaries)
    kv_summary = pd.concat(kv_models, ignore_index=True)
    write_csv(summary, out / "experiments.csv")
    md_columns = ["model", "experiment", "tokens_a", "tokens_b", "difference",
                  *[f"{m}_{kind}" for m in KEY_METRICS[:4] for kind in ("delta", "abs_delta")]]
    write_table(summary[md_columns], out / "experiments.md", force=True)
    write_csv(kv_summary, out / "kv_summary.csv")
    write_table(kv_summary.drop(columns=["n_permutations"]), out / "kv_summary.md", force=True)
    with atomic_output(out / "summary.json", force=True) as temp:
        temp.write_text(json.dumps({"experiments": summary.to_dict(orient="records"),
                                    "kv_summary": kv_summary.to_dict(orient="records"),
                                    "stands_in_for": {m: STANDS_IN_FOR.get(m) for m in models},
                                    "n_permutations": n_permutations, "seed": seed}, indent=2) + "\n")
    return {"results": results, "summary": summary, "kv_summary": kv_summary,
            "kv_layers": pd.concat(kv_layers, ignore_index=True)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.seed_experiments",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"), help="output folder (default docs/experiments)")
    parser.add_argument("--model", action="append", help=f"model to run (repeatable; default {' and '.join(MODELS)})")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    options.add_permutation_options(parser, default=N_PERMUTATIONS, help="KV-group permutations")
    args = parser.parse_args(argv)
    try:
        result = run(args.out, models=tuple(args.model or MODELS), figures=not args.no_figures,
                     n_permutations=args.permutations, seed=args.seed)
    except InputError as error:
        print(f"seed_experiments: {cli_message(str(error))}", file=sys.stderr)
        return 2
    columns = ["model", "measure", "first_token", "within", "across", "gap", "p_value"]
    print(result["kv_summary"][columns].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
