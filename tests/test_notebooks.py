"""Notebook-native: results display themselves, the one-line entry points work, and every example
notebook runs top to bottom offline and shows its rich outputs."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import torch

import llm_heatmap as lh
from llm_heatmap.errors import InputError
from llm_heatmap.viz import DrawnGrid, HtmlView

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ARTIFACTS = Path(__file__).parent / "artifacts" / "notebooks"
PROMPT = "The cat sat on the mat because it was warm."


def test_view_and_grid_in_one_line(smollm2):
    model, tokenizer, _ = smollm2
    view = lh.view("smollm2-135m", PROMPT)
    assert isinstance(view, HtmlView)
    frame = view._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and 'sandbox="allow-scripts"' in frame
    assert "<script" not in frame and "&lt;script" in frame, "the page is escaped inside the attribute"
    assert "smollm2-135m: attention heads" in view.page and "sink_score" in view.page, "title and metrics embedded"
    drawn = lh.grid(model, PROMPT, tokenizer=tokenizer, scale="power")
    assert isinstance(drawn, DrawnGrid) and drawn.layout.color.scale == "power"
    assert drawn._repr_png_().startswith(b"\x89PNG")
    with pytest.raises(InputError, match="tokenizer"):
        lh.grid(model, PROMPT)


def test_a_cube_shows_a_summary_and_a_thumbnail(smollm2):
    from IPython.core.interactiveshell import InteractiveShell

    model, tokenizer, _ = smollm2
    cube = lh.capture_prompt(model, tokenizer, PROMPT)
    shell = InteractiveShell.instance()  # started after llm_heatmap was imported: nothing registered, _repr_html_ used
    data, _ = shell.display_formatter.format(cube)
    page = data["text/html"]
    assert "AttentionCube" in page and "smollm2-135m" in page and "GQA 9q:3kv x 30 layers" in page
    assert f"30 x 9 x {cube.num_keys} x {cube.num_keys}" in page
    png = base64.b64decode(re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1))
    from PIL import Image
    import io

    width, height = Image.open(io.BytesIO(png)).size
    assert width <= 420 and height <= 640 and height > width, "30 layers down, 9 heads across, within the box"


def test_every_result_displays_through_repr_html(tiny_gguf):
    from llm_heatmap.analyses import compare_sets

    model, tokenizer, _ = tiny_gguf
    cube = lh.capture_prompt(model, tokenizer, "ab ab ab cd")
    page = cube._repr_html_()
    assert "AttentionCube" in page and "data:image/png;base64," in page and "2 x 4 x" in page
    tables = [lh.head_metrics(lh.capture_prompt(model, tokenizer, text)).assign(prompt_id=text)
              for text in ("ab ab", "cd cd", "ab cd ab", "cd ab cd")]
    import pandas as pd

    result = compare_sets(pd.concat(tables[:2]), pd.concat(tables[2:]), n_resamples=50, n_permutations=10)
    page = result._repr_html_()
    assert page.startswith("<div><b>SetComparison") and f"layers: {len(result.layers):,} rows" in page
    assert page.count("<table") == 2 and "ci_low" in page


def test_metric_table_is_a_layer_by_head_heat_table(smollm2):
    from llm_heatmap.viz import metric_table

    model, tokenizer, _ = smollm2
    table = lh.head_metrics(lh.capture_prompt(model, tokenizer, PROMPT))
    styled = metric_table(table, "sink_score")
    grid = styled.data
    assert grid.shape == (30, 9) and list(grid.columns[:2]) == ["H0", "H1"] and grid.index[0] == "L0"
    assert grid.loc["L3", "H4"] == pytest.approx(table.query("layer == 3 and head == 4")["sink_score"].item())
    assert "background-color" in styled.to_html()
    with pytest.raises(InputError, match="no column"):
        metric_table(table, "no_such_metric")


def _outputs(book) -> list[dict]:
    return [output for cell in book.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.ipynb")))
def test_example_notebook_runs_and_shows_its_outputs(name):
    import nbformat
    from nbclient import NotebookClient

    book = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    assert not _outputs(book), "examples are committed without outputs"
    NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    nbformat.write(book, ARTIFACTS / f"{name}.ipynb")
    outputs = _outputs(book)
    assert not [o for o in outputs if o.output_type == "error"]
    kinds = [set(o.get("data", {})) for o in outputs]
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("image/png" in k for k in kinds), "a grid or figure is shown inline"
    if name in ("quickstart", "long_prompts", "value_norms_and_qk_maps"):
        assert any(page.startswith("<iframe srcdoc=") and "hm-meta" in page for page in html), "the interactive view"
        assert any("AttentionCube" in page for page in html), "the cube's own display"
    if name == "attention_sites":  # the sites' own view (a site switch), then grids, tables and overlays as pictures
        assert any("sites-meta" in page for page in html) and sum("image/png" in k for k in kinds) >= 4
    if name == "quickstart":
        assert any("dataframe" in page for page in html) and any("background-color" in page for page in html)
