"""The head atlas's tables: one model's prompt x head rows and per-prompt head divergences, summarised
per head, per layer and for the whole model.

Which columns are summarised is read from the prompt x head table, so a metric added to
`HeadMetricsReducer` (or to whatever `measure` produced the rows) enters every table without a
change here: a numeric column m becomes `m_mean`, `m_low`, `m_high`; a boolean column f (a
flag, e.g. `sink_head`) becomes the rate `f_rate`, `f_low`, `f_high`; the pattern class becomes
one flag per class (`pattern_vertical`, ... , `pattern_heterogeneous`), so its frequencies come
with intervals too. Columns that describe a row (`compare.DESCRIPTIVE`) are not summarised.

- head level: the mean over prompts of each head's value, with a percentile bootstrap interval
  over prompts (`stats.bootstrap_means`); `pattern_class`: the class the head takes most often.
- layer level: per prompt, the mean over the layer's heads; then the mean and interval over
  prompts. KV-group similarity per layer (`kv_similarity`: within / between / gap over the
  layer's block of the head similarity, KV groups for GQA, pseudo-groups otherwise) per prompt
  (`prompt_layer_kv`), mean and interval over prompts, and a permutation p-value of the gap of
  the prompt-mean similarity (`group_gap`).
- model level: per prompt, the mean over all heads (and over layers for the KV gap); then the
  mean and interval over prompts.
- head map: classical MDS of the square root of the prompt-mean divergence (`head_map`), and the
  average-linkage clustering order (`cluster_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from pandas.api.types import is_bool_dtype

from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec

from llm_heatmap.analyses.compare import DESCRIPTIVE, metric_columns
from llm_heatmap.analyses.similarity.head_map import head_map
from llm_heatmap.analyses.bounds import PSEUDO_GROUP_SIZE
from llm_heatmap.analyses.similarity.kv_similarity import cluster_order, divergence_similarity, spec_head_groups
from llm_heatmap.analyses.stats import Bootstrap, group_gap, group_means, groups_comparable, unit_means
from llm_heatmap.analyses.heads.patterns import PATTERN_CLASSES

UNIT = ["layer", "head"]


def class_column(name: str) -> str:
    return "pattern_" + name.replace("+", "_")


def with_class_flags(table: pd.DataFrame) -> pd.DataFrame:
    """`table` plus one boolean column per pattern class (`pattern_<class>`), when it has `pattern_class`."""
    if "pattern_class" not in table.columns:
        return table
    flags = {class_column(name): table["pattern_class"] == name for name in PATTERN_CLASSES}
    return table.assign(**flags)


def summarised_columns(table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(numeric metrics, boolean flags) of a prompt x head table (module docstring)."""
    flags = [c for c in table.columns if c not in DESCRIPTIVE and is_bool_dtype(table[c])]
    return metric_columns(table), flags


def summarise(x: np.ndarray, numeric: list[str], flags: list[str], bootstrap: Bootstrap) -> dict:
    """Columns of `"prompt unit column"` values (the numeric columns, then the flags as 0/1): mean or rate,
    low, high per unit."""
    prompts, units, count = x.shape
    stats = bootstrap.means(x.reshape(prompts, -1))
    columns = {}
    for index, name in enumerate(numeric + flags):
        suffix = "mean" if index < len(numeric) else "rate"
        for key, stat in ((suffix, "mean"), ("low", "ci_low"), ("high", "ci_high")):
            columns[f"{name}_{key}"] = stats[stat].reshape(units, count)[:, index]
    return columns


def layer_blocks(divergence, num_layers: int, measure: str) -> torch.Tensor:
    """float64 `"l h h"`: each layer's diagonal block of one prompt's head similarity (`"n n"`, n = l x h)."""
    similarity = divergence_similarity(torch.as_tensor(np.asarray(divergence, dtype=np.float64)), measure)
    per_layer = similarity.shape[0] // num_layers
    blocks = similarity.reshape(num_layers, per_layer, num_layers, per_layer)
    return blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)


@dataclass
class ModelRows:
    """One model's measurements: `prompt_heads` (prompts in run order, each with every head in layer,
    head order), the prompt-mean head divergence `"n n"` in the same head order, and every prompt's
    within-layer head similarity `"prompt layer h h"` (`layer_blocks`)."""

    name: str
    spec: ModelSpec
    prompt_heads: pd.DataFrame
    mean_divergence: np.ndarray
    layer_similarity: torch.Tensor
    measure: str = "js"

    def __post_init__(self):
        table = self.prompt_heads
        self.prompt_ids = list(pd.unique(table["prompt_id"]))
        prompts = len(self.prompt_ids)
        if prompts == 0 or len(table) % prompts:
            raise InputError(f"the rows of model '{self.name}' must hold every head once for every prompt.")
        keys = table[UNIT].to_numpy().reshape(prompts, -1, 2)
        if not (keys == keys[:1]).all():
            raise InputError(f"the rows of model '{self.name}' must list the same heads in the same order for every prompt.")
        self.units = [tuple(int(v) for v in pair) for pair in keys[0]]
        self.layers, self.layer_of_unit = np.unique([layer for layer, _ in self.units], return_inverse=True)
        per_layer = len(self.units) // len(self.layers)
        if (self.mean_divergence.shape != (len(self.units),) * 2
                or tuple(self.layer_similarity.shape) != (prompts, len(self.layers), per_layer, per_layer)):
            raise InputError(f"model '{self.name}' has {prompts} prompts x {len(self.units)} heads of rows but divergences "
                             f"of shape {self.mean_divergence.shape} and {tuple(self.layer_similarity.shape)}.")
        self.table = with_class_flags(table)
        self.numeric, self.flags = summarised_columns(self.table)

    def array(self, columns: list[str] | None = None) -> np.ndarray:
        """`"prompt unit column"` float values (booleans as 0/1); default: the summarised columns."""
        columns = self.numeric + self.flags if columns is None else columns
        values = self.table[columns].astype(float).to_numpy()
        return values.reshape(len(self.prompt_ids), len(self.units), len(columns))

    def depth(self, layers) -> np.ndarray:
        """Relative depth of each layer: (layer + 0.5) / number of layers, in (0, 1)."""
        return (np.asarray(layers, dtype=float) + 0.5) / self.spec.num_layers

    def summarise(self, x: np.ndarray, bootstrap: Bootstrap) -> pd.DataFrame:
        return pd.DataFrame(summarise(x, self.numeric, self.flags, bootstrap))


def head_table(rows: ModelRows, bootstrap: Bootstrap) -> pd.DataFrame:
    """One row per head (module docstring), with its map position and clustering rank."""
    units = pd.DataFrame(rows.units, columns=UNIT)
    heads = pd.DataFrame({"model": rows.name, "layer": units["layer"], "head": units["head"]})
    if "kv_group" in rows.table.columns:
        heads["kv_group"] = rows.table["kv_group"].to_numpy()[:len(rows.units)]
    heads["depth"] = rows.depth(units["layer"])
    heads["n_prompts"] = len(rows.prompt_ids)
    summary = rows.summarise(rows.array(), bootstrap)
    classes = [class_column(name) + "_rate" for name in PATTERN_CLASSES]
    if all(c in summary.columns for c in classes):
        heads["pattern_class"] = np.asarray(PATTERN_CLASSES)[summary[classes].to_numpy().argmax(1)]
    position = head_map(rows.mean_divergence)
    order, _ = cluster_order(rows.mean_divergence)
    heads["map_x"], heads["map_y"] = position[:, 0], position[:, 1]
    heads["cluster_rank"] = np.argsort(order)
    return pd.concat([heads, summary], axis=1)


def head_grouping(rows: ModelRows, pseudo_group_size: int) -> tuple[torch.Tensor, str, int]:
    """(group of each head within a layer, "kv" or "pseudo", group size) of the model's heads."""
    heads = sorted({head for _, head in rows.units})
    groups, grouping = spec_head_groups(rows.spec, heads, pseudo_group_size)
    return groups, grouping, rows.spec.group_size if grouping == "kv" else pseudo_group_size


def prompt_layer_kv(rows: ModelRows, pseudo_group_size: int) -> pd.DataFrame:
    """One row per prompt x layer: within, between and gap of the KV-group similarity."""
    layers = rows.layers
    groups, grouping, size = head_grouping(rows, pseudo_group_size)
    within, between = group_means(rows.layer_similarity, groups[:, None] == groups[None, :])
    prompts = len(rows.prompt_ids)
    return pd.DataFrame({
        "model": rows.name, "prompt_id": np.repeat(rows.prompt_ids, len(layers)),
        "layer": np.tile(layers, prompts), "depth": np.tile(rows.depth(layers), prompts),
        "measure": rows.measure, "grouping": grouping, "group_size": size,
        "within": within.reshape(-1).numpy(), "between": between.reshape(-1).numpy(),
        "gap": (within - between).reshape(-1).numpy(),
    })


def layer_table(rows: ModelRows, kv: pd.DataFrame, bootstrap: Bootstrap, *, n_permutations: int = 1000,
                pseudo_group_size: int = PSEUDO_GROUP_SIZE) -> pd.DataFrame:
    """One row per layer: the KV-group similarity over prompts and the layer means of every metric."""
    layers = rows.layers
    x = unit_means(rows.array(), rows.layer_of_unit, len(layers))
    kv_values = kv[["within", "between", "gap"]].to_numpy(float).reshape(len(rows.prompt_ids), len(layers), 3)
    groups, grouping, size = head_grouping(rows, pseudo_group_size)
    mean_blocks = rows.layer_similarity.mean(0)
    front = pd.DataFrame({"model": rows.name, "layer": layers, "depth": rows.depth(layers),
                          "n_prompts": len(rows.prompt_ids), "measure": rows.measure, "grouping": grouping,
                          "group_size": size})
    kv_columns = pd.DataFrame(summarise(kv_values, ["within", "between", "gap"], [], bootstrap))
    # a model with too few heads to group (two per layer) has no gap to test: its p-values are NaN
    kv_columns["gap_p_value"] = [group_gap(block, groups, n_permutations, bootstrap.seed)["p_value"]
                                 if groups_comparable(groups) else np.nan for block in mean_blocks]
    return pd.concat([front, kv_columns, rows.summarise(x, bootstrap)], axis=1)


def model_table(rows: ModelRows, kv: pd.DataFrame, bootstrap: Bootstrap, source: str | None = None) -> pd.DataFrame:
    """One row: the model's spec, and the mean over its heads of every metric, over prompts."""
    spec = rows.spec
    x = unit_means(rows.array(), np.zeros(len(rows.units), dtype=int), 1)
    gap = kv.groupby("prompt_id", sort=False)["gap"].mean().reindex(rows.prompt_ids).to_numpy()[:, None, None]
    tokens = rows.table.groupby("prompt_id", sort=False)["n_tokens"].first() if "n_tokens" in rows.table else None
    front = pd.DataFrame({
        "model": [rows.name], "source": [source or rows.name], "site": [spec.site or "self"], "summary": [spec.summary],
        "architecture": [spec.architecture], "attention_kind": [spec.attention_kind], "causal": [spec.causal],
        "num_layers": [spec.num_layers], "num_heads": [spec.num_heads], "num_kv_heads": [spec.num_kv_heads],
        "n_prompts": [len(rows.prompt_ids)], "mean_tokens": [float(tokens.mean()) if tokens is not None else np.nan],
        "measure": [rows.measure], "grouping": [kv["grouping"].iloc[0]], "group_size": [int(kv["group_size"].iloc[0])],
    })
    gap_columns = pd.DataFrame(summarise(gap, ["gap"], [], bootstrap))
    return pd.concat([front, gap_columns, rows.summarise(x, bootstrap)], axis=1)


def top_prompts(rows: ModelRows, metrics, k: int = 3) -> pd.DataFrame:
    """One row per head x metric x rank: the `k` prompts where the head scores highest (ties: file order)."""
    metrics = [m for m in metrics if m in rows.numeric]
    if not metrics:
        return pd.DataFrame(columns=["model", "layer", "head", "metric", "rank", "prompt_id", "value"])
    x = rows.array(metrics)  # p u m
    order = np.argsort(-np.nan_to_num(x, nan=-np.inf), axis=0, kind="stable")[:k]  # r u m
    ranks, units, columns = np.indices(order.shape)
    values = np.take_along_axis(x, order, axis=0)
    keep = np.isfinite(values).reshape(-1)
    unit_keys = np.asarray(rows.units)[units.reshape(-1)]
    frame = pd.DataFrame({
        "model": rows.name, "layer": unit_keys[:, 0], "head": unit_keys[:, 1],
        "metric": np.asarray(metrics)[columns.reshape(-1)], "rank": ranks.reshape(-1) + 1,
        "prompt_id": np.asarray(rows.prompt_ids, dtype=object)[order.reshape(-1)], "value": values.reshape(-1),
    })[keep]
    return frame.sort_values(["layer", "head", "metric", "rank"], kind="stable").reset_index(drop=True)
