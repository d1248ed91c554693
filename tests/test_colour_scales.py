"""Honest colour scales (issue 21, item 9): numbers on every bar (the HTML one too), a mark wherever cells are
drawn clipped to the range's end, enough ticks on long log bars, labelled query rows in detail figures."""

from __future__ import annotations

import numpy as np
import pytest

from llm_heatmap.viz import plot_grid, plot_heads, write_html

from test_grid import synthetic_cube
from test_html import open_page


def test_cells_beyond_the_range_are_marked_on_the_bar():
    cube = synthetic_cube(2, 4, 2, tokens=12)  # a strong first-token column, left out of the range by default
    excluded = plot_grid(cube, cell_px=4)
    assert excluded.layout.color.extend == "max"
    assert excluded.figure.axes[-1].get_ylabel().startswith("▲ beyond")
    kept = plot_grid(cube, cell_px=4, sink="keep")
    assert kept.layout.color.extend == "neither" and "beyond" not in kept.figure.axes[-1].get_ylabel()
    masked = plot_grid(cube, cell_px=4, sink="mask")  # the first column is grey, not clipped
    assert masked.layout.color.extend == "neither"
    assert plot_grid(cube, cell_px=4, sink="keep", vmax=0.2).layout.color.extend == "max"


def test_a_long_log_bar_labels_more_than_the_decades():
    drawn = plot_grid(synthetic_cube(4, 4, 2, tokens=300), scale="log", cell_px=3)
    bar = drawn.figure.axes[-1]
    low, high = bar.get_ylim()
    shown = [t for t in bar.yaxis.get_majorticklocs() if low <= t <= high]
    assert len(shown) >= 3 * np.floor(np.log10(high / low))


def test_every_detail_panel_labels_its_query_rows():
    cube = synthetic_cube(2, 6, 2, tokens=10)
    fig = plot_heads(cube, 1, [3, 4, 5])
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 3
    for ax in panels:
        assert [t.get_text() for t in ax.get_yticklabels()] == [f"t{i}" for i in range(10)]
        assert ax.get_ylabel() == "query"


def test_html_colour_bar_has_numbers_and_the_beyond_mark(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    cube = synthetic_cube(2, 4, 2, tokens=12)
    open_page(browser, write_html(cube, tmp_path / "page.html"))
    text = lambda element_id: browser.find_element(By.ID, element_id).text  # noqa: E731
    attendable = np.broadcast_to(cube.attendable().numpy()[:, None], cube.pattern.shape).copy()
    attendable[..., 0] = False
    top = cube.pattern.numpy()[attendable].max()
    assert text("cb-lo") == "0" and float(text("cb-hi")) == pytest.approx(top, abs=1e-3)
    assert browser.find_element(By.ID, "cb-beyond").is_displayed()
    Select(browser.find_element(By.ID, "o-sink")).select_by_value("keep")
    assert not browser.find_element(By.ID, "cb-beyond").is_displayed()
    assert float(text("cb-hi")) == pytest.approx(cube.pattern.numpy()[cube.attendable().numpy()[:, None].repeat(4, 1)].max(), abs=1e-3)
