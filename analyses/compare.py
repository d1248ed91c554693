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

Resampling is vectorised: each resample or permutation is a row of a weight matrix, so all
heads and metrics are averaged by one matrix product.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from llm_heatmap.errors import InputError

from .bounds import check_statistics

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

    def wide(self) -> pd.DataFrame:
        """Deltas laid out like a head-metric table: one row per head, one column per metric."""
        index = [c for c in ("layer", "head", "kv_group") if c in self.deltas.columns]
        wide = self.deltas.pivot_table(index=index, columns="metric", values="delta", sort=False).reset_index()
        wide.columns.name = None
        return wide


def compare_cubes(cube_a, cube_b, *, metrics=None, metrics_only: bool = False, head_metrics=None) -> PromptComparison:
    """Compare two captured prompts: per-head metric deltas (B - A) and the difference cube.

    When the token counts differ this raises `InputError` unless `metrics_only=True`.
    `head_metrics` (default `analyses.metrics.head_metrics`) turns a cube into a metric table.
    """
    if not metrics_only and cube_a.num_keys != cube_b.num_keys:
        difference_cube(cube_a, cube_b)  # raises the explanation
    if head_metrics is None:
        from .metrics import head_metrics
    table_a, table_b = head_metrics(cube_a), head_metrics(cube_b)
    deltas = metric_deltas(table_a, table_b, metrics)
    difference = None if metrics_only else difference_cube(cube_a, cube_b)
    return PromptComparison(table_a, table_b, deltas, difference)


def compare_tables(table_a: pd.DataFrame, table_b: pd.DataFrame, *, metrics=None) -> PromptComparison:
    """Metric deltas only, from two head-metric tables already computed (e.g. streamed)."""
    return PromptComparison(table_a, table_b, metric_deltas(table_a, table_b, metrics))


# ---- two sets -------------------------------------------------------------------------------
def _weighted_means(weights: np.ndarray, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows of `weights` ("r n") average the rows of `values` ("n k"), ignoring NaN entries."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ values) / (weights @ valid)


def _column_blocks(columns: int, rows: int, budget: int = 1 << 24):
    """Column slices whose "rows x block" float64 temporaries stay near `budget` elements (128 MiB)."""
    step = max(1, budget // max(1, rows))
    return [slice(start, min(columns, start + step)) for start in range(0, columns, step)]


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN entries stay NaN and are not counted)."""
    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    values = p[finite]
    if values.size:
        order = np.argsort(values)
        ranked = values[order] * values.size / np.arange(1, values.size + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]
        adjusted = np.empty_like(values)
        adjusted[order] = np.minimum(ranked, 1.0)
        out[finite] = adjusted
    return out


def resample_counts(rng: np.random.Generator, n: int, n_resamples: int) -> np.ndarray:
    """`"r n"`: how often each of n prompts is drawn in each bootstrap resample (n draws with replacement)."""
    return rng.multinomial(n, np.full(n, 1 / n), size=n_resamples).astype(float)


def percentile_interval(boot: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """The central `confidence` percentile interval of each column of `boot` (`"resample column"`)."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.full(boot.shape[1:], np.nan), np.full(boot.shape[1:], np.nan)
    complete = ~np.isnan(boot).any(0)
    # np.percentile on the columns without NaN: nanpercentile takes a slow per-column path on the whole array
    low[complete], high[complete] = np.percentile(boot[:, complete], [tail, 100 - tail], axis=0)
    if not complete.all():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (a metric undefined everywhere)
            low[~complete], high[~complete] = np.nanpercentile(boot[:, ~complete], [tail, 100 - tail], axis=0)
    return low, high


def _mean_and_interval(counts: np.ndarray, zero: np.ndarray, valid: np.ndarray, confidence: float) -> dict:
    """NaN-ignoring column means of `zero` (NaN replaced by 0, `valid` marks real entries) and their bootstrap
    interval under the resamples `counts`, in column blocks that bound the temporaries."""
    n, columns = zero.shape
    mean = _weighted_means(np.ones((1, n)), zero, valid)[0]
    low, high = np.full(columns, np.nan), np.full(columns, np.nan)
    for block in _column_blocks(columns, len(counts)):
        low[block], high[block] = percentile_interval(_weighted_means(counts, zero[:, block], valid[:, block]), confidence)
    return {"n": valid.sum(0), "mean": mean, "ci_low": low, "ci_high": high}


def bootstrap_means(x: np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of every column of `x` (`"n k"`: rows are prompts; NaN entries left out) with a percentile
    bootstrap interval (prompts resampled with replacement, `n_resamples` times, seeded).

    Returns arrays of length k: n (non-NaN rows), mean, ci_low, ci_high.
    """
    check_statistics(n_resamples=n_resamples, confidence=confidence, seed=seed)
    x = np.asarray(x, float)
    if x.ndim != 2 or len(x) < 1:
        raise InputError(f"bootstrap_means needs a prompts x columns array with at least one prompt, got shape {x.shape}.")
    rng = np.random.default_rng(seed)
    return _mean_and_interval(resample_counts(rng, len(x), n_resamples), np.nan_to_num(x), ~np.isnan(x), confidence)


def set_statistics(x_a: np.ndarray, x_b: np.ndarray, *, n_resamples: int = 2000, n_permutations: int = 2000,
                   confidence: float = 0.95, seed: int = 0) -> dict[str, np.ndarray]:
    """Mean difference B - A of every column with a bootstrap interval and a permutation p-value.

    `x_a` is `"n_a k"`, `x_b` is `"n_b k"` (rows are prompts, columns are whatever is compared);
    NaN entries are left out of every mean. Returns arrays of length k: n_a, n_b, mean_a,
    mean_b, delta, ci_low, ci_high, p_value.
    """
    check_statistics(n_resamples=n_resamples, n_permutations=n_permutations, confidence=confidence, seed=seed)
    x_a, x_b = np.asarray(x_a, float), np.asarray(x_b, float)
    n_a, n_b = len(x_a), len(x_b)
    if n_a < 1 or n_b < 1:
        raise InputError(f"each prompt set needs at least one prompt (got {n_a} and {n_b}); add prompts to the empty set.")
    rng = np.random.default_rng(seed)
    valid_a, valid_b = ~np.isnan(x_a), ~np.isnan(x_b)
    zero_a, zero_b = np.nan_to_num(x_a), np.nan_to_num(x_b)
    mean_a = _weighted_means(np.ones((1, n_a)), zero_a, valid_a)[0]
    mean_b = _weighted_means(np.ones((1, n_b)), zero_b, valid_b)[0]
    delta = mean_b - mean_a

    # bootstrap: resample counts of each prompt, one row per resample
    counts_a = resample_counts(rng, n_a, n_resamples)
    counts_b = resample_counts(rng, n_b, n_resamples)
    # permutation: which pooled prompts are labelled A, one row per relabelling
    n = n_a + n_b
    exact = math.comb(n, n_a) <= n_permutations
    if exact:
        labels_a = np.zeros((math.comb(n, n_a), n))
        for row, members in enumerate(itertools.combinations(range(n), n_a)):
            labels_a[row, list(members)] = 1
    else:
        order = rng.permuted(np.tile(np.arange(n), (n_permutations, 1)), axis=1)
        labels_a = np.zeros((n_permutations, n))
        np.put_along_axis(labels_a, order[:, :n_a], 1.0, axis=1)
    pooled, pooled_valid = np.vstack([zero_a, zero_b]), np.vstack([valid_a, valid_b])

    ci_low, ci_high, p_value = (np.full(delta.shape, np.nan) for _ in range(3))
    for block in _column_blocks(delta.size, max(n_resamples, len(labels_a))):
        boot = _weighted_means(counts_b, zero_b[:, block], valid_b[:, block]) - _weighted_means(
            counts_a, zero_a[:, block], valid_a[:, block])
        ci_low[block], ci_high[block] = percentile_interval(boot, confidence)
        permuted = (_weighted_means(1 - labels_a, pooled[:, block], pooled_valid[:, block])
                    - _weighted_means(labels_a, pooled[:, block], pooled_valid[:, block]))
        # a relative tolerance so that splits equal to the observed one count despite rounding
        extreme = (np.abs(permuted) >= np.abs(delta[block]) * (1 - 1e-9) - 1e-12) & np.isfinite(permuted)
        total = np.isfinite(permuted).sum(0)
        p_value[block] = extreme.sum(0) / total.clip(min=1) if exact else (1 + extreme.sum(0)) / (1 + total)
    p_value = np.where(np.isfinite(delta), p_value, np.nan)
    return {"n_a": valid_a.sum(0), "n_b": valid_b.sum(0), "mean_a": mean_a, "mean_b": mean_b, "delta": delta,
            "ci_low": ci_low, "ci_high": ci_high, "p_value": p_value}


def paired_statistics(x_a: np.ndarray, x_b: np.ndarray, *, n_resamples: int = 2000, n_permutations: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> dict[str, np.ndarray]:
    """Like `set_statistics` for matched pairs: row i of `x_a` and of `x_b` belong together.

    delta = mean over pairs of (b_i - a_i); the bootstrap resamples pairs; the permutation test
    flips the sign of each pair's difference (swapping the two labels inside a pair), exactly
    over all 2^n flips when that is at most `n_permutations`. Pairs with a NaN are left out.
    """
    check_statistics(n_resamples=n_resamples, n_permutations=n_permutations, confidence=confidence, seed=seed)
    x_a, x_b = np.asarray(x_a, float), np.asarray(x_b, float)
    if x_a.shape != x_b.shape or len(x_a) < 1:
        raise InputError(f"paired comparison needs the same number of prompts on both sides (got {len(x_a)} and {len(x_b)}).")
    rng = np.random.default_rng(seed)
    diff = x_b - x_a
    valid = ~np.isnan(diff)
    zero = np.nan_to_num(diff)
    n = len(diff)
    bootstrap = _mean_and_interval(resample_counts(rng, n, n_resamples), zero, valid, confidence)
    delta, ci_low, ci_high = bootstrap["mean"], bootstrap["ci_low"], bootstrap["ci_high"]
    exact = 2 ** n <= n_permutations
    if exact:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1).astype(float)
    else:
        signs = rng.choice([-1.0, 1.0], size=(n_permutations, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        flipped = (signs @ zero) / valid.sum(0)
    extreme = (np.abs(flipped) >= np.abs(delta) * (1 - 1e-9) - 1e-12) & np.isfinite(flipped)
    total = np.isfinite(flipped).sum(0)
    p_value = extreme.sum(0) / total.clip(min=1) if exact else (1 + extreme.sum(0)) / (1 + total)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a = np.nansum(np.where(valid, x_a, 0), 0) / valid.sum(0)
        mean_b = np.nansum(np.where(valid, x_b, 0), 0) / valid.sum(0)
    return {"n_a": valid.sum(0), "n_b": valid.sum(0), "mean_a": mean_a, "mean_b": mean_b, "delta": delta,
            "ci_low": ci_low, "ci_high": ci_high, "p_value": np.where(np.isfinite(delta), p_value, np.nan)}


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


def _layer_means(x: np.ndarray, layer_of_unit: np.ndarray, num_layers: int) -> np.ndarray:
    """`"prompt unit metric" -> "prompt layer metric"`: NaN-ignoring mean over each layer's heads."""
    one_hot = np.eye(num_layers)[layer_of_unit]
    valid = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("num,ul->nlm", np.nan_to_num(x), one_hot) / np.einsum("num,ul->nlm", valid.astype(float), one_hot)


@dataclass
class SetComparison:
    """Set B vs set A: `heads` (one row per layer x head x metric) and `layers` (layer x metric)."""

    heads: pd.DataFrame
    layers: pd.DataFrame


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
    l_a, l_b = _layer_means(x_a, layer_of_unit, len(layer_values)), _layer_means(x_b, layer_of_unit, len(layer_values))
    layer_stats = statistics(l_a.reshape(len(l_a), -1), l_b.reshape(len(l_b), -1), **options)
    layers = _frame(layer_stats, pd.DataFrame({"layer": layer_values}), metrics)
    return SetComparison(heads=heads, layers=layers)


def compare_groups(table: pd.DataFrame, a: str, b: str, *, by: str = "group", **options) -> SetComparison:
    """`compare_sets` on the rows of one table whose column `by` equals `a` and `b`."""
    if by not in table.columns:
        raise InputError(f"the table has no '{by}' column; give prompts a group (JSONL \"group\" field).")
    present = sorted(map(str, pd.unique(table[by].dropna())))
    for name in (a, b):
        if name not in present:
            raise InputError(f"group '{name}' has no prompts; the table's groups are: {', '.join(present) or 'none'}.")
    return compare_sets(table[table[by] == a], table[table[by] == b], **options)
