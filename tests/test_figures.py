"""Detail, comparison, metric-map, KV-similarity and rollout figures."""

from __future__ import annotations

import itertools

import matplotlib.image as mimage
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.image import AxesImage

from llm_heatmap.errors import InputError
from llm_heatmap.viz import (plot_comparison, plot_head, plot_kv_group, plot_kv_similarity, plot_metric_map,
                             plot_rollout, save_figure)

from eager_reference import eager_cube
from test_grid import synthetic_cube, text_boxes


@pytest.fixture(scope="module")
def smol_cube(smollm2_eager):
    return eager_cube(smollm2_eager, "Run a self meta-cognitive audit where you are self-aware about being an LLM",
                      source="smollm2-135m")


def visible_texts(fig):
    return text_boxes(fig)


def assert_no_overlap(fig, ignore=()):
    boxes = [(t, b) for t, b in visible_texts(fig) if t not in ignore]
    width, height = fig.bbox.width, fig.bbox.height
    for text, box in boxes:
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1, f"{text!r} cut off"
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"


def images(fig):
    return [a for a in fig.findobj(AxesImage)]


def test_head_detail_shows_its_pattern_and_tokens(smol_cube, tmp_path):
    fig = plot_head(smol_cube, 3, 4, sink="keep")
    image = images(fig)[0]
    pattern = smol_cube.pattern[3, 4].numpy()
    attendable = smol_cube.attendable()[3].numpy()
    shown = image.get_array()
    assert np.allclose(shown[attendable], pattern[attendable] / pattern[attendable].max(), atol=1e-6)
    assert shown.mask[~attendable].all()
    ax = image.axes
    assert len(ax.get_xticklabels()) == smol_cube.num_keys == len(ax.get_yticklabels())
    assert ax.get_xticklabels()[1].get_text() == "␣a"
    assert_no_overlap(fig)
    path = save_figure(fig, tmp_path / "head.png")
    assert mimage.imread(path).shape[:2] == (int(fig.bbox.height), int(fig.bbox.width))


def test_head_detail_readable_at_50_tokens(tmp_path):
    cube = synthetic_cube(2, 4, 2, tokens=50)
    cube.tokens = [f"word{i}" for i in range(50)]
    fig = plot_head(cube, 1, 2, scale="log")
    ax = images(fig)[0].axes
    assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 6.5
    assert_no_overlap(fig)
    save_figure(fig, tmp_path / "head50.png")


def test_kv_group_puts_its_heads_side_by_side(smol_cube):
    fig = plot_kv_group(smol_cube, 5, 1, sink="keep")
    shown = images(fig)
    assert [im.axes.get_title() for im in shown] == ["L5 H3 / KV1", "L5 H4 / KV1", "L5 H5 / KV1"]
    top = max(smol_cube.pattern[5, 3:6].max().item(), 0)
    for im, head in zip(shown, [3, 4, 5]):  # one colour range for the group
        attendable = smol_cube.attendable()[5].numpy()
        assert np.allclose(im.get_array()[attendable], smol_cube.pattern[5, head].numpy()[attendable] / top, atol=1e-6)
    assert_no_overlap(fig)
    with pytest.raises(InputError, match="KV group"):
        plot_kv_group(smol_cube, 5, 7)


def test_comparison_same_scale_and_symmetric_difference(smol_cube, tmp_path):
    other = synthetic_cube(30, 9, 3, tokens=smol_cube.num_keys, seed=3)
    other.spec = smol_cube.spec
    fig = plot_comparison(smol_cube, other, 2, 6)
    a_img, b_img, d_img = images(fig)
    a, b = smol_cube.pattern[2, 6].numpy(), other.pattern[2, 6].numpy()
    attendable = smol_cube.attendable()[2].numpy()
    top = max(a[attendable].max(), b[attendable].max())
    assert np.allclose(a_img.get_array()[attendable], a[attendable] / top, atol=1e-6)
    assert np.allclose(b_img.get_array()[attendable], b[attendable] / top, atol=1e-6)
    diff = (b - a)[attendable]  # B - A, the sign compare reports
    bound = np.abs(diff).max()
    assert np.allclose(d_img.get_array()[attendable], (diff + bound) / (2 * bound), atol=1e-6)
    assert d_img.get_cmap().name.startswith("RdBu")
    bars = [ax for ax in fig.axes if ax not in (a_img.axes, b_img.axes, d_img.axes)]
    assert bars[1].get_ylim() == pytest.approx((-bound, bound))
    assert_no_overlap(fig)
    save_figure(fig, tmp_path / "compare.png")
    shorter = synthetic_cube(30, 9, 3, tokens=smol_cube.num_keys - 2)
    with pytest.raises(InputError, match="same number of tokens"):
        plot_comparison(smol_cube, shorter, 2, 6)


def test_metric_map_draws_any_column_with_readable_values(tmp_path):
    rows = [dict(layer=layer, head=head, kv_group=head // 2, entropy=layer + head / 10, delta=head - 4.0)
            for layer in range(6) for head in range(8)]
    table = pd.DataFrame(rows)
    fig = plot_metric_map(table, "entropy")
    image = images(fig)[0]
    expected = np.array([[layer + head / 10 for head in range(8)] for layer in range(6)])
    assert np.allclose(image.get_array(), expected)
    texts = [t for t, _ in visible_texts(fig)]
    assert "2.30" in texts and "H3\nKV1" in texts and "L5" in texts
    assert_no_overlap(fig)
    save_figure(fig, tmp_path / "metric.png")
    signed = plot_metric_map(table, "delta")
    norm = images(signed)[0].norm
    assert (norm.vmin, norm.vmax) == (-4.0, 4.0)  # signed values: diverging, centred on 0
    with pytest.raises(InputError, match="lacks column"):
        plot_metric_map(table, "sink_score")


def test_kv_similarity_chart(tmp_path):
    table = pd.DataFrame(dict(layer=range(30), within_group=np.linspace(0.9, 0.6, 30),
                              across_group=np.linspace(0.5, 0.4, 30)))
    fig = plot_kv_similarity(table)
    lines = fig.axes[0].get_lines()
    assert np.allclose(lines[0].get_ydata(), table.within_group) and np.allclose(lines[1].get_ydata(), table.across_group)
    assert_no_overlap(fig)
    save_figure(fig, tmp_path / "kv.png")
    with pytest.raises(InputError, match="within"):
        plot_kv_similarity(table.drop(columns="within_group"))


def test_rollout_heatmap(tmp_path):
    rollout = torch.rand(12, 12, generator=torch.Generator().manual_seed(12)).softmax(-1)
    tokens = [f"tok{i}" for i in range(12)]
    fig = plot_rollout(rollout, tokens)
    image = images(fig)[0]
    assert np.allclose(image.get_array(), rollout.numpy() / rollout.max().item(), atol=1e-6)
    assert [t.get_text() for t in image.axes.get_xticklabels()] == tokens
    assert_no_overlap(fig)
    save_figure(fig, tmp_path / "rollout.png")
    with pytest.raises(InputError, match="tokens"):
        plot_rollout(rollout, tokens[:5])


def test_kv_similarity_legend_names_real_or_pseudo_groups():
    import pandas as pd

    table = pd.DataFrame({"layer": [0, 1], "within": [0.8, 0.7], "between": [0.7, 0.6]})
    legend = lambda fig: [t.get_text() for t in fig.axes[0].get_legend().get_texts()]  # noqa: E731
    assert legend(plot_kv_similarity(table)) == ["within (heads sharing a KV head)", "between (heads of different KV heads)"]
    pseudo = plot_kv_similarity(table.assign(grouping="pseudo"))
    assert legend(pseudo) == ["within (heads in one pseudo-group)", "between (heads in different pseudo-groups)"]
