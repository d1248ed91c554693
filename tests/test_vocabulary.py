"""One vocabulary of flags across commands (issue 21, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_heatmap import cli
from llm_heatmap.cli import build_parser, options


@pytest.mark.parametrize("command", [["grid", "x"], ["metrics", "x"], ["batch", "p.txt", "--out", "o"],
                                     ["compare", "a", "b"], ["qk-map", "x", "--layer", "1"]])
def test_one_model_commands_refuse_a_second_model(command, capsys):
    assert cli.main([*command, "--model", "minilm-l6", "--model", "smollm2-135m"]) == 2
    assert "--model is given twice" in capsys.readouterr().err


def test_layers_and_heads_spelled_alike():
    args = build_parser().parse_args(["qk-map", "x", "--layers", "5", "--heads", "2"])
    assert (args.layer, args.head) == (5, 2)


def test_out_is_a_folder_and_a_table_path_still_works(tmp_path):
    assert options.table_or_folder(Path("results"), "m_x", "metrics") == Path("results/m_x.metrics.csv")
    assert options.table_or_folder(Path("results/t.parquet"), "m_x", "metrics") == Path("results/t.parquet")
    assert options.table_or_folder(tmp_path, "m_x", "metrics") == tmp_path / "m_x.metrics.csv"


def test_prompt_file_is_one_prompt_and_prompts_is_a_set(tmp_path, monkeypatch):
    one, many = tmp_path / "one.txt", tmp_path / "many.txt"
    one.write_text("first line\nsecond line of the same prompt\n")
    many.write_text("the sky is blue\ncats sleep a lot\n")
    seen = {}
    monkeypatch.setattr("llm_heatmap.cli.kv_similarity._run", lambda args, prompts: seen.setdefault("p", prompts) and 0)
    assert cli.main(["kv-similarity", "--prompt-file", str(one), "--prompts", str(many)]) == 0
    assert [p.text for p in seen["p"]] == ["first line\nsecond line of the same prompt", "the sky is blue",
                                           "cats sleep a lot"]


def test_readme_states_the_vocabulary():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("One vocabulary"):]
    section = section[:section.index("\n\n")]
    for flag in ("--prompt-file", "--prompts", "--out", "--layers", "--heads", "--model", "--name"):
        assert flag in section, flag
