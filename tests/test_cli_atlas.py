"""`llm-heatmap atlas` through the CLI's `main`, the real models served from the session fixtures."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest

from llm_heatmap.analyses.atlas.run import TABLES
from llm_heatmap.cli import main

pytestmark = pytest.mark.slow
FAST = ["--resamples", "200", "--permutations", "50", "--probe-length", "8"]


@pytest.fixture
def atlas(monkeypatch, capsys, smollm2, minilm):
    models = {"smollm2-135m": smollm2, "minilm-l6": minilm,
              "tiny-context": (minilm[0], minilm[1], replace(minilm[2], max_positions=4))}
    monkeypatch.setattr("llm_heatmap.models.load_model", lambda source, **options: models[str(source)])

    def invoke(*argv):
        capsys.readouterr()
        code = main(["atlas", *map(str, argv)])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("text,id\nThe cat sat on the mat.,cat\nExplain entanglement simply.,physics\nHello there,hi\n")
    return path


def test_writes_tables_and_page_then_resumes(atlas, prompts, tmp_path):
    out = tmp_path / "atlas"
    code, stdout, err = atlas(prompts, "--column", "text", "--model", "minilm-l6", "--model", "smollm2-135m",
                              "--out", out, *FAST)
    assert code == 0, err
    assert "KV-group gap (kv groups of 3, js)" in stdout and "KV-group gap (pseudo groups of 3, js)" in stdout
    for name in TABLES:
        assert (out / f"{name}.parquet").exists()
    page = (out / "atlas.html").read_text()
    assert "minilm-l6" in page and "smollm2-135m" in page and "<script src" not in page and "<link" not in page
    heads = pd.read_parquet(out / "heads.parquet")
    assert heads.groupby("model").size().to_dict() == {"minilm-l6": 72, "smollm2-135m": 270}

    code, _, err = atlas(prompts, "--column", "text", "--model", "minilm-l6", "--model", "smollm2-135m", "--out", out)
    assert code == 2 and "pass --resume to continue it, --force to recompute" in err
    code, stdout, err = atlas(prompts, "--column", "text", "--model", "minilm-l6", "--model", "smollm2-135m",
                              "--out", out, "--resume", "--json", *FAST)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["computed"] == {"minilm-l6": [], "smollm2-135m": []}
    assert summary["skipped"]["minilm-l6"] == ["cat", "physics", "hi"]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "heads.parquet"), heads)


def test_a_shard_writes_parts_and_says_how_to_merge(atlas, prompts, tmp_path):
    out = tmp_path / "atlas"
    code, stdout, err = atlas(prompts, "--column", "text", "--model", "minilm-l6", "--out", out, "--shard", "1/2", *FAST)
    assert code == 0, err
    assert "shard 1/2: minilm-l6: 1 computed" in stdout and "--resume (same options)" in stdout
    assert not (out / "heads.parquet").exists() and not (out / "atlas.html").exists()
    assert len(list((out / "parts").rglob("*.safetensors"))) == 1


@pytest.mark.parametrize("argv, message", [
    (["OUT/missing.txt", "--out", "OUT/a"], "prompt file OUT/missing.txt does not exist"),
    (["PROMPTS", "--out", "OUT/a"], "has no column 'prompt' (its columns: text, id); pass --column NAME"),
    (["TXT", "--column", "text", "--out", "OUT/a"], "so --column 'text' does not apply"),
    (["PROMPTS", "--column", "text", "--out", "OUT/a", "--top-k", "0"], "--top-k 0 must be a whole number of at least 1"),
    (["PROMPTS", "--column", "text", "--out", "OUT/a", "--max-rows", "0"], "--max-rows 0 must be a whole number"),
    (["PROMPTS", "--column", "text", "--out", "OUT/a", "--confidence", "2"], "--confidence 2.0 must lie between 0 and 1"),
    (["PROMPTS", "--column", "text", "--out", "OUT/a", "--shard", "2/2"], "shard '2/2' is out of range"),
    (["PROMPTS", "--column", "text", "--out", "OUT/a", "--model", "tiny-context"],
     "has 9 tokens but the model's context holds 4"),
])
def test_bad_input_exits_2_with_one_sentence_and_no_file(atlas, prompts, tmp_path, argv, message):
    (tmp_path / "p.txt").write_text("one prompt\n")
    out = tmp_path / "OUT"
    argv = [a.replace("OUT", str(out)).replace("PROMPTS", str(prompts)).replace("TXT", str(tmp_path / "p.txt"))
            for a in argv]
    code, _, err = atlas(*argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("llm-heatmap atlas: "), err
    assert message.replace("OUT", str(out)) in lines[0]
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_an_existing_page_is_kept(atlas, prompts, tmp_path):
    out = tmp_path / "atlas"
    out.mkdir()
    (out / "atlas.html").write_text("keep me")
    code, _, err = atlas(prompts, "--column", "text", "--out", out)
    assert code == 2 and "already holds an atlas (atlas.html)" in err
    assert (out / "atlas.html").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["atlas.html"]


def test_device_cannot_spread_a_model_under_a_launcher(atlas, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, err = atlas(prompts, "--column", "text", "--out", tmp_path / "a", "--device", "auto")
    assert code == 2 and "--device auto cannot be combined with a launcher's 2 processes" in err
