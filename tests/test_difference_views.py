"""Difference cubes (B - A) are drawn as differences wherever a cube is drawn: PNG grid, HTML page,
`render`, and `compare` (issue 21, item 1)."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace

import matplotlib
import matplotlib.colors as mcolors
import matplotlib.image as mimage
import numpy as np
import pytest

from llm_heatmap.viz import GridStyle, html_view, plot_grid, save_grid, save_grid_difference

from test_grid import synthetic_cube


def _difference(seed_a=1, seed_b=2):
    a = synthetic_cube(2, 4, 2, tokens=9, seed=seed_a)
    b = synthetic_cube(2, 4, 2, tokens=9, seed=seed_b)
    diff = replace(b, pattern=b.pattern - a.pattern, prompt=None, difference=True,
                   metadata={"prompt_a": "first prompt", "prompt_b": "second prompt"})
    return a, b, diff


def _bound(diff):
    attendable = np.broadcast_to(diff.attendable().numpy()[:, None], diff.pattern.shape)
    return float(np.abs(diff.pattern.numpy()[attendable]).max())


def test_difference_cube_draws_diverging_symmetric_b_minus_a(tmp_path):
    a, b, diff = _difference()
    layout = save_grid(diff, tmp_path / "d.png", cell_px=3, sink="keep")
    bound = _bound(diff)
    # a symmetric range around 0 on the diverging map, not a 0..max range on viridis
    assert (layout.color.scale, layout.color.vmin, layout.color.vmax) == ("difference", pytest.approx(-bound),
                                                                         pytest.approx(bound))
    drawn = plot_grid(diff, cell_px=3, sink="keep")
    assert "B − A" in " ".join(drawn.layout.title_lines) and '"second prompt"' in drawn.layout.title_lines[1]
    png = mimage.imread(tmp_path / "d.png")
    x0, y0, x1, y1 = layout.panel(1, 3)
    cells = png[y0:y1:3, x0:x1:3, :3]
    values = diff.pattern[1, 3].numpy()
    expected = matplotlib.colormaps["RdBu_r"](mcolors.Normalize(-bound, bound)(values))[..., :3]
    seen = diff.attendable()[1].numpy()
    assert np.abs(cells[seen] - expected[seen]).max() < 2 / 255
    # a negative change is drawn blue, not as "no change" (the lowest viridis colour)
    assert (cells[seen & (values < -bound / 2)][:, 2] > cells[seen & (values < -bound / 2)][:, 0]).all()


def test_plot_grid_difference_is_b_minus_a_like_compare(tmp_path):
    a, b, diff = _difference()
    pair = save_grid_difference(a, b, tmp_path / "pair.png", cell_px=3, sink="keep")
    cube = save_grid(diff, tmp_path / "cube.png", cell_px=3, sink="keep")
    assert (pair.color.vmin, pair.color.vmax) == pytest.approx((cube.color.vmin, cube.color.vmax))
    assert np.array_equal(mimage.imread(tmp_path / "pair.png")[cube.grid_box[1]:],
                          mimage.imread(tmp_path / "cube.png")[cube.grid_box[1]:])


def test_a_chosen_colormap_stays():
    _, _, diff = _difference()
    assert GridStyle().signed(True).cmap == "RdBu_r"
    assert GridStyle(cmap="PuOr").signed(True).cmap == "PuOr"
    assert GridStyle().signed(False).cmap == "viridis"


def _meta_and_values(page: str):
    meta = json.loads(re.search(r'<script id="hm-meta" type="application/json">(.*?)</script>', page, re.S)
                      .group(1).replace("\\/", "/"))
    data = base64.b64decode(re.search(r'<script id="hm-data"[^>]*>(.*?)</script>', page, re.S).group(1).strip())
    return meta, np.frombuffer(data, np.uint8 if meta["bits"] == 8 else "<u2")


def test_html_of_a_difference_is_signed_and_decodes_to_b_minus_a():
    _, _, diff = _difference()
    page = html_view(diff, bits=16).page
    meta, levels = _meta_and_values(page)
    assert meta["signed"] is True and meta["style"]["cmap"] == "RdBu_r" and meta["style"]["scale"] == "linear"
    assert "B − A" in meta["title"] and 'B: "second prompt"' in meta["prompt"]
    top = 2 ** meta["bits"] - 1
    mask = diff.attendable().numpy()
    decoded, at = [], 0
    for layer in range(diff.num_layers):
        count = int(mask[layer].sum())
        for head in range(diff.num_heads):
            scale = meta["scales"][layer * diff.num_heads + head]
            decoded.append((2 * levels[at:at + count].astype(float) / top - 1) * scale)
            at += count
    expected = [diff.pattern[l, h].numpy()[mask[l]] for l in range(diff.num_layers) for h in range(diff.num_heads)]
    for got, want in zip(decoded, expected):
        assert np.abs(got - want).max() <= np.abs(want).max() / top + 1e-7
    assert (np.concatenate(decoded) < 0).any()  # negative changes survive the page's encoding
    # the page's ranges hold |B - A| so the symmetric range is [-max, max]
    assert max(meta["ranges"]["weights"]["keep"]["high"]) == pytest.approx(_bound(diff), abs=1e-6)


def test_render_draws_a_difference_cube_file_as_a_difference(tmp_path, capsys):
    from llm_heatmap.cli import main

    _, _, diff = _difference()
    diff.save(tmp_path / "d.cube.safetensors")
    assert main(["render", str(tmp_path / "d.cube.safetensors"), "--out", str(tmp_path), "--html", "--sink", "keep",
                 "--cell-px", "3", "--quiet", "--name", "d.render"]) == 0
    png = mimage.imread(tmp_path / "d.render.png")
    reference = save_grid(diff, tmp_path / "reference.png", cell_px=3, sink="keep")
    assert reference.color.scale == "difference"
    assert np.array_equal(png, mimage.imread(tmp_path / "reference.png"))
    meta, _ = _meta_and_values((tmp_path / "d.render.html").read_text())
    assert meta["signed"] and meta["style"]["cmap"] == "RdBu_r"
