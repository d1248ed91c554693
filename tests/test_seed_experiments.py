"""The seed-experiment script on MiniLM: files, table shapes, deltas = B - A, unequal token counts, KV statistics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from llm_heatmap.analyses import group_gap, head_metrics
from llm_heatmap.analyses.compare import metric_columns
from experiments import seed_experiments as se
from llm_heatmap.probes import capture_prompt

pytestmark = pytest.mark.slow
EQUAL = se.Experiment("exp3", "Exp. 3", "the sky is blue", "the grass is green")  # 6 and 6 tokens under WordPiece
PERMUTATIONS = 200


@pytest.fixture(scope="module")
def run(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("seed_experiments")
    experiments = [se.seed_prompts()[0], EQUAL]
    result = se.run(out, models=("minilm-l6",), experiments=experiments, loader=lambda name: minilm,
                    n_permutations=PERMUTATIONS, progress=None)
    return out, result


def test_seed_prompts_are_the_readme_pairs():
    one, two = se.seed_prompts()
    assert (one.name, one.a, one.b) == ("exp1", "the sky is blue", "run a self-meta-cognitive diagnostic")
    assert (two.name, two.a, two.b) == ("exp2", "Tell me a very simple short story.",
                                         "Explain the core idea behind quantum entanglement.")


def test_files_written(run):
    out, _ = run
    folder = out / "minilm-l6"
    for stem in ("exp1", "exp3"):
        for name in ("simple.grid.png", "complex.grid.png", "delta_norm_entropy.png", "metrics.simple.csv",
                     "metrics.complex.csv", "deltas.csv", "deltas.md", "layers.csv", "layers.md"):
            path = folder / f"{stem}.{name}"
            assert path.is_file() and path.stat().st_size > 0, path
    for name in ("kv_similarity.csv", "kv_similarity.layers.csv", "kv_similarity.layers.md",
                 "kv_similarity.js.kept.png", "kv_similarity.js.dropped.png"):
        assert (folder / name).is_file(), name
    for name in ("experiments.csv", "experiments.md", "kv_summary.csv", "kv_summary.md", "summary.json"):
        assert (out / name).is_file(), name
    for png in folder.glob("*.png"):
        assert png.stat().st_size < 400_000, png
    assert json.loads((out / "summary.json").read_text())["stands_in_for"] == {"minilm-l6": "bert-base-uncased"}


def test_unequal_token_counts_compare_metrics_only(run):
    out, result = run
    folder = out / "minilm-l6"
    summary = pd.read_csv(out / "experiments.csv").set_index("experiment")
    # Experiment 1: 6 vs 10 WordPiece tokens ([CLS] and [SEP] included): no position-by-position difference
    assert (summary.loc["exp1", "tokens_a"], summary.loc["exp1", "tokens_b"]) == (6, 10)
    assert not summary.loc["exp1", "difference"]
    assert not (folder / "exp1.difference.grid.png").exists() and not (folder / "exp1.comparison.png").exists()
    assert result["results"][0].difference is None
    # equal counts: the difference cube B - A and its figures exist
    assert (summary.loc["exp3", "tokens_a"], summary.loc["exp3", "tokens_b"]) == (6, 6)
    assert summary.loc["exp3", "difference"]
    assert (folder / "exp3.difference.grid.png").is_file() and (folder / "exp3.comparison.png").is_file()
    equal = result["results"][1]
    torch.testing.assert_close(equal.difference.pattern, equal.cubes[1].pattern - equal.cubes[0].pattern)


@pytest.mark.parametrize("experiment", [se.seed_prompts()[0], EQUAL], ids=["exp1", "exp3"])
def test_deltas_are_b_minus_a_of_separate_head_metrics(run, minilm, experiment):
    out, _ = run
    model, tokenizer, spec = minilm
    with torch.no_grad():
        a, b = (head_metrics(capture_prompt(model, tokenizer, p, spec=spec))
                for p in (experiment.a, experiment.b))
    metrics = metric_columns(a)
    deltas = pd.read_csv(out / "minilm-l6" / f"{experiment.name}.deltas.csv")
    assert list(deltas.columns) == ["layer", "head", "kv_group", *metrics]
    assert len(deltas) == spec.num_layers * spec.num_heads == 72
    expected = (b.set_index(["layer", "head"])[metrics] - a.set_index(["layer", "head"])[metrics])
    got = deltas.set_index(["layer", "head"])[metrics]
    # the CSV keeps 6 significant digits (se.CSV_DIGITS)
    np.testing.assert_allclose(got.to_numpy(float), expected.loc[got.index].to_numpy(float), rtol=1e-5, atol=1e-9)

    layers = pd.read_csv(out / "minilm-l6" / f"{experiment.name}.layers.csv")
    assert list(layers.columns) == ["layer", "metric", "mean_a", "mean_b", "delta", "mean_abs_delta"]
    assert len(layers) == spec.num_layers * len(metrics)
    entropy = layers[layers["metric"] == "norm_entropy"].set_index("layer")
    np.testing.assert_allclose(entropy["delta"], expected["norm_entropy"].groupby(level="layer").mean(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(entropy["mean_b"] - entropy["mean_a"], entropy["delta"], rtol=1e-5, atol=1e-6)

    markdown = (out / "minilm-l6" / f"{experiment.name}.deltas.md").read_text().splitlines()
    assert markdown[0] == "| " + " | ".join(["layer", "head", "kv_group", *se.KEY_METRICS]) + " |"
    assert len(markdown) == 2 + 72


def test_kv_tables(run):
    out, result = run
    pooled = pd.read_csv(out / "minilm-l6" / "kv_similarity.layers.csv")
    assert len(pooled) == 6 * 3 * 2
    assert set(pooled["grouping"]) == {"pseudo"} and set(pooled["group_size"]) == {3}
    np.testing.assert_allclose(pooled["within"] - pooled["across"], pooled["gap"], atol=2e-6)
    assert ((pooled["p_value"] > 0) & (pooled["p_value"] <= 1)).all()
    # the pooled within/across are the means over the 4 prompts of each prompt's own values
    per_prompt = pd.read_csv(out / "minilm-l6" / "kv_similarity.csv")
    # "the sky is blue" is in two experiments and counts once
    assert sorted(per_prompt["prompt"].unique()) == ["run a self-meta-cognitive diagnostic", "the grass is green",
                                                     "the sky is blue"]
    assert len(per_prompt) == 3 * 6 * 3 * 2 and set(pooled["n_prompts"]) == {3}
    means = per_prompt.groupby(["layer", "measure", "first_token"])[["within", "across"]].mean()
    joined = pooled.set_index(["layer", "measure", "first_token"])[["within", "across"]]
    np.testing.assert_allclose(joined.to_numpy(), means.loc[joined.index].to_numpy(), atol=2e-6)

    summary = pd.read_csv(out / "kv_summary.csv")
    assert len(summary) == 6 and set(summary["attention_kind"]) == {"MHA"}
    layer_means = pooled.groupby(["measure", "first_token"])["gap"].mean()
    np.testing.assert_allclose(summary.set_index(["measure", "first_token"])["gap"],
                               layer_means.loc[list(zip(summary["measure"], summary["first_token"]))], atol=2e-6)
    assert (summary["n_permutations"] == PERMUTATIONS).all()


def test_group_gap_over_layers_by_hand():
    groups = torch.tensor([0, 0, 1, 1])
    same = groups[:, None] == groups[None, :]
    one_layer = torch.where(same, 0.9, 0.1).double()
    result = group_gap(torch.stack([one_layer, one_layer]), groups, n_permutations=3000, seed=1)
    assert result["within"] == pytest.approx(0.9) and result["between"] == pytest.approx(0.1)
    assert result["gap"] == pytest.approx(0.8)
    # 3 ways to split 4 heads into two pairs; the observed gap needs the true split in both layers: 1/9
    assert result["p_value"] == pytest.approx(1 / 9, abs=0.03)
    flat = group_gap(torch.full((2, 4, 4), 0.5, dtype=torch.float64), groups, n_permutations=100)
    assert flat["gap"] == pytest.approx(0.0) and flat["p_value"] == 1.0


def test_control_pair_has_equal_token_counts(minilm):
    _, tokenizer, _ = minilm
    counts = [len(tokenizer(p)["input_ids"]) for p in (se.CONTROL.a, se.CONTROL.b)]
    assert counts == [10, 10]
