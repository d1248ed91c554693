"""Batch runs over prompt files: one row per prompt x head, resumable, shardable."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from llm_heatmap.analyses.runs.batch import output_paths, read_batch, run_batch
from llm_heatmap.analyses.heads.measure import stream_head_metrics
from llm_heatmap.analyses.heads.metrics import head_metrics
from llm_heatmap.analyses.runs.prompts import Prompt, read_prompts
from llm_heatmap.errors import InputError
from llm_heatmap.probes import capture_prompt

pytestmark = pytest.mark.slow

PROMPTS = [Prompt("a", "the sky is blue", "simple"), Prompt("b", "run a diagnostic", "complex"),
           Prompt("c", "cats sleep", "simple"), Prompt("d", "entropy rises", "complex"),
           Prompt("e", "hello there", None)]


class Interrupt(Exception):
    pass


def counting(calls):
    def measure(model, tokenizer, text, **options):
        calls.append(text)
        return stream_head_metrics(model, tokenizer, text, **options)
    return measure


@pytest.fixture(scope="module")
def uninterrupted(minilm, tmp_path_factory):
    model, tokenizer, spec = minilm
    return run_batch(model, tokenizer, PROMPTS, tmp_path_factory.mktemp("whole"), spec=spec, source="minilm-l6",
                     quiet=True)


def test_one_row_per_prompt_and_head(minilm, uninterrupted):
    model, tokenizer, spec = minilm
    table = uninterrupted.table
    heads = spec.num_layers * spec.num_heads
    assert len(table) == len(PROMPTS) * heads
    assert list(table.columns[:5]) == ["model", "prompt_id", "group", "prompt", "n_tokens"]
    assert table.groupby("prompt_id").size().to_dict() == {p.id: heads for p in PROMPTS}
    assert uninterrupted.computed == [p.id for p in PROMPTS] and uninterrupted.skipped == []
    pd.testing.assert_frame_equal(pd.read_parquet(uninterrupted.parquet), table)
    csv = pd.read_csv(uninterrupted.csv)
    assert csv.shape == table.shape
    pd.testing.assert_series_equal(csv["norm_entropy"], table["norm_entropy"], check_exact=False, rtol=1e-9)
    # the streamed rows equal metrics of a fully kept cube (streaming computes the attention output itself,
    # so later layers see hidden states within fp32 rounding of the kept capture's)
    with torch.no_grad():
        cube = capture_prompt(model, tokenizer, PROMPTS[1].text, spec=spec)
    reference = head_metrics(cube)
    rows = table[table["prompt_id"] == "b"].reset_index(drop=True)
    assert (rows["n_tokens"] == cube.num_keys).all()
    pd.testing.assert_frame_equal(rows[reference.columns], reference, check_exact=False, rtol=1e-5, atol=1e-5,
                                  check_dtype=False)


def test_interrupt_then_resume(minilm, uninterrupted, tmp_path):
    model, tokenizer, spec = minilm
    done = []

    def stop_after_two(prompt, table):
        done.append(prompt.id)
        if len(done) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_batch(model, tokenizer, PROMPTS, tmp_path, spec=spec, source="minilm-l6", quiet=True,
                  on_prompt=stop_after_two)
    assert len(list((tmp_path / "parts").glob("*.parquet"))) == 2
    parquet, csv = output_paths(tmp_path)
    assert not parquet.exists() and not csv.exists()  # no partial final table

    with pytest.raises(InputError, match="resume=True"):
        run_batch(model, tokenizer, PROMPTS, tmp_path, spec=spec, source="minilm-l6", quiet=True)

    calls = []
    resumed = run_batch(model, tokenizer, PROMPTS, tmp_path, spec=spec, source="minilm-l6", quiet=True,
                        resume=True, measure=counting(calls))
    assert calls == [p.text for p in PROMPTS[2:]]  # only the remaining prompts are computed
    assert resumed.skipped == ["a", "b"] and resumed.computed == ["c", "d", "e"]
    pd.testing.assert_frame_equal(resumed.table, uninterrupted.table)
    pd.testing.assert_frame_equal(pd.read_parquet(parquet), uninterrupted.table)

    calls.clear()
    again = run_batch(model, tokenizer, PROMPTS, tmp_path, spec=spec, source="minilm-l6", quiet=True,
                      resume=True, measure=counting(calls))
    assert calls == [] and again.computed == []  # a finished batch resumes to itself
    pd.testing.assert_frame_equal(again.table, uninterrupted.table)


def test_resume_refuses_other_settings_or_prompts(minilm, tmp_path):
    model, tokenizer, spec = minilm
    run_batch(model, tokenizer, PROMPTS[:1], tmp_path, spec=spec, source="minilm-l6", quiet=True)
    with pytest.raises(InputError, match="other settings \\(model differ\\)"):
        run_batch(model, tokenizer, PROMPTS[:1], tmp_path, spec=spec, source="other", quiet=True,
                  resume=True, measure=lambda *a, **k: pytest.fail("must not compute"))
    changed = [Prompt("a", "a different text")]
    with pytest.raises(InputError, match="prompt 'a' changed"):
        run_batch(model, tokenizer, changed, tmp_path, spec=spec, source="minilm-l6", quiet=True, resume=True)
    calls = []
    forced = run_batch(model, tokenizer, changed, tmp_path, spec=spec, source="minilm-l6", quiet=True, force=True,
                       measure=counting(calls))
    assert calls == ["a different text"] and set(forced.table["prompt"]) == {"a different text"}


def test_shards_partition_and_combine(minilm, uninterrupted, tmp_path):
    model, tokenizer, spec = minilm
    results = [run_batch(model, tokenizer, PROMPTS, tmp_path, spec=spec, source="minilm-l6", quiet=True,
                         shard=(i, 2)) for i in range(2)]
    assert results[0].computed == ["a", "c", "e"] and results[1].computed == ["b", "d"]
    assert results[0].parquet.name == "heads.shard-0-of-2.parquet"
    combined = read_batch(tmp_path)
    order = [p.id for p in PROMPTS]
    combined = combined.sort_values("prompt_id", key=lambda s: s.map(order.index), kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(combined, uninterrupted.table)


def test_bad_prompts_write_nothing(minilm, tmp_path):
    model, tokenizer, spec = minilm
    short = replace(spec, max_positions=5)
    with pytest.raises(InputError, match="prompt 'a' has 6 tokens but the model's context holds 5"):
        run_batch(model, tokenizer, PROMPTS, tmp_path / "out", spec=short, quiet=True)
    assert not (tmp_path / "out").exists()
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": " "}) + "\n")
    with pytest.raises(InputError, match="line 2"):
        read_prompts(path)
