"""The atlas's summaries on small hand-made tables: means, rates, classes, layers, KV groups, top prompts, map."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from llm_heatmap.analyses.atlas.summary import (ModelRows, head_table, layer_blocks, layer_table, model_table,
                                               prompt_layer_kv, top_prompts)
from llm_heatmap.analyses.stats import Bootstrap, bootstrap_means
from llm_heatmap.analyses.similarity.head_map import classical_mds, head_map
from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec

SPEC = ModelSpec(model_type="llama", architecture="LlamaForCausalLM", num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, causal=True, layer_types=("full_attention",) * 2)
UNITS = [(layer, head) for layer in range(2) for head in range(4)]
BOOT = Bootstrap(n_resamples=500, seed=3)


def prompt_heads(prompts: int = 3, extra: bool = False) -> pd.DataFrame:
    """prompts x 8 heads: entropy = prompt + layer + head / 10; head 0 a sink head on every prompt but the last."""
    rows = []
    for p in range(prompts):
        for layer, head in UNITS:
            row = {"model": "m", "prompt_id": f"p{p}", "group": None, "prompt": f"text {p}", "n_tokens": 5 + p,
                   "layer": layer, "head": head, "kv_group": head // 2, "entropy": p + layer + head / 10,
                   "sink_head": head == 0 and p < prompts - 1,
                   "pattern_class": "vertical" if head == 0 else ("diagonal" if p == 0 else "heterogeneous"),
                   "induction_score": np.nan if (layer, head) == (1, 3) else float(p == 1), "n_rows": 4}
            if extra:  # what issue 12's value norms will add: a flag and a number
                row["noop_sink"] = head == 0 and p == 0
                row["norm_sink_score"] = 0.5 * head
            rows.append(row)
    return pd.DataFrame(rows)


def divergences(prompts: int = 3) -> np.ndarray:
    """"p n n": heads of one KV group (heads 0-1, 2-3 of a layer) closer than heads across groups."""
    group = np.array([h // 2 + 10 * layer for layer, h in UNITS])
    base = np.where(group[:, None] == group[None, :], 0.1, 0.4)
    np.fill_diagonal(base, 0)
    return np.stack([base * (1 + p / 10) for p in range(prompts)])


def rows_of(table: pd.DataFrame, divergence: np.ndarray, measure: str = "js") -> ModelRows:
    blocks = torch.stack([layer_blocks(d, SPEC.num_layers, measure) for d in divergence])
    return ModelRows("m", SPEC, table, divergence.mean(0), blocks, measure)


def test_head_level_means_rates_and_classes():
    rows = rows_of(prompt_heads(), divergences())
    heads = head_table(rows, BOOT)
    assert list(heads[["layer", "head"]].itertuples(index=False, name=None)) == UNITS
    np.testing.assert_allclose(heads["entropy_mean"], [1 + l + h / 10 for l, h in UNITS])  # mean of p = 0, 1, 2
    np.testing.assert_allclose(heads["depth"], [0.25] * 4 + [0.75] * 4)
    assert heads["sink_head_rate"].tolist() == [2 / 3, 0, 0, 0] * 2
    assert heads["pattern_vertical_rate"].tolist() == [1, 0, 0, 0] * 2
    np.testing.assert_allclose(heads["pattern_diagonal_rate"], [0, 1 / 3, 1 / 3, 1 / 3] * 2)
    assert heads["pattern_class"].tolist() == ["vertical", "heterogeneous", "heterogeneous", "heterogeneous"] * 2
    assert np.isnan(heads.loc[7, "induction_score_mean"]) and heads.loc[0, "induction_score_mean"] == pytest.approx(1 / 3)
    # the intervals are stats.bootstrap_means over the prompts, unit by unit
    full = bootstrap_means(rows.array().reshape(3, -1), n_resamples=500, seed=3)
    columns = rows.numeric + rows.flags
    index = columns.index("entropy")
    np.testing.assert_array_equal(heads["entropy_low"], full["ci_low"].reshape(8, -1)[:, index])
    np.testing.assert_array_equal(heads["entropy_high"], full["ci_high"].reshape(8, -1)[:, index])
    assert (heads["entropy_low"] <= heads["entropy_mean"]).all() and (heads["entropy_mean"] <= heads["entropy_high"]).all()
    assert "n_rows_mean" not in heads and "n_tokens_mean" not in heads and "kv_group_mean" not in heads


def test_new_metric_columns_are_summarised_without_changes():
    rows = rows_of(prompt_heads(extra=True), divergences())
    heads, kv = head_table(rows, BOOT), prompt_layer_kv(rows, 2)
    layers, model = layer_table(rows, kv, BOOT, n_permutations=20), model_table(rows, kv, BOOT)
    assert heads["noop_sink_rate"].tolist() == [1 / 3, 0, 0, 0] * 2
    np.testing.assert_allclose(heads["norm_sink_score_mean"], [0, 0.5, 1, 1.5] * 2)
    for table in (heads, layers, model):
        assert {"noop_sink_rate", "noop_sink_low", "noop_sink_high", "norm_sink_score_mean", "norm_sink_score_low",
                "norm_sink_score_high"} <= set(table.columns)
    np.testing.assert_allclose(layers["norm_sink_score_mean"], [0.75, 0.75])
    assert model["noop_sink_rate"].item() == pytest.approx(1 / 3 / 4)


def test_layer_and_model_levels():
    rows = rows_of(prompt_heads(), divergences())
    kv = prompt_layer_kv(rows, 2)
    layers = layer_table(rows, kv, BOOT, n_permutations=200)
    # per prompt, the mean over a layer's heads, then the mean over prompts
    np.testing.assert_allclose(layers["entropy_mean"], [1 + 0.15, 2 + 0.15])
    np.testing.assert_allclose(layers["sink_head_rate"], [2 / 3 / 4] * 2)
    # NaN (layer 1 head 3) is left out of the layer mean, not counted as 0
    np.testing.assert_allclose(layers["induction_score_mean"], [1 / 3, 1 / 3])
    model = model_table(rows, kv, BOOT, source="models/m")
    assert model[["model", "source", "attention_kind", "num_layers", "n_prompts"]].iloc[0].tolist() == [
        "m", "models/m", "GQA", 2, 3]
    assert model["mean_tokens"].item() == 6 and model["entropy_mean"].item() == pytest.approx(1.65)
    assert model["grouping"].item() == "kv" and model["group_size"].item() == 2


def test_kv_groups_per_prompt_and_layer_by_hand():
    rows = rows_of(prompt_heads(), divergences())
    kv = prompt_layer_kv(rows, 2)
    assert len(kv) == 3 * 2 and (kv["grouping"] == "kv").all()
    for p in range(3):
        scale = 1 + p / 10
        within, between = 1 - 0.1 * scale / math.log(2), 1 - 0.4 * scale / math.log(2)
        part = kv[kv["prompt_id"] == f"p{p}"]
        np.testing.assert_allclose(part["within"], within)
        np.testing.assert_allclose(part["between"], between)
        np.testing.assert_allclose(part["gap"], within - between)
    layers = layer_table(rows, kv, BOOT, n_permutations=300)
    np.testing.assert_allclose(layers["gap_mean"], kv.groupby("layer")["gap"].mean())
    # 3 ways to pair 4 heads; only the true pairing reaches the gap
    np.testing.assert_allclose(layers["gap_p_value"], 1 / 3, atol=0.06)
    mha = ModelSpec(**{**SPEC.to_dict(), "num_kv_heads": 4})
    pseudo = prompt_layer_kv(ModelRows("m", mha, rows.prompt_heads, rows.mean_divergence, rows.layer_similarity), 2)
    assert (pseudo["grouping"] == "pseudo").all() and (pseudo["group_size"] == 2).all()
    hellinger = rows_of(prompt_heads(), divergences(), measure="hellinger")
    np.testing.assert_allclose(prompt_layer_kv(hellinger, 2)["within"].iloc[0], 1 - 0.1)


def test_layer_blocks_are_the_diagonal_blocks():
    divergence = np.arange(64, dtype=float).reshape(8, 8) / 100
    blocks = layer_blocks(divergence, 2, "hellinger")
    assert blocks.shape == (2, 4, 4)
    np.testing.assert_allclose(blocks[0], 1 - divergence[:4, :4])
    np.testing.assert_allclose(blocks[1], 1 - divergence[4:, 4:])


def test_top_prompts_ties_and_missing_values():
    table = prompt_heads(4)
    table.loc[table["prompt_id"] == "p3", "entropy"] = 1.0  # ties p1 on layer 0 head 0
    rows = rows_of(table, divergences(4))
    top = top_prompts(rows, ["entropy", "induction_score", "no_such_metric"], k=2)
    first = top[(top["layer"] == 0) & (top["head"] == 0) & (top["metric"] == "entropy")]
    assert first["prompt_id"].tolist() == ["p2", "p1"] and first["rank"].tolist() == [1, 2]
    induction = top[(top["metric"] == "induction_score")]
    assert not ((induction["layer"] == 1) & (induction["head"] == 3)).any()  # NaN everywhere: no top prompt
    assert set(top["metric"]) == {"entropy", "induction_score"}


def test_rows_must_be_complete():
    table = prompt_heads()
    with pytest.raises(InputError, match="every head once for every prompt"):
        rows_of(table.iloc[:-1], divergences())
    with pytest.raises(InputError, match="divergences of shape"):
        rows_of(table, divergences(2))


def test_classical_mds_recovers_euclidean_points():
    points = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [3.0, 4.0], [1.0, 1.0]])
    distance = np.linalg.norm(points[:, None] - points[None, :], axis=-1)
    embedded = classical_mds(distance)
    np.testing.assert_allclose(np.linalg.norm(embedded[:, None] - embedded[None, :], axis=-1), distance, atol=1e-9)
    assert (embedded[np.abs(embedded).argmax(0), [0, 1]] > 0).all()  # signs fixed
    np.testing.assert_allclose(classical_mds(distance), embedded)
    np.testing.assert_allclose(head_map(distance ** 2), embedded, atol=1e-9)  # distance = sqrt(divergence)
    assert classical_mds(np.zeros((1, 1))).shape == (1, 2)
    with pytest.raises(InputError, match="square distance matrix"):
        classical_mds(np.zeros((2, 3)))
