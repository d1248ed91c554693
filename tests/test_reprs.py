"""Small reprs and a size guard for inline views (issue 21, item 10); the README's notebook lines run (item 12)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from llm_heatmap.analyses.compare import SetComparison, compare_cubes
from llm_heatmap.viz import html_view, plot_grid

from test_grid import synthetic_cube


def test_cube_and_result_reprs_are_one_short_line():
    cube = synthetic_cube(30, 9, 3, tokens=64)
    for text in (repr(cube), repr(compare_cubes(cube, synthetic_cube(30, 9, 3, tokens=64, seed=1))),
                 repr(SetComparison(pd.DataFrame({"metric": ["a"]}), pd.DataFrame())),
                 repr(plot_grid(synthetic_cube(2, 2, 1, tokens=6), cell_px=2)), repr(html_view(cube))):
        assert "\n" not in text and len(text) < 300, text
        assert "tensor(" not in text and "<html" not in text.lower()
    assert repr(cube) == "AttentionCube(30 x 9 x 64 x 64 (l h q k), float32, weights, synthetic, 'synthetic')"


def test_inline_view_is_downsampled_past_the_limit_and_says_so(monkeypatch):
    import llm_heatmap.notebook as notebook
    from llm_heatmap.analyses.heads.metrics import head_metrics

    cube = synthetic_cube(30, 9, 3, tokens=300)
    monkeypatch.setattr(notebook, "_cube_and_table", lambda *a, **k: (cube, head_metrics(cube)))
    view = notebook.view("any", "prompt", inline_mb=1)
    fits = notebook.inline_max_tokens(30, 9, bits=16, megabytes=1)
    assert len(view.page.encode()) < 1.3 * 2**20 and "downsampled to at most" in view.note
    assert f"{fits} x {fits}" in view._repr_html_() and "downsampled" in repr(view)
    full = notebook.view("any", "prompt", inline_mb=None)
    assert full.note is None and len(full.page) > 4 * len(view.page)


def test_readme_notebook_lines_name_only_what_they_define():
    """The README's notebook snippet used `tok`, defined nowhere (a NameError as written)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```python\nimport llm_heatmap as lh\nlh.view\(.*?```", readme, re.S).group(0)
    assert "tokenizer=tok)" not in block and "model, tokenizer, spec = lh.load_model" in block
