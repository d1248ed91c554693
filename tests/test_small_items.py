"""The smaller items of issue 21 (item 12), each with the test that would have caught it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llm_heatmap.analyses.bounds import METRIC_NORM_COLUMNS, METRIC_TABLE_COLUMNS
from llm_heatmap.analyses.heads.measure import measure_prompt
from llm_heatmap.analyses.heads.metrics import head_metrics
from llm_heatmap.analyses.runs.prompts import check_length
from llm_heatmap.viz import plot_grid

from test_grid import synthetic_cube


def test_readme_metric_table_lists_every_column():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("| column | definition |"):]
    table = table[:table.index("\n\n")]
    named = set(re.findall(r"`([a-z0-9_]+)`", table))
    missing = [c for c in (*METRIC_TABLE_COLUMNS, *METRIC_NORM_COLUMNS) if c not in ("layer", "head", "kv_group")
               and c not in named]
    assert not missing, missing


def test_block_score_of_one_segment_is_exactly_zero():
    """Tokens without a sentence break form one segment: the mass in it equals the uniform one, 0, not -9.9e-09."""
    table = head_metrics(synthetic_cube(3, 4, 2, tokens=40, seed=2))
    assert (table["block_score"] == 0).all()


def test_a_one_token_prompt_draws_its_grid_with_an_empty_table(tiny_gguf):
    model, tokenizer, spec = tiny_gguf
    prompt = next(p for p in ("a", "hi", "x") if check_length(tokenizer, spec, p, min_tokens=1) == 1)
    with torch.no_grad():
        cube, table = measure_prompt(model, tokenizer, spec, prompt)
    assert cube.num_tokens == 1 and len(table) == 0 and list(table.columns) == list(METRIC_TABLE_COLUMNS)
    assert plot_grid(cube).layout.width > 0
