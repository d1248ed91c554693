"""Comparisons: two prompts (metric deltas and a difference cube) and two prompt sets (statistics).

Two prompts A and B: `compare_cubes` joins their per-head metric tables on (layer, head) and
reports B - A for every metric; when both prompts have the same number of tokens it also
returns the difference cube, pattern B - A (same shape, values in [-1, 1]).

Two prompt sets A and B, each a table with one row per prompt x head (what `run_batch` writes):
`compare_sets` gives, per head and per layer and for every metric,

- `delta` = mean over B's prompts - mean over A's prompts (a layer's value for one prompt is the
  mean over that layer's heads);
- `ci_low`, `ci_high`: percentile bootstrap interval of `delta` (each set resampled with
  replacement, independently, `n_resamples` times, seeded);
- `p_value`: two-sided permutation p-value of `delta` under shuffled set labels,
  `(1 + #{|delta*| >= |delta|}) / (1 + n_permutations)`; when the number of distinct label
  splits is at most `n_permutations` every split is enumerated and the p-value is exact,
  `#{|delta*| >= |delta|} / #splits`;
- `q_value`: Benjamini-Hochberg adjusted p-value over the heads (or layers) of one metric.

With `pairs` (matched prompts, e.g. the length-matched simple/complex pairs) the statistics are
paired: delta is the mean within-pair difference, the bootstrap resamples pairs, and the
permutation test flips the sign of each pair's difference (`paired_statistics`).

The statistics themselves live in `stats.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from llm_heatmap.analyses.stats import bh_adjust, paired_statistics, set_statistics, unit_means
from llm_heatmap.errors import InputError

KEYS = ["layer", "head"]
# columns that describe a row rather than measure a head
DESCRIPTIVE = {"layer", "head", "kv_group", "prompt_id", "prompt", "group", "n_tokens", "model", "source", "set",
               "vertical_key", "n_rows"}


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The numeric (non-boolean) columns of a head-metric table that are metrics."""
    return [c for c in table.columns if c not in DESCRIPTIVE and pd.api.types.is_numeric_dtype(table[c])
            and not pd.api.types.is_bool_dtype(table[c])]


def select_metrics(table: pd.DataFrame, metrics=None) -> list[str]:
    """`metrics` checked against the table's metric columns (all of them when None)."""
    valid = metric_columns(table)
    if metrics is None:
        return valid
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in metrics if m not in valid]
    if unknown:
        raise InputError(f"metric {', '.join(repr(m) for m in unknown)} does not exist; valid metrics are: {', '.join(valid)}.")
    return metrics


# ---- two prompts ----------------------------------------------------------------------------
def metric_deltas(table_a: pd.DataFrame, table_b: pd.DataFrame, metrics=None) -> pd.DataFrame:
    """Long table, one row per head x metric: layer, head, kv_group, metric, a, b, delta (= b - a).

    Heads are joined on (layer, head); a head missing from either table is an `InputError`.
    """
    metrics = select_metrics(table_a, metrics)
    select_metrics(table_b, metrics)
    a = table_a.set_index(KEYS)
    b = table_b.set_index(KEYS)
    if set(a.index) != set(b.index):
        raise InputError("the two metric tables hold different (layer, head) pairs; capture both prompts with the same layers and heads.")
    b = b.loc[a.index]
    frames = []
    for metric in metrics:
        frame = pd.DataFrame({"metric": metric, "a": a[metric].to_numpy(float), "b": b[metric].to_numpy(float)}, index=a.index)
        frames.append(frame)
    long = pd.concat(frames).reset_index()
    long["delta"] = long["b"] - long["a"]
    if "kv_group" in table_a.columns:
        long.insert(2, "kv_group", a["kv_group"].reindex(pd.MultiIndex.from_frame(long[KEYS])).to_numpy())
    return long


def difference_cube(cube_a, cube_b):
    """An `AttentionCube` whose pattern is B - A (`difference=True`); needs the same layers, heads, queries
    and keys."""
    cube_a, cube_b = cube_a.one_sequence(), cube_b.one_sequence()
    if cube_a.num_keys != cube_b.num_keys or cube_a.num_queries != cube_b.num_queries:
        raise InputError(
            f"prompt A has {cube_a.num_keys} tokens and prompt B has {cube_b.num_keys}, so their patterns cannot be "
            "subtracted; compare prompts of equal token count, or compare metrics only (metrics_only=True)."
        )
    if tuple(cube_a.layers) != tuple(cube_b.layers) or tuple(cube_a.heads) != tuple(cube_b.heads):
        raise InputError("the two cubes hold different layers or heads; capture both prompts with the same layers and heads.")
    tokens = [ta if ta == tb else f"{ta}|{tb}" for ta, tb in zip(cube_a.tokens, cube_b.tokens)]
    if cube_a.weighting != cube_b.weighting or cube_a.difference or cube_b.difference:
        raise InputError("the two cubes must both hold attention weights, or both norm-weighted attention, and neither "
                         "a difference already; capture both prompts the same way.")
    metadata = {"prompt_a": cube_a.prompt, "prompt_b": cube_b.prompt,
                "tokens_a": list(cube_a.tokens), "tokens_b": list(cube_b.tokens)}
    return replace(cube_b, pattern=cube_b.pattern.float() - cube_a.pattern.float(), tokens=tokens,
                   prompt=None, metadata=metadata, difference=True)


@dataclass
class PromptComparison:
    """Result of comparing prompt B with prompt A."""

    table_a: pd.DataFrame
    table_b: pd.DataFrame
    deltas: pd.DataFrame  # long: layer, head, kv_group, metric, a, b, delta
    difference: object | None = None  # AttentionCube (B - A) or None when metrics only

    def _repr_html_(self) -> str:
        from llm_heatmap.notebook import tables_html

        return tables_html("PromptComparison: prompt B vs A", {"deltas": self.deltas})

    def __repr__(self) -> str:
        heads, metrics = len(self.table_a), self.deltas["metric"].nunique()
        cube = "no difference cube" if self.difference is None else f"difference {self.difference!r}"
        return f"PromptComparison({heads} heads x {metrics} metrics, deltas B - A; {cube})"

    def wide(self) -> pd.DataFrame:
        """Deltas laid out like a head-metric table: one row per head, one column per metric."""
        index = [c for c in ("layer", "head", "kv_group") if c in self.deltas.columns]
        wide = self.deltas.pivot_table(index=index, columns="metric", values="delta", sort=False).reset_index()
        wide.columns.name = None
        return wide


def compare_cubes(cube_a, cube_b, *, metrics=None, metrics_only: bool = False, head_metrics=None) -> PromptComparison:
    """Compare two captured prompts: per-head metric deltas (B - A) and the difference cube.

    When the token counts differ this raises `InputError` unless `metrics_only=True`.
    `head_metrics` (default `analyses.heads.metrics.head_metrics`) turns a cube into a metric table.
    """
    if not metrics_only and cube_a.num_keys != cube_b.num_keys:
        difference_cube(cube_a, cube_b)  # raises the explanation
    if head_metrics is None:
        from llm_heatmap.analyses.heads.metrics import head_metrics
    table_a, table_b = head_metrics(cube_a), head_metrics(cube_b)
    deltas = metric_deltas(table_a, table_b, metrics)
    difference = None if metrics_only else difference_cube(cube_a, cube_b)
    return PromptComparison(table_a, table_b, deltas, difference)


def compare_tables(table_a: pd.DataFrame, table_b: pd.DataFrame, *, metrics=None) -> PromptComparison:
    """Metric deltas only, from two head-metric tables already computed (e.g. streamed)."""
    return PromptComparison(table_a, table_b, metric_deltas(table_a, table_b, metrics))


# ---- two sets -------------------------------------------------------------------------------
def _cube_of(table: pd.DataFrame, units: pd.MultiIndex, metrics: list[str], id_column: str, ids=None) -> np.ndarray:
    """`"prompt unit metric"` array of a long table (one row per prompt x head), prompts in `ids` order."""
    if id_column not in table.columns:
        raise InputError(f"the prompt-set table has no '{id_column}' column; pass tables written by `llm-heatmap batch` (one row per prompt x head).")
    if table.duplicated([id_column, *KEYS]).any():
        raise InputError(f"the prompt-set table holds a (prompt, layer, head) row twice; give each prompt a unique '{id_column}'.")
    present = pd.unique(table[id_column])
    if ids is None:
        ids = present
    missing = sorted(set(map(str, ids)) - set(map(str, present)))
    if missing:
        raise InputError(f"prompt id '{missing[0]}' of the pairs is not in its set's table; pair ids that were measured.")
    index = pd.MultiIndex.from_tuples([(i, *u) for i in ids for u in units], names=[id_column, *KEYS])
    values = table.set_index([id_column, *KEYS])[metrics].reindex(index).to_numpy(float)
    return values.reshape(len(ids), len(units), len(metrics))


@dataclass
class SetComparison:
    """Set B vs set A: `heads` (one row per layer x head x metric) and `layers` (layer x metric)."""

    heads: pd.DataFrame
    layers: pd.DataFrame

    def _repr_html_(self) -> str:
        from llm_heatmap.notebook import tables_html

        return tables_html("SetComparison: prompt set B vs A", {"layers": self.layers, "heads": self.heads})

    def __repr__(self) -> str:
        metrics = self.heads["metric"].nunique() if len(self.heads) else 0
        return (f"SetComparison({len(self.heads)} head x metric rows, {len(self.layers)} layer x metric rows, "
                f"{metrics} metrics, deltas B - A)")


def _frame(stats: dict, keys: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Turn "unit metric" statistics into a long table with a per-metric q-value."""
    units, count = len(keys), len(metrics)
    frame = keys.loc[np.tile(np.arange(units), count)].reset_index(drop=True)
    frame["metric"] = np.repeat(metrics, units)
    for name, values in stats.items():
        # stats are "unit metric" flattened; reorder to metric-major to match the frame
        frame[name] = np.asarray(values).reshape(units, count).T.reshape(-1)
    frame["q_value"] = np.concatenate([bh_adjust(part) for part in np.split(frame["p_value"].to_numpy(), count)])
    for name in ("n_a", "n_b"):
        frame[name] = frame[name].astype(int)
    return frame


def compare_sets(table_a: pd.DataFrame, table_b: pd.DataFrame, *, metrics=None, n_resamples: int = 2000,
                 n_permutations: int = 2000, confidence: float = 0.95, seed: int = 0,
                 id_column: str = "prompt_id", pairs=None) -> SetComparison:
    """Per-head and per-layer mean deltas (B - A) with bootstrap intervals and permutation p-values.

    `table_a`, `table_b`: one row per prompt x head with `id_column`, `layer`, `head` and metric
    columns (a `run_batch` table, or `head_metrics` tables concatenated with a prompt id).
    `pairs`: optional list of (id in A, id in B) matched prompts (e.g. length-matched pairs); the
    statistics are then paired (`paired_statistics`) instead of independent (`set_statistics`).
    """
    metrics = select_metrics(table_a, metrics)
    select_metrics(table_b, metrics)
    units = pd.MultiIndex.from_frame(
        pd.concat([table_a[KEYS], table_b[KEYS]]).drop_duplicates().sort_values(KEYS))
    pairs = None if pairs is None else list(pairs)
    x_a = _cube_of(table_a, units, metrics, id_column, None if pairs is None else [a for a, _ in pairs])
    x_b = _cube_of(table_b, units, metrics, id_column, None if pairs is None else [b for _, b in pairs])
    options = dict(n_resamples=n_resamples, n_permutations=n_permutations, confidence=confidence, seed=seed)
    statistics = set_statistics if pairs is None else paired_statistics

    head_keys = units.to_frame(index=False)
    if "kv_group" in table_a.columns:
        groups = table_a.drop_duplicates(KEYS).set_index(KEYS)["kv_group"]
        head_keys["kv_group"] = groups.reindex(units).to_numpy()
    head_stats = statistics(x_a.reshape(len(x_a), -1), x_b.reshape(len(x_b), -1), **options)
    heads = _frame(head_stats, head_keys, metrics)

    layer_values, layer_of_unit = np.unique(units.get_level_values("layer").to_numpy(), return_inverse=True)
    l_a, l_b = unit_means(x_a, layer_of_unit, len(layer_values)), unit_means(x_b, layer_of_unit, len(layer_values))
    layer_stats = statistics(l_a.reshape(len(l_a), -1), l_b.reshape(len(l_b), -1), **options)
    layers = _frame(layer_stats, pd.DataFrame({"layer": layer_values}), metrics)
    return SetComparison(heads=heads, layers=layers)


def split_groups(ids: list[str], fields: list[dict], group: str, groups=None, pair: str | None = None):
    """Two prompt sets from one file: (ids of group A, ids of group B, pairs or None).

    `fields` holds each prompt's `group` (and `pair`) value, in the order of `ids`. `groups` names
    (A, B); by default the file's two group values in order of first appearance. With `pair`, every
    pair value must hold one prompt of each group; pairs are (A id, B id) for `paired_statistics`.
    """
    values = list(dict.fromkeys(f[group] for f in fields if f[group] is not None))
    if groups is None:
        if len(values) != 2:
            raise InputError(f"the '{group}' field holds {len(values)} groups ({', '.join(values) or 'none'}); "
                             "name the two to compare, A first.")
        groups = values
    groups = [str(g) for g in groups]
    missing = [g for g in groups if g not in values]
    if len(groups) != 2 or groups[0] == groups[1] or missing:
        raise InputError(f"groups {', '.join(groups)} are not two of the file's groups ({', '.join(values)}); "
                         "name two different groups that it holds.")
    members = [[i for i, f in zip(ids, fields) if f[group] == g] for g in groups]
    if pair is None:
        return members[0], members[1], None
    by_pair: dict[str, dict[str, list[str]]] = {}
    for i, f in zip(ids, fields):
        if f[group] in groups:
            if f[pair] is None:
                raise InputError(f"prompt '{i}' of group '{f[group]}' has no '{pair}'; give every prompt of the two "
                                 "groups its pair.")
            by_pair.setdefault(f[pair], {}).setdefault(f[group], []).append(i)
    pairs = []
    for key, sides in by_pair.items():
        if [len(sides.get(g, [])) for g in groups] != [1, 1]:
            raise InputError(f"pair '{key}' holds {len(sides.get(groups[0], []))} prompt(s) of '{groups[0]}' and "
                             f"{len(sides.get(groups[1], []))} of '{groups[1]}'; each pair needs exactly one of each.")
        pairs.append((sides[groups[0]][0], sides[groups[1]][0]))
    return members[0], members[1], pairs


def compare_groups(table: pd.DataFrame, a: str, b: str, *, by: str = "group", **options) -> SetComparison:
    """`compare_sets` on the rows of one table whose column `by` equals `a` and `b`."""
    if by not in table.columns:
        raise InputError(f"the table has no '{by}' column; give prompts a group (JSONL \"group\" field).")
    present = sorted(map(str, pd.unique(table[by].dropna())))
    for name in (a, b):
        if name not in present:
            raise InputError(f"group '{name}' has no prompts; the table's groups are: {', '.join(present) or 'none'}.")
    return compare_sets(table[table[by] == a], table[table[by] == b], **options)


def run_set_comparison(model, tokenizer, set_a, set_b, out_dir, *, spec=None, source: str | None = None,
                       chat: bool = False, pairs=None, metrics=None, run=None, site: str | None = None, processor=None,
                       **statistics) -> SetComparison | None:
    """Measure every prompt of two sets (`runs.prompts.Prompt` lists) and compare B with A (`compare_sets`).

    The measuring is one resumable, shardable, data-parallel run of `runs.engine` into `out_dir`
    (`parts/`, `sets.json`, and `sets.parquet`: one row per prompt x head, prompt ids `A:<id>` and `B:<id>`);
    `run` (`runs.engine.RunOptions`) resumes, forces or shards it; a resumed run must have the same model
    (`source`, default the spec's architecture), spec, site and chat setting. `pairs` match prompt ids of A and B
    (paired statistics); `statistics` go to `compare_sets`. `site` names the attention site measured on a
    model with several (`runs.sites`; records give their images, read with `processor`, and targets). None on
    the ranks of a launched run other than rank 0, which compares once every part is written.
    """
    from llm_heatmap.analyses.heads.measure import site_metrics, stream_head_metrics
    from llm_heatmap.analyses.runs.engine import RunOptions, run_per_prompt
    from llm_heatmap.analyses.runs.sites import check_site_run, record_lengths, resolve_site, site_cube
    from llm_heatmap.models import spec_from_model

    model_name = source or type(model).__name__
    resolved = resolve_site(model, spec or spec_from_model(model), site, model_name, "a set comparison reads one")
    spec = resolved.spec
    prompts = [replace(p, id=f"{name}:{p.id}", group=name) for name, prompts in (("A", set_a), ("B", set_b))
               for p in prompts]
    check_site_run(model, processor, resolved, prompts, chat=chat, name=model_name)
    record_lengths(tokenizer, spec, prompts, chat=chat)  # the ids name the set: prompt 'A:3' (line 3 of a.jsonl)

    def measure(prompt):
        if resolved.through_sites:
            return site_metrics(site_cube(model, tokenizer, prompt, resolved, processor))
        return stream_head_metrics(model, tokenizer, prompt.text, spec=spec, chat=chat)

    settings = {"model": source or spec.architecture, "spec": spec.summary, "chat": chat}
    record = run_per_prompt(measure, prompts, out_dir, kind="sets", options=run or RunOptions(),
                            settings={**settings, **({"site": site} if site else {})})
    if not record.ranks.is_main:
        return None
    table = record.tables(record.sections[0])
    return compare_sets(table[table["group"] == "A"], table[table["group"] == "B"], metrics=metrics,
                        pairs=None if pairs is None else [(f"A:{a}", f"B:{b}") for a, b in pairs], **statistics)
