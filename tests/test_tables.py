"""Tables (CSV/Parquet/JSON/Markdown, atomic, no silent overwrite) and prompt files."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from llm_heatmap.analyses.runs.prompts import (Prompt, check_length, parse_shard, read_prompt_text, read_prompts,
                                          shard_prompts)
from llm_heatmap.analyses.runs.table_files import read_table, table_format, to_markdown, write_table
from llm_heatmap.errors import InputError


@pytest.fixture
def table():
    return pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "entropy": [0.5, 1.25, np.nan],
                         "pattern": ["vertical", "diagonal|x", "block"]})


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_round_trip(tmp_path, table, suffix):
    path = write_table(table, tmp_path / f"t{suffix}")
    back = read_table(path)
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    assert [p.name for p in tmp_path.iterdir()] == [f"t{suffix}"]  # no temp file left


def test_json_is_records(tmp_path, table):
    records = json.loads(write_table(table, tmp_path / "t.json").read_text())
    assert records[1] == {"layer": 0, "head": 1, "entropy": 1.25, "pattern": "diagonal|x"}
    assert records[2]["entropy"] is None


def test_markdown(tmp_path, table):
    text = write_table(table, tmp_path / "t.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "| layer | head | entropy | pattern |"
    assert lines[1] == "|---:|---:|---:|:---|"
    assert lines[3] == "| 0 | 1 | 1.25 | diagonal\\|x |"
    assert lines[4] == "| 1 | 0 |  | block |"
    assert to_markdown(table) == text


def test_format_by_name_overrides_extension(tmp_path, table):
    path = write_table(table, tmp_path / "t.txt", format="csv")
    assert path.read_text().startswith("layer,head,entropy,pattern")
    assert table_format("x.PARQUET") == "parquet"
    with pytest.raises(InputError, match="extension"):
        table_format(tmp_path / "t.xlsx")
    with pytest.raises(InputError, match="format 'xls' is not known"):
        table_format("t.csv", "xls")


def test_refuses_to_overwrite_unless_forced(tmp_path, table):
    path = write_table(table, tmp_path / "t.csv")
    before = path.read_text()
    with pytest.raises(InputError, match="already exists.*force=True"):
        write_table(table.head(1), path)
    assert path.read_text() == before
    write_table(table.head(1), path, force=True)
    assert len(read_table(path)) == 1


def test_failed_write_leaves_nothing(tmp_path):
    # an object column parquet cannot encode fails mid-write: neither the file nor a temp remains
    bad = pd.DataFrame({"x": [object()]})
    with pytest.raises(Exception):
        write_table(bad, tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder(tmp_path, table, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    # root may write anywhere, so the permission check itself is what is made to say no
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(folder) else real_access(path, mode))
    with pytest.raises(InputError, match="not writable"):
        write_table(table, folder / "t.csv")
    assert list(folder.iterdir()) == []


def test_folder_that_cannot_be_created(tmp_path, table):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot be created"):
        write_table(table, blocker / "sub" / "t.csv")


# ---- prompt files ----------------------------------------------------------------------------
def test_txt_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("the sky is blue\nrun a self-meta-cognitive diagnostic\n\n")
    assert read_prompts(path) == [Prompt("0", "the sky is blue"), Prompt("1", "run a self-meta-cognitive diagnostic")]


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b", "id": "x", "group": "simple"}\n{"prompt": "c d", "group": 2}\n')
    assert read_prompts(path) == [Prompt("x", "a b", "simple"), Prompt("1", "c d", "2")]


def test_csv_and_parquet_prompts(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text('text,id,group\n"a, b",007,simple\nNA,,\n"line one\nline two",z,complex\n')
    expected = [Prompt("007", "a, b", "simple"), Prompt("1", "NA"), Prompt("z", "line one\nline two", "complex")]
    assert read_prompts(csv, column="text") == expected
    parquet = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["a, b", "NA"], "id": [7, None], "group": ["simple", None]}).to_parquet(parquet)
    assert read_prompts(parquet) == [Prompt("7", "a, b", "simple"), Prompt("1", "NA")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "a b", "id": "x"}\n')
    assert read_prompts(jsonl, column="text") == [Prompt("x", "a b")]


@pytest.mark.parametrize("name, content, column, message", [
    ("p.csv", "prompt\nok\n\"\"\n", "prompt", "the 'prompt' of row 2 of .* is empty"),
    ("p.csv", "text\nok\n", "prompt", r"has no column 'prompt' \(its columns: text\); pass column=NAME"),
    ("p.csv", "prompt,id\na,1\nb,1\n", "prompt", "uses id '1' twice"),
    ("p.csv", "prompt\n", "prompt", "holds no prompts"),
    ("p.parquet", b"not parquet", "prompt", "cannot be read as Parquet"),
    ("p.parquet", {"prompt": [1, 2]}, "prompt", "the 'prompt' of row 1 of .* is int, not text"),
    ("p.jsonl", '{"prompt": "ok"}\n', "text", 'line 1 .* has no "text" field; .* or pass column=NAME'),
    ("p.txt", "one\n", "text", "one prompt per line, so column='text' does not apply"),
])
def test_bad_prompt_tables(tmp_path, name, content, column, message):
    path = tmp_path / name
    if isinstance(content, dict):
        pd.DataFrame(content).to_parquet(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_prompts(path, column=column)


@pytest.mark.parametrize("name, text, message", [
    ("p.txt", "one\n   \nthree\n", "line 2 of .* is empty"),
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": ""}\n', 'the "prompt" on line 2 .* is empty'),
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "x"\n', "line 2 .* is not valid JSON"),
    ("p.jsonl", '{"text": "ok"}\n', 'line 1 .* has no "prompt" field'),
    ("p.jsonl", '{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n', "uses id '1' twice"),
    ("p.txt", "\n\n", "holds no prompts"),
])
def test_bad_prompt_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_prompts(path)


def test_unreadable_prompt_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="is a directory"):
        read_prompts(tmp_path)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputError, match="not UTF-8"):
        read_prompts(tmp_path / "bin.txt")
    (tmp_path / "one.txt").write_text("line one\nline two\n")
    assert read_prompt_text(tmp_path / "one.txt") == "line one\nline two"


def test_shards_partition_the_prompts():
    prompts = [Prompt(str(k), f"p{k}") for k in range(11)]
    for count in (1, 2, 3, 5, 11, 13):
        shards = [shard_prompts(prompts, (i, count)) for i in range(count)]
        ids = [p.id for shard in shards for p in shard]
        assert sorted(ids, key=int) == [p.id for p in prompts]  # every prompt exactly once
        assert len(set(ids)) == len(prompts)
        for i, shard in enumerate(shards):
            assert all(int(p.id) % count == i for p in shard)
    assert shard_prompts(prompts, (1, 3)) == shard_prompts(list(prompts), parse_shard("1/3"))  # deterministic
    for text in ("3/3", "-1/2", "a/b", "1", "0/0"):
        with pytest.raises(InputError, match="shard"):
            parse_shard(text)


@pytest.mark.slow
def test_prompt_longer_than_context(smollm2):
    _, tokenizer, spec = smollm2
    from dataclasses import replace

    short = replace(spec, max_positions=4)
    assert check_length(tokenizer, spec, "the sky is blue") == len(tokenizer("the sky is blue")["input_ids"])
    with pytest.raises(InputError, match="has 5 tokens but the model's context holds 4"):
        check_length(tokenizer, short, "the sky is blue today")
    assert check_length(tokenizer, spec, "the sky is blue", chat=True) > 10
