"""The run engine: a new analysis over a prompt set supplies only its per-prompt function and gets a
resumable, shardable run with settings checks, refusals and merged tables."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from llm_heatmap.analyses.runs.engine import FRONT, RunOptions, run_per_prompt
from llm_heatmap.analyses.runs.prompts import Prompt
from llm_heatmap.errors import InputError

PROMPTS = [Prompt("a", "the sky is blue", "simple"), Prompt("b", "run a diagnostic", "complex"),
           Prompt("c", "cats sleep", "simple"), Prompt("d", "entropy rises", "complex"), Prompt("e", "hi", None)]


class Interrupt(Exception):
    pass


def letters(calls: list[str], stop_after: int | None = None):
    """The example analysis: one row per distinct letter of the prompt, with its count."""

    def measure(prompt: Prompt) -> pd.DataFrame:
        if stop_after is not None and len(calls) == stop_after:
            raise Interrupt
        calls.append(prompt.id)
        text = prompt.text.replace(" ", "")
        return pd.DataFrame({"letter": sorted(set(text)), "count": [text.count(c) for c in sorted(set(text))]})

    return measure


def expected_rows(prompts) -> int:
    return sum(len(set(p.text.replace(" ", ""))) for p in prompts)


def test_per_prompt_function_is_a_whole_run(tmp_path):
    calls = []
    record = run_per_prompt(letters(calls), PROMPTS, tmp_path, kind="letters", settings={"alphabet": "latin"})
    table = pd.read_parquet(tmp_path / "letters.parquet")
    assert list(table.columns) == [*FRONT, "letter", "count"]
    assert len(table) == expected_rows(PROMPTS)
    assert list(table["prompt_id"].unique()) == [p.id for p in PROMPTS]  # prompt-file order
    sky = table[table["prompt_id"] == "a"].set_index("letter")["count"]
    assert sky["e"] == 2 and sky["s"] == 2 and sky["y"] == 1  # "theskyisblue"
    assert table.loc[table["prompt_id"] == "e", "group"].isna().all()
    assert calls == [p.id for p in PROMPTS] and record.computed == {"letters": calls}
    assert json.loads((tmp_path / "letters.json").read_text()) == {"alphabet": "latin"}
    assert len(list((tmp_path / "parts").glob("*.parquet"))) == len(PROMPTS)


def test_interrupted_run_resumes_with_the_remaining_prompts(tmp_path):
    whole = tmp_path / "whole"
    run_per_prompt(letters([]), PROMPTS, whole, kind="letters")
    out = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        run_per_prompt(letters([], stop_after=2), PROMPTS, out, kind="letters")
    assert not (out / "letters.parquet").exists()
    with pytest.raises(InputError, match="already holds a letters run .*pass resume=True"):
        run_per_prompt(letters([]), PROMPTS, out, kind="letters")
    calls = []
    record = run_per_prompt(letters(calls), PROMPTS, out, kind="letters", options=RunOptions(resume=True))
    assert calls == ["c", "d", "e"] and record.skipped == {"letters": ["a", "b"]}
    pd.testing.assert_frame_equal(pd.read_parquet(out / "letters.parquet"), pd.read_parquet(whole / "letters.parquet"))


def test_resume_refuses_other_settings_or_changed_prompts(tmp_path):
    run_per_prompt(letters([]), PROMPTS, tmp_path, kind="letters", settings={"alphabet": "latin"})
    with pytest.raises(InputError, match=r"other settings \(alphabet differ\)"):
        run_per_prompt(letters([]), PROMPTS, tmp_path, kind="letters", settings={"alphabet": "greek"},
                       options=RunOptions(resume=True))
    changed = [Prompt("a", "the sky is grey", "simple"), *PROMPTS[1:]]
    with pytest.raises(InputError, match="prompt 'a' changed since the interrupted run"):
        run_per_prompt(letters([]), changed, tmp_path, kind="letters", settings={"alphabet": "latin"},
                       options=RunOptions(resume=True))
    calls = []
    run_per_prompt(letters(calls), changed, tmp_path, kind="letters", settings={"alphabet": "latin"},
                   options=RunOptions(force=True))
    assert calls == [p.id for p in PROMPTS]
    assert "grey" in pd.read_parquet(tmp_path / "letters.parquet")["prompt"].iloc[0]


def test_shards_partition_and_a_final_resume_merges(tmp_path):
    first, second = [], []
    run_per_prompt(letters(first), PROMPTS, tmp_path, kind="letters", options=RunOptions(shard=(0, 2)))
    run_per_prompt(letters(second), PROMPTS, tmp_path, kind="letters", options=RunOptions(shard=(1, 2)))
    assert first == ["a", "c", "e"] and second == ["b", "d"]
    assert len(pd.read_parquet(tmp_path / "letters.shard-0-of-2.parquet")) == expected_rows(PROMPTS[0::2])
    calls = []
    record = run_per_prompt(letters(calls), PROMPTS, tmp_path, kind="letters", options=RunOptions(resume=True))
    assert calls == [] and record.skipped == {"letters": [p.id for p in PROMPTS]}
    assert len(pd.read_parquet(tmp_path / "letters.parquet")) == expected_rows(PROMPTS)


def test_option_groups_also_take_each_option_as_a_keyword(tmp_path):
    from llm_heatmap.analyses.atlas.run import AtlasOptions, run_atlas
    from llm_heatmap.analyses.stats import Bootstrap
    from llm_heatmap.options import spread

    atlas, bootstrap, run = spread({"measure": "hellinger", "seed": 4, "resume": True}, AtlasOptions(), Bootstrap(),
                                   RunOptions())
    assert (atlas, bootstrap, run) == (AtlasOptions(measure="hellinger"), Bootstrap(seed=4), RunOptions(resume=True))
    with pytest.raises(TypeError, match="unexpected keyword argument 'measures'"):
        run_atlas(["minilm-l6"], PROMPTS, tmp_path, measures="js")
    with pytest.raises(InputError, match="top_k=0 must be a whole number of at least 1"):
        run_atlas(["minilm-l6"], PROMPTS, tmp_path, AtlasOptions(top_k=0))
    assert list(tmp_path.iterdir()) == []
