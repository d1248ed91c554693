"""Retrieval heads (Wu et al. 2024): the score on hand-made decode steps, the needle prompts, the decode rows
against eager generate(output_attentions=True), and the probe end to end on a tiny GGUF and on SmolLM2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llm_heatmap.analyses.bounds import check_needle_grid
from llm_heatmap.analyses.heads.needle import Needle, needle_prompt, rouge1_recall
from llm_heatmap.analyses.heads.retrieval_probe import (copy_steps, grid_scores, retrieval_head_scores,
                                                        run_score)
from llm_heatmap.errors import InputError

# prompt 0..6, answer span 1..4 = tokens 5 6 7 8; token 5 also sits outside the span at position 5
PROMPT = [1, 5, 6, 7, 8, 5, 9]
GENERATED = [5, 6, 3, 7, 8, 5]  # the last step copies token 5 a second time
SPAN = (1, 5)


def hand_case():
    sequence = torch.tensor(PROMPT + GENERATED)
    top_keys = torch.tensor([  # "s l h": one layer, four heads
        [[1, 1, 5, 0]],  # generates 5: head 0 and 1 on the answer's 5, head 2 on the 5 outside it
        [[2, 1, 5, 2]],  # generates 6: head 0 and 3 on the 6; head 1 still on the 5 (not this token)
        [[0, 1, 5, 3]],  # generates 3 (not in the answer): nobody copies, head 3 sits on a 7
        [[3, 1, 5, 3]],  # generates 7: head 0 and 3 on the 7
        [[4, 8, 5, 0]],  # generates 8: head 0 on the 8, head 1 on a generated position
        [[1, 1, 5, 1]],  # generates 5 again: head 0, 1 and 3 on the answer's 5
    ])
    return sequence, top_keys


def test_copy_steps_follow_the_definition():
    sequence, top_keys = hand_case()
    copies = copy_steps(top_keys, sequence, len(PROMPT), SPAN)
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 1], [1, 0, 0, 0], [1, 1, 0, 1]]).bool()
    assert torch.equal(copies[:, 0], expected)


def test_run_score_is_the_share_of_needle_positions_copied():
    sequence, top_keys = hand_case()
    copies = copy_steps(top_keys, sequence, len(PROMPT), SPAN)
    scores = run_score(top_keys, copies, SPAN)
    # head 0 copies all four positions (position 1 twice: a set, so still 4/4); head 1 position 1 only;
    # head 2 never (its 5 is outside the needle); head 3 positions 2, 3 and 1
    assert scores[0].tolist() == [1.0, 0.25, 0.0, 0.75]
    assert copies.sum(0)[0].tolist() == [5, 2, 0, 3]


def test_runs_that_do_not_recall_contribute_nothing():
    scores = torch.tensor([[[1.0, 0.5]], [[0.0, 0.0]], [[0.5, 0.25]]])  # "r l h"
    assert grid_scores(scores, torch.tensor([True, False, True])).tolist() == [[0.75, 0.375]]
    assert grid_scores(scores, torch.tensor([False, True, False])).tolist() == [[0.0, 0.0]]
    assert torch.isnan(grid_scores(scores, torch.tensor([False, False, False]))).all()


def test_rouge1_recall():
    assert rouge1_recall("eat a custard tart", "You should eat a Custard tart!") == 1.0
    assert rouge1_recall("eat a custard tart", "a tart") == 0.5
    assert rouge1_recall("a a b", "a b") == pytest.approx(2 / 3)  # words count with multiplicity
    assert rouge1_recall("eat a tart", "") == 0.0


def test_needle_checks():
    with pytest.raises(InputError, match="not part of its sentence"):
        Needle(sentence="The key is under the mat.", answer="behind the door", question="Where is the key?")
    with pytest.raises(InputError, match="0..1"):
        check_needle_grid([100], [1.5])
    with pytest.raises(InputError, match="too short"):
        check_needle_grid([10], [0.5])


@pytest.fixture(scope="module")
def tiny_byte_model(tmp_path_factory):
    """A tiny random Llama GGUF (2 layers, 4 heads on 2 KV heads) with a byte-level tokenizer and 512 positions,
    eager, with query and key weights scaled up so that every head has a clear most-attended key."""
    from llm_heatmap.models import load_model
    from tiny_models import write_tiny_gguf

    folder = tmp_path_factory.mktemp("tiny-retrieval")
    patch = pytest.MonkeyPatch()
    patch.setenv("LLM_HEATMAP_CACHE", str(folder / "cache"))
    try:
        model, tokenizer, spec = load_model(write_tiny_gguf(folder / "tiny.gguf", context=512), attn_implementation="eager")
    finally:
        patch.undo()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)
    return model, tokenizer, spec


def test_needle_prompt_locates_the_answer(tiny_byte_model):
    _, tokenizer, _ = tiny_byte_model
    needle = Needle()
    for depth in (0.0, 0.5, 1.0):
        cell = needle_prompt(tokenizer, 400, depth, needle, chat=False)
        assert tokenizer.decode(cell.input_ids[cell.answer_start:cell.answer_stop]) == needle.answer
        document = cell.prompt.split("\n\nBased on the text above")[0]
        assert needle.sentence in document and cell.prompt.endswith("\nAnswer:")
        assert abs(len(tokenizer(document, add_special_tokens=False)["input_ids"]) - 400) < 80
    starts = [needle_prompt(tokenizer, 400, d, needle, chat=False).prompt.index(needle.sentence) for d in (0.0, 0.5, 1.0)]
    assert starts[0] == 0 < starts[1] < starts[2]


def test_decode_rows_equal_eager_generate_steps(tiny_byte_model):
    """Each decode step's most-attended key (what the probe scores) equals eager generate(output_attentions=True)
    step by step."""
    from llm_heatmap.probes.decode import capture_decode

    model, tokenizer, spec = tiny_byte_model
    prompt = "The best thing to do in Lisbon is to eat a custard tart. Question: what is best?"
    steps = capture_decode(model, tokenizer, prompt, max_new_tokens=6, spec=spec, do_sample=False)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             output_attentions=True, return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
    assert torch.equal(steps.sequence, out.sequences[0])
    reference = torch.stack([torch.stack([layer[0, :, -1].argmax(-1) for layer in step]) for step in out.attentions])
    assert steps.top_keys().shape == (6, spec.num_layers, spec.num_heads)
    assert torch.equal(steps.top_keys(), reference)


def test_probe_end_to_end_on_a_tiny_model(tiny_byte_model):
    model, tokenizer, spec = tiny_byte_model
    seen = []
    counted = retrieval_head_scores(model, tokenizer, spec=spec, context_lengths=(120, 200), depths=(0.0, 1.0),
                                    max_new_tokens=8, min_recall=0.0, on_run=seen.append)
    assert len(counted.runs) == len(seen) == 4 and counted.runs["recalled"].all()  # min_recall 0 counts every run
    assert counted.run_scores.shape == (4, spec.num_layers, spec.num_heads)
    assert ((counted.run_scores >= 0) & (counted.run_scores <= 1)).all()
    assert len(counted.heads) == spec.num_layers * spec.num_heads
    assert np.allclose(counted.heads["probe_retrieval_score"], counted.run_scores.mean(0).reshape(-1))
    assert (counted.heads["probe_retrieval_copies"] == counted.run_copies.sum(0).reshape(-1)).all()
    assert set(counted.run_heads().columns) >= {"context_length", "depth", "layer", "head", "score"}
    # a random model does not recall the needle: with the default threshold no run counts
    strict = retrieval_head_scores(model, tokenizer, spec=spec, context_lengths=(120,), depths=(0.5,), max_new_tokens=8)
    assert not strict.runs["recalled"].any()
    assert strict.heads["probe_retrieval_score"].isna().all() and (strict.heads["probe_retrieval_copies"] == 0).all()


def test_probe_refuses_contexts_past_the_model(tiny_byte_model):
    model, tokenizer, spec = tiny_byte_model
    with pytest.raises(InputError, match="passes the model's 512 positions"):
        retrieval_head_scores(model, tokenizer, spec=spec, context_lengths=(600,), depths=(0.5,))
    with pytest.raises(InputError, match="min_recall"):
        retrieval_head_scores(model, tokenizer, spec=spec, context_lengths=(120,), depths=(0.5,), min_recall=2)


@pytest.mark.slow
def test_smollm2_recalls_the_needle_through_few_heads(smollm2):
    model, tokenizer, spec = smollm2
    result = retrieval_head_scores(model, tokenizer, spec=spec, context_lengths=(250,), depths=(0.5,))
    run = result.runs.iloc[0]
    assert run.recalled and run.recall == 1.0  # chat template by default; the answer copies the needle
    chosen = result.retrieval_heads(0.1)
    assert 0 < len(chosen) < 0.15 * len(result.heads)
    assert chosen["probe_retrieval_score"].iloc[0] > 0.5 and chosen["layer"].min() > spec.num_layers // 3
    assert math.isclose(result.heads["probe_retrieval_score"].max(), chosen["probe_retrieval_score"].iloc[0])


def test_atlas_writes_the_retrieval_columns(tiny_byte_model, tmp_path):
    from llm_heatmap.analyses.atlas.run import run_atlas
    from llm_heatmap.analyses.runs.prompts import Prompt

    model, tokenizer, spec = tiny_byte_model
    result = run_atlas({"tiny": tiny_byte_model}, [Prompt("a", "the cat sat", None), Prompt("b", "one two", None)],
                       tmp_path, retrieval_lengths=(120,), probe_length=4, n_resamples=50, n_permutations=10, quiet=True)
    heads = result.tables["heads"]
    direct = retrieval_head_scores(model, tokenizer, spec=spec, context_lengths=(120,)).heads
    for column in ("probe_retrieval_score", "probe_retrieval_copies"):
        np.testing.assert_array_equal(heads[column].to_numpy(), direct[column].to_numpy())
    assert "probe_induction_score" in heads.columns
    with pytest.raises(InputError, match="too short"):
        run_atlas({"tiny": tiny_byte_model}, [Prompt("a", "x", None)], tmp_path / "again", retrieval_lengths=(8,))


def run_cli(capsys, *args):
    from llm_heatmap.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("value, message", [("250,abc", "is not a list of context lengths"), ("250,10", "too short")])
def test_cli_refuses_bad_retrieval_lengths_before_loading(capsys, monkeypatch, tmp_path, value, message):
    monkeypatch.setattr("llm_heatmap.models.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    code, _, err = run_cli(capsys, "metrics", "the sky", "--retrieval-probe", value, "--out", tmp_path / "m.csv")
    assert code == 2 and message in err and err.count("\n") == 1 and not (tmp_path / "m.csv").exists()


@pytest.mark.slow
def test_cli_metrics_with_retrieval_probe(capsys, tmp_path, smollm2, monkeypatch):
    import pandas as pd

    monkeypatch.setattr("llm_heatmap.models.load_model", lambda *args, **options: smollm2)  # the session's copy
    out = tmp_path / "m.csv"
    code, stdout, err = run_cli(capsys, "metrics", "the cat sat on the mat", "--out", out, "--retrieval-probe", "64",
                                "--metric", "sink_score", "--metric", "probe_retrieval_score")
    assert code == 0, err
    table = pd.read_csv(out)
    assert list(table.columns) == ["layer", "head", "kv_group", "sink_score", "probe_retrieval_score",
                                   "probe_retrieval_copies"]
    assert table["probe_retrieval_score"].between(0, 1).all() and table["probe_retrieval_score"].max() > 0.1
    assert "retrieval heads on 5 needle prompts (5 recalled)" in stdout


def synthetic_run_heads():
    import pandas as pd

    rows = []
    for length, recall in ((100, 1.0), (200, 0.2)):
        for depth in (0.0, 1.0):
            for layer in range(2):
                for head in range(2):
                    rows.append({"context_length": length, "depth": depth, "recall": recall, "recalled": recall >= 0.5,
                                 "layer": layer, "head": head, "score": 0.25 * (2 * layer + head) + 0.1 * depth})
    return pd.DataFrame(rows)


def test_figure_by_depth_draws_recall_and_the_top_heads(tmp_path):
    from matplotlib.patches import Rectangle

    from llm_heatmap.viz import plot_retrieval_probe, save_figure

    table = synthetic_run_heads()
    fig = plot_retrieval_probe(table, top=2)
    panels = [ax for ax in fig.axes if ax.get_title()]
    # recall, then the two best heads over the recalled runs (length 100): L1H1 (0.75, 0.85 -> 0.80), L1H0
    assert [ax.get_title() for ax in panels] == ["recall of the answer", "L1H1  (score 0.80)", "L1H0  (score 0.55)"]
    hatched = [[p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch()] for ax in panels]
    assert [len(h) for h in hatched] == [0, 2, 2]  # the two cells of the run length that did not recall
    assert save_figure(fig, tmp_path / "r.png").stat().st_size > 0
    with pytest.raises(InputError, match="no run recalled"):
        plot_retrieval_probe(table.assign(recalled=False))
    with pytest.raises(InputError, match="lacks column"):
        plot_retrieval_probe(table.drop(columns=["score"]))


def test_experiment_summary_counts_heads_recall_and_overlap():
    import pandas as pd

    from experiments.retrieval_heads import summary

    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "kv_group": [0, 0, 0, 0],
                          "probe_retrieval_score": [0.5, 0.05, 0.3, 0.0], "probe_retrieval_copies": [9, 1, 5, 0],
                          "probe_induction_score": [0.9, 0.8, 0.1, 0.0]})
    runs = pd.DataFrame({"context_length": [100, 100, 200], "recall": [1.0, 0.8, 0.2], "recalled": [True, True, False]})
    text = "\n".join(summary(heads, runs, 0.1, "m"))
    assert "2 of 3 runs recalled" in text and "| 100 | 2 of 2 | 0.90 |" in text and "| 200 | 0 of 1 | 0.20 |" in text
    assert "2 of 4 heads (50.0%) score above 0.1" in text
    assert "| L0H0 | 0 | 0.500 | 9 | 0.900 |" in text.splitlines()[text.splitlines().index("| --- | --- | --- | --- | --- |") + 1]
    assert "Top 2 induction heads: L0H0 (0.90), L0H1 (0.80)" in text and "Shared with the retrieval heads: 1 of 2 (L0H0)" in text


def test_the_answer_shares_only_function_words_with_the_haystack():
    from llm_heatmap.analyses.heads.needle import haystack_text, words

    shared = set(words(Needle().answer)) & set(words(haystack_text()))
    assert shared <= {"a", "and", "at", "the", "to"}
