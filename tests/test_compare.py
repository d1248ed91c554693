"""Comparisons: two prompts (deltas, difference cube) and two prompt sets (bootstrap, permutation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from llm_heatmap.analyses.compare import compare_cubes, compare_groups, compare_sets, difference_cube, metric_deltas, select_metrics
from llm_heatmap.analyses.stats import bh_adjust, paired_statistics, set_statistics
from llm_heatmap.errors import InputError
from eager_reference import eager_cube


# ---- set statistics --------------------------------------------------------------------------
def test_hand_checkable_case():
    # A = {0, 1}, B = {2, 3}: delta 2. Of the 6 ways to label two of four values "A", two give
    # |delta*| = 2 ({0,1} and {2,3}), so the exact p-value is 1/3. Bootstrap means of A lie in
    # {0, .5, 1} (probabilities 1/4, 1/2, 1/4), of B in {2, 2.5, 3}; the smallest and largest
    # delta (1 and 3) each have probability 1/16 > 2.5%, so the 95% interval is [1, 3].
    result = set_statistics(np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]]))
    assert result["delta"][0] == 2.0
    assert result["p_value"][0] == pytest.approx(1 / 3)
    assert (result["ci_low"][0], result["ci_high"][0]) == (1.0, 3.0)
    assert (result["mean_a"][0], result["mean_b"][0]) == (0.5, 2.5)


def test_paired_hand_checkable_case():
    # pair differences 1 and 3: delta 2; of the 4 sign flips (+-1, +-3) the means are 2, 1, -1, -2,
    # so p = 2/4; resampling two pairs gives means 1, 2, 3 with probabilities 1/4, 1/2, 1/4.
    result = paired_statistics(np.array([[0.0], [0.0]]), np.array([[1.0], [3.0]]))
    assert result["delta"][0] == 2.0 and result["p_value"][0] == 0.5
    assert (result["ci_low"][0], result["ci_high"][0]) == (1.0, 3.0)
    # a consistent within-pair shift that a between-set test would drown in pair-to-pair spread
    rng = np.random.default_rng(0)
    base = rng.normal(0, 5, size=(12, 1))
    shifted = base + 1 + rng.normal(0, 0.1, size=(12, 1))
    assert paired_statistics(base, shifted)["p_value"][0] < 0.01  # only the all-+ and all-- flips reach it
    assert set_statistics(base, shifted)["p_value"][0] > 0.1


def test_compare_sets_with_pairs():
    rng = np.random.default_rng(5)
    a = _synthetic(6, 0.0, rng, "a")
    b = a.assign(prompt_id=a["prompt_id"].str.replace("a", "b"), entropy=a["entropy"] + 0.2)
    pairs = [(f"a{k}", f"b{k}") for k in range(6)]
    heads = compare_sets(a, b, pairs=pairs, n_permutations=100).heads.set_index(["metric", "layer", "head"])
    assert heads.loc["entropy", "delta"].to_numpy() == pytest.approx(0.2)
    assert (heads.loc["entropy", "p_value"] == 2 / 64).all()  # 2^6 = 64 flips enumerated; only +-all extreme
    with pytest.raises(InputError, match="prompt id 'b9'"):
        compare_sets(a, b, pairs=[("a0", "b9")])


def test_monte_carlo_p_value_matches_exact():
    x_a, x_b = np.array([[0.0], [1.0], [4.0]]), np.array([[2.0], [3.0], [5.0]])
    exact = set_statistics(x_a, x_b)["p_value"][0]  # C(6, 3) = 20 splits, enumerated
    sampled = set_statistics(x_a, x_b, n_permutations=10, seed=3)  # 20 > 10: random relabellings
    many = set_statistics(x_a, x_b, n_permutations=19, seed=3)
    assert exact == pytest.approx(sum(abs(d) >= 5 / 3 - 1e-12 for d in _all_split_deltas(x_a, x_b)) / 20)
    assert 0 < sampled["p_value"][0] <= 1 and 0 < many["p_value"][0] <= 1
    mc = set_statistics(np.tile(x_a, (3, 1)), np.tile(x_b, (3, 1)), n_permutations=20000, seed=1)["p_value"][0]
    brute = _brute_p(np.tile(x_a, (3, 1)), np.tile(x_b, (3, 1)))
    assert mc == pytest.approx(brute, abs=0.01)


def _all_split_deltas(x_a, x_b):
    import itertools

    pooled = np.concatenate([x_a[:, 0], x_b[:, 0]])
    n = len(pooled)
    for members in itertools.combinations(range(n), len(x_a)):
        mask = np.zeros(n, bool)
        mask[list(members)] = True
        yield pooled[~mask].mean() - pooled[mask].mean()


def _brute_p(x_a, x_b):
    observed = abs(x_b.mean() - x_a.mean())
    deltas = np.array(list(_all_split_deltas(x_a, x_b)))
    return float(np.mean(np.abs(deltas) >= observed - 1e-12))


def test_nan_entries_are_left_out():
    x_a = np.array([[0.0, 1.0], [1.0, np.nan]])
    x_b = np.array([[2.0, np.nan], [3.0, np.nan]])
    result = set_statistics(x_a, x_b)
    assert result["delta"][0] == 2.0 and result["p_value"][0] == pytest.approx(1 / 3)
    assert np.isnan(result["delta"][1]) and np.isnan(result["p_value"][1])
    assert list(result["n_a"]) == [2, 1] and list(result["n_b"]) == [2, 0]


def test_column_blocks_do_not_change_results(monkeypatch):
    from llm_heatmap.analyses import stats

    rng = np.random.default_rng(3)
    x_a, x_b = rng.normal(size=(7, 300)), rng.normal(0.3, size=(9, 300))
    x_a[2, 5] = np.nan
    whole = set_statistics(x_a, x_b, n_resamples=300, n_permutations=300)
    blocks = stats.column_blocks
    monkeypatch.setattr(stats, "column_blocks", lambda columns, rows: blocks(columns, rows, budget=rows * 7))
    assert len(stats.column_blocks(300, 300)) == 43
    split = set_statistics(x_a, x_b, n_resamples=300, n_permutations=300)
    for name in whole:
        np.testing.assert_array_equal(whole[name], split[name])


def test_bh_adjust_matches_definition():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    q = bh_adjust(p)
    # sorted 0.01, 0.03, 0.04, 0.2 (m = 4): 0.04, min(0.06, 0.0533), 0.0533, 0.2
    assert q[:4] == pytest.approx([0.04, 4 * 0.04 / 3, 4 * 0.04 / 3, 0.2])
    assert np.isnan(q[4])


def _synthetic(n_prompts, effect, rng, name, heads=None):
    heads = heads or [(l, h) for l in range(4) for h in range(6)]
    rows = []
    for k in range(n_prompts):
        for layer, head in heads:
            shift = effect if (layer, head) == (1, 2) else 0.0
            rows.append({"prompt_id": f"{name}{k}", "layer": layer, "head": head, "kv_group": head // 3,
                         "entropy": rng.normal(1.0 + shift, 0.3), "sink": rng.uniform(), "pattern": "block"})
    return pd.DataFrame(rows)


def test_known_effect_is_found():
    rng = np.random.default_rng(0)
    result = compare_sets(_synthetic(12, 0.0, rng, "a"), _synthetic(12, 1.0, rng, "b"), n_resamples=1000,
                          n_permutations=1000)
    heads = result.heads.set_index(["metric", "layer", "head"])
    hit = heads.loc[("entropy", 1, 2)]
    assert hit["delta"] == pytest.approx(1.0, abs=0.3)
    assert hit["p_value"] < 0.01 and hit["ci_low"] > 0
    assert hit["q_value"] < 0.05
    assert hit["kv_group"] == 0 and hit["n_a"] == 12 and hit["n_b"] == 12
    assert set(result.heads["metric"]) == {"entropy", "sink"}  # the string column is not a metric
    layer = result.layers.set_index(["metric", "layer"]).loc[("entropy", 1)]
    assert layer["delta"] == pytest.approx(hit["delta"] / 6 + np.mean(
        [heads.loc[("entropy", 1, h), "delta"] for h in range(6) if h != 2]) * 5 / 6)
    assert layer["ci_low"] > 0


def test_no_effect_gives_uniform_p_and_covering_intervals():
    rng = np.random.default_rng(1)
    heads = [(l, h) for l in range(10) for h in range(30)]
    result = compare_sets(_synthetic(10, 0.0, rng, "a", heads), _synthetic(10, 0.0, rng, "b", heads),
                          metrics=["entropy", "sink"], n_resamples=500, n_permutations=500, seed=2)
    p = result.heads["p_value"].to_numpy()
    assert stats.kstest(p, "uniform").pvalue > 0.001
    assert 0.02 < np.mean(p < 0.05) < 0.09
    covers = (result.heads["ci_low"] <= 0) & (result.heads["ci_high"] >= 0)
    assert 0.88 < covers.mean() < 0.98  # a percentile bootstrap at n=10 is a little narrow


def test_seeded_and_vectorised_shapes():
    rng = np.random.default_rng(4)
    a, b = _synthetic(5, 0.0, rng, "a"), _synthetic(6, 0.5, rng, "b")
    first = compare_sets(a, b, n_resamples=200, n_permutations=200, seed=7)
    second = compare_sets(a, b, n_resamples=200, n_permutations=200, seed=7)
    pd.testing.assert_frame_equal(first.heads, second.heads)
    assert len(first.heads) == 4 * 6 * 2 and len(first.layers) == 4 * 2
    grouped = compare_groups(pd.concat([a.assign(group="simple"), b.assign(group="complex")]), "simple", "complex",
                             n_resamples=200, n_permutations=200, seed=7)
    pd.testing.assert_frame_equal(grouped.heads, first.heads)
    with pytest.raises(InputError, match="group 'hard' has no prompts"):
        compare_groups(a.assign(group="simple"), "simple", "hard")


def test_unknown_metric_lists_valid_names():
    table = pd.DataFrame({"layer": [0], "head": [0], "kv_group": [0], "entropy": [1.0], "flag": [True]})
    assert select_metrics(table) == ["entropy"]
    with pytest.raises(InputError, match="metric 'entropi' does not exist; valid metrics are: entropy."):
        select_metrics(table, ["entropi"])


# ---- two prompts -----------------------------------------------------------------------------
def test_metric_deltas_join_on_layer_and_head():
    a = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "kv_group": [0, 0, 0], "entropy": [1.0, 2.0, 3.0]})
    b = a.iloc[::-1].assign(entropy=[30.0, 20.0, 10.0])  # same heads, other order
    deltas = metric_deltas(a, b)
    assert list(deltas.columns) == ["layer", "head", "kv_group", "metric", "a", "b", "delta"]
    assert deltas["delta"].tolist() == [9.0, 18.0, 27.0]
    with pytest.raises(InputError, match="different \\(layer, head\\) pairs"):
        metric_deltas(a, b.iloc[:2])


@pytest.mark.slow
def test_compare_seed_experiment_2_on_smollm2(smollm2_eager):
    spec = smollm2_eager[2]
    simple = eager_cube(smollm2_eager, "Tell me a very simple short story.")
    complex_ = eager_cube(smollm2_eager, "Explain the core idea behind quantum entanglement.")
    assert simple.num_keys == complex_.num_keys == 8  # the seed's point: same length, different difficulty
    result = compare_cubes(simple, complex_)
    assert result.difference.pattern.shape == simple.pattern.shape
    torch.testing.assert_close(result.difference.pattern, complex_.pattern - simple.pattern)
    # difference of two row-stochastic patterns: every row sums to 0
    torch.testing.assert_close(result.difference.pattern.sum(-1), torch.zeros(simple.pattern.shape[:-1]),
                               atol=1e-5, rtol=0)
    assert len(result.table_a) == spec.num_layers * spec.num_heads
    wide = result.wide()
    metric = select_metrics(result.table_a)[0]
    expected = result.table_b.set_index(["layer", "head"])[metric] - result.table_a.set_index(["layer", "head"])[metric]
    got = wide.set_index(["layer", "head"])[metric]
    np.testing.assert_allclose(got.loc[expected.index].to_numpy(), expected.to_numpy(), equal_nan=True)


@pytest.mark.slow
def test_different_token_counts(minilm_eager):
    # the seed's 8-token pair is not length-matched under BERT's WordPiece: "entanglement" is 3 pieces
    a = eager_cube(minilm_eager, "Tell me a very simple short story.")
    b = eager_cube(minilm_eager, "Explain the core idea behind quantum entanglement.")
    with pytest.raises(InputError, match=r"prompt A has 10 tokens and prompt B has 12.*metrics_only=True"):
        compare_cubes(a, b)
    with pytest.raises(InputError, match="metrics_only"):
        difference_cube(a, b)
    result = compare_cubes(a, b, metrics_only=True)
    assert result.difference is None
    assert len(result.deltas) == len(result.table_a) * len(select_metrics(result.table_a))


@pytest.mark.slow
def test_kv_report_gqa_and_mha_in_one_table(smollm2, minilm):
    from llm_heatmap.analyses.similarity.kv_report import kv_report

    # MHA listed first: it waits for the GQA model's group size (3) before it is measured
    report = kv_report({"minilm": minilm, "smollm2": smollm2}, ["the sky is blue"], measures=["js"],
                       n_permutations=50)
    layers = report.layers
    assert list(pd.unique(layers["model"])) == ["minilm", "smollm2"]
    assert layers.groupby("model")["grouping"].unique().map(list).to_dict() == {"minilm": ["pseudo"], "smollm2": ["kv"]}
    assert (layers["group_size"] == 3).all()
    assert len(layers) == (6 + 30) * 2  # layers x first-token handling, one measure, one prompt
    np.testing.assert_allclose(layers["gap"], layers["within"] - layers["between"])
    summary = report.summary.set_index(["model", "first_token"])
    mean_gap = layers[(layers["model"] == "smollm2") & (layers["first_token"] == "kept")]["gap"].mean()
    assert summary.loc[("smollm2", "kept"), "gap"] == pytest.approx(mean_gap)
    assert summary.loc[("minilm", "kept"), "attention_kind"] == "MHA"
    alone = kv_report({"minilm": minilm}, ["the sky is blue"], measures=["js"], n_permutations=20, pseudo_group_size=4)
    assert (alone.layers["group_size"] == 4).all()
    with pytest.raises(InputError, match="at least one prompt"):
        kv_report({"minilm": minilm}, [])


def test_bootstrap_means_one_sample():
    from llm_heatmap.analyses.stats import bootstrap_means

    rng = np.random.default_rng(0)
    normal = rng.normal(2.0, 3.0, size=400)
    x = np.column_stack([np.full(400, 0.25), np.full(400, np.nan), normal])
    x[:100, 0] = np.nan
    result = bootstrap_means(x, n_resamples=4000, seed=1)
    assert result["n"].tolist() == [300, 0, 400]
    assert (result["mean"][0], result["ci_low"][0], result["ci_high"][0]) == (0.25, 0.25, 0.25)
    assert np.isnan([result["mean"][1], result["ci_low"][1], result["ci_high"][1]]).all()
    # a large normal sample: the percentile interval is close to mean -/+ 1.96 standard errors
    half = 1.96 * normal.std(ddof=1) / np.sqrt(400)
    assert result["mean"][2] == pytest.approx(normal.mean())
    assert result["ci_low"][2] == pytest.approx(normal.mean() - half, abs=0.1 * half)
    assert result["ci_high"][2] == pytest.approx(normal.mean() + half, abs=0.1 * half)
    again = bootstrap_means(x, n_resamples=4000, seed=1)
    assert all(np.array_equal(result[k], again[k], equal_nan=True) for k in result)
    with pytest.raises(InputError, match="at least one prompt"):
        bootstrap_means(np.zeros((0, 3)))


def test_split_groups_reads_two_sets_and_pairs_from_one_file():
    from llm_heatmap.analyses.compare import split_groups

    ids = ["s1", "c1", "s2", "c2", "x"]
    fields = [{"group": "simple", "pair": "1"}, {"group": "complex", "pair": "1"}, {"group": "simple", "pair": "2"},
              {"group": "complex", "pair": "2"}, {"group": "other", "pair": None}]
    assert split_groups(ids, fields[:4], "group") == (["s1", "s2"], ["c1", "c2"], None)
    assert split_groups(ids, fields, "group", ["complex", "simple"], "pair") == (["c1", "c2"], ["s1", "s2"],
                                                                                [("c1", "s1"), ("c2", "s2")])
    with pytest.raises(InputError, match="3 groups"):
        split_groups(ids, fields, "group")
    with pytest.raises(InputError, match="not two of the file's groups"):
        split_groups(ids, fields, "group", ["simple", "hard"])
    broken = fields[:3] + [{"group": "complex", "pair": "3"}]
    with pytest.raises(InputError, match="pair '2' holds 1 prompt"):
        split_groups(ids[:4], broken, "group", None, "pair")


def test_prompt_fields_of_the_shipped_pairs_file():
    from llm_heatmap.analyses.runs.prompts import prompt_fields, read_prompts

    path = Path(__file__).parents[1] / "experiments" / "data" / "length_matched_pairs.jsonl"
    fields = prompt_fields(path, ["group", "pair"])
    assert len(fields) == len(read_prompts(path)) == 16 and fields[0] == {"group": "simple", "pair": "1"}
    with pytest.raises(InputError, match="no field or column 'pairs'"):
        prompt_fields(path, ["pairs"])


def test_set_comparison_is_a_resumable_run_giving_the_tables_compare_sets_gives(tiny_gguf, tmp_path):
    """`run_set_comparison` measures both sets through the run engine; its statistics are `compare_sets` of the
    per-prompt tables measured directly, and a resumed run measures only the prompts whose parts are missing."""
    from llm_heatmap.analyses.compare import run_set_comparison
    from llm_heatmap.analyses.heads.measure import stream_head_metrics
    from llm_heatmap.analyses.runs.engine import RunOptions
    from llm_heatmap.analyses.runs.prompts import Prompt

    model, tokenizer, spec = tiny_gguf
    set_a = [Prompt(str(i), text) for i, text in enumerate(["the sky is blue", "cats sleep a lot", "rain falls"])]
    set_b = [Prompt(str(i), text) for i, text in enumerate(["prove the theorem", "define an integral"])]
    statistics = dict(metrics=["norm_entropy"], n_resamples=100, n_permutations=50, seed=3)
    result = run_set_comparison(model, tokenizer, set_a, set_b, tmp_path, spec=spec, **statistics)

    def direct(name, prompts):
        tables = [stream_head_metrics(model, tokenizer, p.text, spec=spec).assign(prompt_id=f"{name}:{p.id}")
                  for p in prompts]
        return pd.concat(tables, ignore_index=True)

    expected = compare_sets(direct("A", set_a), direct("B", set_b), **statistics)
    pd.testing.assert_frame_equal(result.heads, expected.heads, rtol=1e-6)
    pd.testing.assert_frame_equal(result.layers, expected.layers, rtol=1e-6)
    rows = pd.read_parquet(tmp_path / "sets.parquet")
    assert rows.groupby("group")["prompt_id"].nunique().to_dict() == {"A": 3, "B": 2}

    with pytest.raises(InputError, match="resume=True"):
        run_set_comparison(model, tokenizer, set_a, set_b, tmp_path, spec=spec, **statistics)
    parts = sorted((tmp_path / "parts").glob("*.parquet"))
    assert len(parts) == 5
    kept = {path: path.stat().st_mtime_ns for path in parts[1:]}
    parts[0].unlink()  # an interrupted run: one prompt's part missing
    again = run_set_comparison(model, tokenizer, set_a, set_b, tmp_path, spec=spec, run=RunOptions(resume=True),
                               **statistics)
    assert {path: path.stat().st_mtime_ns for path in parts[1:]} == kept and parts[0].exists()
    pd.testing.assert_frame_equal(again.heads, result.heads, rtol=1e-6)


def test_kv_report_is_a_resumable_run_that_knows_the_group_size_before_loading(tmp_path, monkeypatch):
    """Sources are loaded one at a time by the run engine; an MHA source listed before a GQA one gets the GQA
    model's group size, read from the GQA model's file before either loads; a resumed run measures only the
    prompts whose parts are missing, and its rows equal `kv_group_similarity` of each prompt's cube."""
    from llm_heatmap.analyses.runs.engine import RunOptions
    from llm_heatmap.analyses.similarity.kv_report import kv_report
    from llm_heatmap.analyses.similarity.kv_similarity import kv_group_similarity
    from llm_heatmap.models import load_model
    from llm_heatmap.probes import capture_prompt
    from tiny_models import write_tiny_gguf

    monkeypatch.setenv("LLM_HEATMAP_CACHE", str(tmp_path / "cache"))
    mha = write_tiny_gguf(tmp_path / "mha.gguf", heads=4, kv_heads=4)
    gqa = write_tiny_gguf(tmp_path / "gqa.gguf", heads=4, kv_heads=2)
    loads = []

    def loader(source):
        loads.append(source)
        return load_model(source)

    prompts = ["the sky is blue", "cats sleep a lot"]
    options = dict(measures=["js"], n_permutations=20, loader=loader, out_dir=tmp_path / "kv")
    report = kv_report([mha, gqa], prompts, **options)
    assert loads == [mha, gqa] and (report.layers["group_size"] == 2).all()
    assert report.layers.groupby("model")["grouping"].first().to_dict() == {str(mha): "pseudo", str(gqa): "kv"}
    model, tokenizer, spec = load_model(gqa)
    direct = kv_group_similarity(capture_prompt(model, tokenizer, prompts[1], spec=spec), measures=["js"],
                                 n_permutations=20)
    mine = report.layers[(report.layers["model"] == str(gqa)) & (report.layers["prompt"] == prompts[1])]
    np.testing.assert_allclose(mine["gap"].to_numpy(), direct["gap"].to_numpy(), rtol=1e-6)

    with pytest.raises(InputError, match="resume=True"):
        kv_report([mha, gqa], prompts, **options)
    parts = sorted((tmp_path / "kv" / "parts").rglob("*.parquet"))
    assert len(parts) == 4
    parts[0].unlink()  # an interrupted run: one prompt of one model to do again
    loads.clear()
    again = kv_report([mha, gqa], prompts, run=RunOptions(resume=True), **options)
    assert len(loads) == 1 and parts[0].exists()
    pd.testing.assert_frame_equal(again.layers, report.layers)
