"""run_atlas: tables against per-prompt references, resume, shards, bad input; ranks and the run's progress."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from llm_heatmap.analyses.atlas.run import TABLES, run_atlas
from llm_heatmap.analyses.similarity.kv_similarity import head_distributions
from llm_heatmap.analyses.similarity.divergence import js_divergence_matrix
from llm_heatmap.analyses.heads.metrics import head_metrics
from llm_heatmap.analyses.runs.progress import RunProgress
from llm_heatmap.analyses.runs.prompts import Prompt
from llm_heatmap.analyses.runs.ranks import Ranks, launcher_ranks
from llm_heatmap.errors import InputError
from llm_heatmap.probes import capture_prompt
from llm_heatmap.viz.atlas import atlas_view

PROMPTS = [Prompt("a", "the cat sat on the mat", "simple"), Prompt("b", "a b a b a b c", "repeat"),
           Prompt("c", "entropy rises; order falls.", None), Prompt("d", "one two three four", "simple"),
           Prompt("e", "x y z x y z", "repeat")]
FAST = dict(n_resamples=200, n_permutations=50, probe_length=8, quiet=True)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return tiny_gguf


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory):
    return run_atlas({"tiny": tiny}, PROMPTS, tmp_path_factory.mktemp("whole"), top_k=2, **FAST)


def test_tables_match_per_prompt_references(tiny, whole):
    model, tokenizer, spec = tiny
    tables = whole.tables
    assert set(tables) == set(TABLES) and whole.computed == {"tiny": list("abcde")}
    for name, path in whole.files.items():
        pd.testing.assert_frame_equal(pd.read_parquet(path), tables[name])
    prompt_heads = tables["prompt_heads"]
    assert len(prompt_heads) == len(PROMPTS) * 8 and list(prompt_heads.columns[:5]) == [
        "model", "prompt_id", "group", "prompt", "n_tokens"]
    divergences = []
    for prompt in PROMPTS:
        cube = capture_prompt(model, tokenizer, prompt.text, spec=spec)
        reference = head_metrics(cube)
        rows = prompt_heads[prompt_heads["prompt_id"] == prompt.id].reset_index(drop=True)
        assert (rows["n_tokens"] == cube.num_keys).all()
        pd.testing.assert_frame_equal(rows[reference.columns], reference, check_dtype=False)
        divergences.append(js_divergence_matrix(head_distributions(cube)).numpy())
    np.testing.assert_allclose(whole.distances["tiny"], np.mean(divergences, 0), atol=1e-7)
    distances = tables["head_distances"]
    np.testing.assert_allclose(distances["divergence"].to_numpy().reshape(8, 8), whole.distances["tiny"])
    np.testing.assert_allclose(distances["similarity"], 1 - distances["divergence"] / math.log(2))
    heads = tables["heads"]
    means = prompt_heads.groupby(["layer", "head"])[["entropy", "induction_score"]].mean()
    np.testing.assert_allclose(heads["entropy_mean"], means["entropy"])
    np.testing.assert_allclose(heads["induction_score_mean"], means["induction_score"])
    rates = prompt_heads.groupby(["layer", "head"])["sink_head"].mean()
    np.testing.assert_allclose(heads["sink_head_rate"], rates)
    assert (heads["entropy_low"] <= heads["entropy_mean"]).all() and (heads["entropy_mean"] <= heads["entropy_high"]).all()
    assert {"probe_induction_score", "probe_previous_token_score", "map_x", "map_y", "cluster_rank"} <= set(heads.columns)
    assert sorted(heads["cluster_rank"]) == list(range(8))
    layers, models = tables["layers"], tables["models"]
    assert len(layers) == 2 and (layers["grouping"] == "kv").all() and (layers["group_size"] == 2).all()
    np.testing.assert_allclose(layers["gap_mean"], tables["prompt_layers"].groupby("layer")["gap"].mean())
    assert models["summary"].item() == spec.summary and models["n_prompts"].item() == 5
    top = tables["top_prompts"]
    for (layer, head, metric), group in top.groupby(["layer", "head", "metric"]):
        values = prompt_heads[(prompt_heads["layer"] == layer) & (prompt_heads["head"] == head)].set_index("prompt_id")[metric]
        assert group["value"].tolist() == sorted(values.dropna(), reverse=True)[:2]
        for prompt_id in group["prompt_id"]:
            picture = whole.thumbnails["tiny"][prompt_id, layer, head]
            tokens = int(prompt_heads.loc[prompt_heads["prompt_id"] == prompt_id, "n_tokens"].iloc[0])
            assert picture.dtype == np.uint8 and picture.shape == (min(tokens, 16),) * 2
            lower = np.tril_indices(len(picture))
            assert (np.triu(picture, 1) == 0).all() and (picture[lower] > 0).all()  # causal: empty above the diagonal


def test_interrupt_then_resume(tiny, whole, tmp_path):
    done = []

    def stop_after_two(model, prompt):
        done.append(prompt.id)
        if len(done) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_atlas({"tiny": tiny}, PROMPTS, tmp_path, top_k=2, on_prompt=stop_after_two, **FAST)
    assert not any((tmp_path / f"{name}.parquet").exists() for name in TABLES)
    with pytest.raises(InputError, match="already holds an atlas .*pass resume=True"):
        run_atlas({"tiny": tiny}, PROMPTS, tmp_path, top_k=2, **FAST)
    calls = []
    resumed = run_atlas({"tiny": tiny}, PROMPTS, tmp_path, top_k=2, resume=True,
                        on_prompt=lambda model, prompt: calls.append(prompt.id), **FAST)
    assert calls == ["c", "d", "e"] and resumed.skipped == {"tiny": ["a", "b"]}
    for name in TABLES:
        pd.testing.assert_frame_equal(resumed.tables[name], whole.tables[name])
    with pytest.raises(InputError, match=r"other settings \(measure differ\)"):
        run_atlas({"tiny": tiny}, PROMPTS, tmp_path, measure="hellinger", resume=True, **FAST)
    with pytest.raises(InputError, match="prompt 'a' changed"):
        run_atlas({"tiny": tiny}, [Prompt("a", "something else")], tmp_path, resume=True, **FAST)


def test_shards_write_parts_and_a_resumed_run_merges_them_without_loading(tiny, whole, tmp_path):
    shards = [run_atlas({"tiny": tiny}, PROMPTS, tmp_path, top_k=2, shard=(i, 2), **FAST) for i in range(2)]
    assert shards[0].computed == {"tiny": ["a", "c", "e"]} and shards[1].computed == {"tiny": ["b", "d"]}
    assert all(s.tables is None for s in shards) and not (tmp_path / "heads.parquet").exists()
    assert sorted(p.name for p in tmp_path.glob("atlas*.json")) == ["atlas.shard-0-of-2.json", "atlas.shard-1-of-2.json"]
    with pytest.raises(InputError, match="holds no tables"):
        shards[0].page_inputs()

    def no_loading(source):
        raise AssertionError(f"{source} loaded although every part is present")

    merged = run_atlas(["tiny"], PROMPTS, tmp_path, top_k=2, resume=True, loader=no_loading, **FAST)
    assert merged.computed == {"tiny": []}
    for name in TABLES:
        pd.testing.assert_frame_equal(merged.tables[name], whole.tables[name])


def test_hellinger_and_page_inputs(tiny, tmp_path):
    result = run_atlas({"tiny": tiny}, PROMPTS[:3], tmp_path, measure="hellinger", **FAST)
    assert (result.tables["head_distances"]["measure"] == "hellinger").all()
    np.testing.assert_allclose(result.page_inputs()["similarity"]["tiny"], 1 - result.distances["tiny"])
    page = atlas_view(**result.page_inputs()).page
    assert "tiny" in page and "Bhattacharyya" in page


def test_bad_input_is_refused_before_anything_is_written(tiny, tmp_path):
    model, tokenizer, spec = tiny
    short = (model, tokenizer, replace(spec, max_positions=10))
    out = tmp_path / "out"
    with pytest.raises(InputError, match="prompt 'a' has 22 tokens but the model's context holds 10"):
        run_atlas({"tiny": short}, PROMPTS, out, **FAST)
    assert not out.exists() or not any(out.rglob("*.*"))
    cases = [
        (dict(measure="cosine"), "measure='cosine' is not known"),
        (dict(top_k=0), "top_k=0 must be a whole number of at least 1"),
        (dict(thumbnail_size=1), "thumbnail_size=1 must be"),
        (dict(confidence=1.5), "confidence=1.5 must lie between 0 and 1"),
        (dict(max_rows=0), "max_rows=0 must be"),
    ]
    for options, message in cases:
        with pytest.raises(InputError, match=message):
            run_atlas({"tiny": tiny}, PROMPTS, out, **{**FAST, **options})
    with pytest.raises(InputError, match="needs at least one prompt"):
        run_atlas({"tiny": tiny}, [], out, **FAST)
    with pytest.raises(InputError, match="prompt id 'a' is used twice"):
        run_atlas({"tiny": tiny}, [PROMPTS[0], PROMPTS[0]], out, **FAST)
    with pytest.raises(InputError, match="model 'x' is given twice"):
        run_atlas(["x", "x"], PROMPTS, out, **FAST)
    with pytest.raises(InputError, match="does not exist"):
        run_atlas(["./no/such/model"], PROMPTS, out, **FAST)
    assert not out.exists() or not any(out.rglob("*.*"))


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_the_importance_columns_are_each_heads_ablation_averaged_over_the_prompts(tiny, tmp_path, mode):
    """With `ablation`, each prompt's rows carry `head_ablation_rows`' changes and the head table their mean with an
    interval; mean ablation uses the head outputs averaged over every prompt of the run."""
    from llm_heatmap.analyses.importance.ablation import head_ablation_rows, mean_head_outputs
    from llm_heatmap.probes.capture import encode_prompt

    model, tokenizer, spec = tiny
    prompts = PROMPTS[:3]
    result = run_atlas({"tiny": tiny}, prompts, tmp_path, ablation=mode, **FAST)
    ids = [encode_prompt(tokenizer, p.text)[0] for p in prompts]
    means = mean_head_outputs(model, ids, spec) if mode == "mean" else None
    expected = np.mean([head_ablation_rows(model, i, spec=spec, means=means)["delta_log_prob"].to_numpy() for i in ids], 0)
    heads = result.tables["heads"].sort_values(["layer", "head"])
    np.testing.assert_allclose(heads["ablation_delta_log_prob_mean"].to_numpy(), expected, atol=1e-9)
    assert (heads["ablation_delta_log_prob_low"] <= heads["ablation_delta_log_prob_mean"] + 1e-12).all()
    with pytest.raises(InputError, match="ablation='median' is not an ablation mode"):
        run_atlas({"tiny": tiny}, prompts, tmp_path / "x", ablation="median", **FAST)


@pytest.mark.slow
def test_real_models_side_by_side(smollm2, minilm, tmp_path):
    prompts = [Prompt(str(i), text) for i, text in enumerate([
        "The cat sat on the mat.", "Explain the core idea behind quantum entanglement.",
        "Tell me a very simple short story.", "Heads that share a key might attend alike."])]
    result = run_atlas({"smollm2-135m": smollm2, "minilm-l6": minilm}, prompts, tmp_path, **FAST)
    heads, models = result.tables["heads"], result.tables["models"].set_index("model")
    assert heads.groupby("model").size().to_dict() == {"smollm2-135m": 270, "minilm-l6": 72}
    assert models.loc["smollm2-135m", "grouping"] == "kv" and models.loc["minilm-l6", "grouping"] == "pseudo"
    assert models.loc["minilm-l6", "group_size"] == 3  # SmolLM2's KV group size, as in kv-similarity
    # SmolLM2's heads rest on the first token far more than MiniLM's, over every prompt
    assert models.loc["smollm2-135m", "sink_score_no_q0_low"] > models.loc["minilm-l6", "sink_score_no_q0_high"]
    depth = heads.groupby("model")["depth"].agg(["min", "max"])
    np.testing.assert_allclose(depth.loc["smollm2-135m"], [0.5 / 30, 29.5 / 30])
    np.testing.assert_allclose(depth.loc["minilm-l6"], [0.5 / 6, 5.5 / 6])
    page = atlas_view(**result.page_inputs()).page
    assert "smollm2-135m" in page and "minilm-l6" in page


# ---- ranks and progress ----------------------------------------------------------------------------
def test_ranks_from_the_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_ranks() == Ranks()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launcher_ranks() == Ranks()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(InputError, match="WORLD_SIZE='two' is not a whole number"):
        launcher_ranks()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(InputError, match="RANK=2 of WORLD_SIZE=2, which is out of range"):
        launcher_ranks()
    ranks = Ranks(rank=1, world_size=3)
    assert ranks.share(range(8)) == [1, 4, 7] and not ranks.is_main and ranks.distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ranks.device() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert Ranks(rank=3, world_size=4, local_rank=3).device() == "cuda:1" and Ranks().device() is None
    Ranks().barrier()  # one process: nothing to wait for


def test_progress_counts_every_ranks_part_files(tmp_path):
    paths = [tmp_path / "m" / f"{i}.parquet" for i in range(6)]
    (tmp_path / "m").mkdir()
    paths[0].write_text("done before the run")
    (tmp_path / "m" / "0.safetensors").write_text("not a part")
    stream = io.StringIO()
    with RunProgress(paths, enabled=True, desc="atlas", interval=60, file=stream) as progress:
        assert progress.bar.n == 1
        for path in paths[1:4]:  # written by any rank
            path.write_text("x")
        progress.refresh()
        assert progress.bar.n == 4
    assert "4/6" in stream.getvalue() and "atlas" in stream.getvalue()
    silent = RunProgress(paths, enabled=False)
    with silent:
        pass
    assert silent.bar is None
