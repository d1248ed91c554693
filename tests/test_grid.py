"""The all-heads grid: pixel sizes, pixels against the colormap, scales, sink handling, formats, labels."""

from __future__ import annotations

import html
import itertools
import re

import matplotlib
import matplotlib.colors as mcolors
import matplotlib.image as mimage
import numpy as np
import pytest
import torch
from matplotlib.text import Text

from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec
from llm_heatmap.probes import AttentionCube
from llm_heatmap.viz import plot_grid, plot_grid_difference, save_grid, save_grid_difference
from llm_heatmap.viz.raster import MASK_RGBA
from eager_reference import eager_cube

VIRIDIS = matplotlib.colormaps["viridis"]


def synthetic_cube(num_layers=28, num_heads=16, num_kv_heads=8, tokens=20, seed=0, causal=True):
    """A Qwen3-0.6B-shaped cube (28 x 16, 8 KV heads) of random softmax rows with a first-token sink."""
    spec = ModelSpec(model_type="qwen3", architecture="Qwen3ForCausalLM", num_layers=num_layers, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=64, causal=causal, layer_types=("full_attention",) * num_layers)
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_layers, num_heads, tokens, tokens, generator=generator) * 2
    logits[..., 0] += 3
    if causal:
        logits = logits.masked_fill(~torch.ones(tokens, tokens, dtype=torch.bool).tril(), float("-inf"))
    return AttentionCube.from_pattern(logits.softmax(-1), spec, torch.arange(tokens), [f"t{i}" for i in range(tokens)],
                                      prompt="synthetic", source="synthetic")


@pytest.fixture(scope="module")
def minilm_cube(minilm_eager):
    return eager_cube(minilm_eager, "Explain the core idea behind quantum entanglement.", source="minilm-l6")


@pytest.fixture(scope="module")
def smol_cube(smollm2_eager):
    return eager_cube(smollm2_eager, "Run a self meta-cognitive audit where you are self-aware about being an LLM",
                      source="smollm2-135m")


def panel_cells(png, layout, layer, head):
    """RGBA in [0, 1] at the centre of every token cell of one panel: `(q, k, 4)`."""
    x0, y0, x1, y1 = layout.panel(layer, head)
    c = layout.cell_px
    q, k = layout.panel_shape
    assert (x1 - x0, y1 - y0) == (k * c, q * c)
    ys = y0 + c * np.arange(q) + c // 2
    xs = x0 + c * np.arange(k) + c // 2
    return png[np.ix_(ys, xs)]


def assert_colors(actual, expected, where):
    diff = np.abs(actual[..., :3] - expected[..., :3])[where]
    assert diff.max() <= 1.5 / 255, f"max colour error {diff.max() * 255:.1f}/255"


def test_png_size_follows_cell_px(minilm_cube, tmp_path):
    layout = save_grid(minilm_cube, tmp_path / "grid.png", cell_px=7)
    png = mimage.imread(tmp_path / "grid.png")
    assert png.shape == (layout.height, layout.width, 3)  # a white background is written without alpha
    t = minilm_cube.num_keys
    assert layout.panel_shape == (t, t) and layout.cell_px == 7
    x0, y0, x1, y1 = layout.grid_box
    assert x1 - x0 == 12 * 7 * t + 11 * layout.gutter  # MHA: no KV separators
    assert y1 - y0 == 6 * 7 * t + 5 * layout.gutter
    assert 0 < x0 and x1 < layout.width and 0 < y0 and y1 < layout.height


@pytest.mark.parametrize("size", [(1800, 1000), 1300])
def test_png_size_follows_target_size(smol_cube, tmp_path, size):
    layout = save_grid(smol_cube, tmp_path / "grid.png", size=size)
    png = mimage.imread(tmp_path / "grid.png")
    width = size if np.isscalar(size) else size[0]
    assert png.shape[1] == width
    if not np.isscalar(size):
        assert png.shape[0] == size[1]
    assert layout.grid_box[2] <= width


def test_panel_pixels_reproduce_pattern(smol_cube, tmp_path):
    layout = save_grid(smol_cube, tmp_path / "grid.png", cell_px=3, sink="keep")
    png = mimage.imread(tmp_path / "grid.png")
    attendable = smol_cube.attendable().numpy()
    vmax = smol_cube.pattern.numpy()[np.broadcast_to(attendable[:, None], smol_cube.pattern.shape)].max()
    norm = mcolors.Normalize(0, vmax)
    assert layout.color.vmax == pytest.approx(vmax)
    for layer, head in [(0, 0), (7, 4), (29, 8)]:
        cells = panel_cells(png, layout, layer, head)
        expected = VIRIDIS(norm(smol_cube.pattern[layer, head].numpy()))
        assert_colors(cells, expected, attendable[layer])
        assert np.allclose(cells[~attendable[layer]], 1.0)  # future keys draw as the white background


def test_panels_keep_their_layer_and_head(minilm_cube, tmp_path):
    """A permuted subset lands where the layout says: each panel shows its own head."""
    layout = save_grid(minilm_cube, tmp_path / "grid.png", cell_px=4, layers=[5, 2], heads=[9, 3, 0])
    png = mimage.imread(tmp_path / "grid.png")
    norm = mcolors.Normalize(0, layout.color.vmax)
    for layer, head in itertools.product([5, 2], [9, 3, 0]):
        expected = VIRIDIS(norm(minilm_cube.pattern[layer, head].numpy()))
        assert_colors(panel_cells(png, layout, layer, head), expected, np.ones(expected.shape[:2], bool))


@pytest.mark.parametrize("scale", ["log", "power", "row"])
def test_scales_map_through_their_norm(smol_cube, tmp_path, scale):
    layout = save_grid(smol_cube, tmp_path / "grid.png", cell_px=2, scale=scale, gamma=0.4, layers=[3, 12], sink="keep")
    png = mimage.imread(tmp_path / "grid.png")
    pattern = smol_cube.pattern[12, 5].numpy().astype(np.float64)
    attendable = smol_cube.attendable()[12].numpy()
    if scale == "log":
        vmax = smol_cube.pattern[[3, 12]].max().item()
        assert layout.color.vmax == pytest.approx(vmax)
        assert layout.color.vmin >= vmax * 1e-4
        reference = mcolors.LogNorm(layout.color.vmin, layout.color.vmax, clip=True)(pattern)
    elif scale == "power":
        reference = mcolors.PowerNorm(0.4, 0.0, layout.color.vmax)(pattern)
    else:
        reference = pattern / np.where(attendable, pattern, 0).max(-1, keepdims=True)
    cells = panel_cells(png, layout, 12, 5)
    assert_colors(cells, VIRIDIS(reference), attendable)
    linear = VIRIDIS(mcolors.Normalize(0, layout.color.vmax)(pattern))
    assert np.abs(cells[..., :3] - linear[..., :3])[attendable].max() > 0.1  # the scale changed the picture


def test_sink_exclusion_changes_the_range(smol_cube, tmp_path):
    keep = save_grid(smol_cube, tmp_path / "keep.png", cell_px=2, layers=[10], sink="keep")
    exclude = save_grid(smol_cube, tmp_path / "exclude.png", cell_px=2, layers=[10], sink="exclude")
    pattern = smol_cube.pattern[10].numpy()
    attendable = np.broadcast_to(smol_cube.attendable()[10].numpy(), pattern.shape)
    assert keep.color.vmax == pytest.approx(pattern[attendable].max())
    assert exclude.color.vmax == pytest.approx(pattern[..., 1:][attendable[..., 1:]].max())
    assert exclude.color.vmax < keep.color.vmax
    masked = save_grid(smol_cube, tmp_path / "mask.png", cell_px=2, layers=[10], sink="mask")
    assert masked.color.vmax == pytest.approx(exclude.color.vmax)
    cells = panel_cells(mimage.imread(tmp_path / "mask.png"), masked, 10, 0)
    assert np.allclose(cells[:, 0, :3], np.array(MASK_RGBA[:3]) / 255)
    assert not np.allclose(cells[1:, 1, :3], np.array(MASK_RGBA[:3]) / 255)


def test_per_head_range_uses_each_heads_maximum(minilm_cube, tmp_path):
    layout = save_grid(minilm_cube, tmp_path / "grid.png", cell_px=2, per_head_range=True, sink="keep")
    png = mimage.imread(tmp_path / "grid.png")
    pattern = minilm_cube.pattern[1, 7].numpy()
    cells = panel_cells(png, layout, 1, 7)
    assert_colors(cells, VIRIDIS(mcolors.Normalize(0, pattern.max())(pattern)), np.ones(pattern.shape, bool))


def test_transparent_background(smol_cube, tmp_path):
    layout = save_grid(smol_cube, tmp_path / "grid.png", cell_px=2, background="transparent", layers=[0, 1])
    png = mimage.imread(tmp_path / "grid.png")
    x0, y0, x1, y1 = layout.grid_box
    assert png[layout.height - 1, 0, 3] == 0 and png[0, layout.width - 1, 3] == 0  # margins
    px0, py0, px1, py1 = layout.panel(0, 0)
    assert (png[py0:py1, px1:px1 + layout.gutter, 3] == 0).all()  # gutter between H0 and H1
    assert (png[py0:py0 + 2, px0 + 2 * layout.cell_px + 1, 3] == 0).all()  # a future key: not attendable
    assert png[py0 + 1, px0 + 1, 3] == 1.0  # the first key of the first row is drawn


def test_vector_formats(minilm_cube, tmp_path):
    save_grid(minilm_cube, tmp_path / "grid.svg", layers=[0, 1], heads=[0, 1, 2])
    text = (tmp_path / "grid.svg").read_text()
    assert "<svg" in text and text.count("<image") == 6 + 1  # six panels and the colorbar
    save_grid(minilm_cube, tmp_path / "grid.pdf", layers=[0])
    assert (tmp_path / "grid.pdf").read_bytes().startswith(b"%PDF")
    huge = synthetic_cube(30, 9, 3, tokens=200)
    with pytest.raises(InputError, match="png"):
        save_grid(huge, tmp_path / "huge.svg")
    assert not (tmp_path / "huge.svg").exists()


def test_vector_labels_sit_where_the_png_puts_them(minilm_cube, tmp_path):
    """SVG/PDF lay out at 72 points per inch, the PNG at 100 px: every label must scale with the page."""
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep labels as <text x= y=> elements
        layout = save_grid(minilm_cube, tmp_path / "grid.svg", layers=[0, 1], heads=[0, 1, 2])
    svg = (tmp_path / "grid.svg").read_text()
    view_w, view_h = map(float, re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg).groups())
    texts = {html.unescape(t): (float(x), float(y))
             for x, y, t in re.findall(r'<text[^>]* x="([-\d.]+)" y="([-\d.]+)"[^>]*>([^<]*)</text>', svg)}
    pt = 72 / 100  # points per PNG pixel
    assert view_w == pytest.approx(layout.width * pt, abs=1)
    for head in (0, 1, 2):
        x0, y0, x1, _ = layout.panel(0, head)
        x, y = texts[f"H{head}"]
        assert x == pytest.approx((x0 + x1) / 2 * pt, abs=1) and y < y0 * pt
    for layer in (0, 1):
        x0, y0, _, y1 = layout.panel(layer, 0)
        x, y = texts[f"L{layer}"]
        assert x < x0 * pt and y0 * pt < y < y1 * pt
    assert all(0 <= x <= view_w and 0 <= y <= view_h for x, y in texts.values())


def undrawn_tick_labels(fig):
    """Tick labels matplotlib keeps but does not draw (their tick lies outside the axis' view interval)."""
    skip = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            span = (high - low) * 1e-9
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - span <= tick.get_loc() <= high + span:
                    skip.update({id(tick.label1), id(tick.label2)})
    return skip


def text_boxes(fig):
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    boxes = []
    skip = undrawn_tick_labels(fig)
    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text().strip() and id(text) not in skip:
            box = text.get_window_extent(renderer)
            boxes.append((text.get_text(), box))
    return boxes


@pytest.mark.parametrize("shape", [(6, 12, 12, 12), (30, 9, 3, 18), (28, 16, 8, 20)])
def test_labels_do_not_overlap(shape, minilm_cube, smol_cube):
    layers, heads, kv, tokens = shape
    cube = {6: minilm_cube, 30: smol_cube}.get(layers) or synthetic_cube(layers, heads, kv, tokens)
    drawn = plot_grid(cube)
    layout = drawn.layout
    boxes = text_boxes(drawn.figure)
    texts = [t for t, _ in boxes]
    assert sum(t.startswith("L") and t[1:].isdigit() for t in texts) == layers
    head_labels = [t for t in texts if t.startswith("H") and t[1:].split()[0].split("\n")[0].isdigit()]
    assert len(head_labels) == heads
    if kv < heads:
        assert all("KV" in t for t in head_labels) and layout.kv_separators
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"
    for text, box in boxes:
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= layout.width and box.y1 <= layout.height, text
    # labels stay clear of the raster
    gx0, gy0, gx1, gy1 = layout.grid_box
    for text, box in boxes:
        top, bottom = layout.height - box.y1, layout.height - box.y0
        inside = box.x1 > gx0 + 1 and box.x0 < gx1 - 1 and bottom > gy0 + 1 and top < gy1 - 1
        assert not inside, f"{text!r} is drawn over the grid"


def test_long_prompt_is_area_downsampled(tmp_path):
    cube = synthetic_cube(2, 4, 2, tokens=600)
    layout = save_grid(cube, tmp_path / "long.png", size=900)
    assert layout.downsampled and not layout.token_labels
    assert max(layout.panel_shape) <= 256
    assert mimage.imread(tmp_path / "long.png").shape[1] == 900
    from llm_heatmap.probes import downsample

    values = downsample(cube, 100).pattern.numpy()
    assert values.shape == (2, 4, 100, 100)
    assert np.allclose(values.sum(-1), 1.0, atol=1e-5)
    assert np.allclose(values[0, 0, 0, 0], cube.pattern[0, 0, :6, :6].sum(-1).mean().item(), atol=1e-6)


def test_bad_options_raise_input_error(minilm_cube, tmp_path):
    with pytest.raises(InputError, match="scale"):
        plot_grid(minilm_cube, scale="cubic")
    with pytest.raises(InputError, match="sink"):
        plot_grid(minilm_cube, sink="drop")
    with pytest.raises(InputError, match="cmap"):
        plot_grid(minilm_cube, cmap="not-a-map")
    with pytest.raises(InputError, match="extension"):
        save_grid(minilm_cube, tmp_path / "grid.bmp")
    with pytest.raises(InputError, match="layer"):
        plot_grid(minilm_cube, layers=[99])


def test_difference_grid_is_symmetric_and_diverging(smol_cube, tmp_path):
    other = synthetic_cube(30, 9, 3, tokens=smol_cube.num_keys, seed=5)
    other.spec = smol_cube.spec
    layout = save_grid_difference(smol_cube, other, tmp_path / "diff.png", cell_px=2, layers=[4, 20], sink="keep")
    png = mimage.imread(tmp_path / "diff.png")
    diff = (other.pattern[[4, 20]] - smol_cube.pattern[[4, 20]]).numpy()  # B - A, the sign compare reports
    attendable = smol_cube.attendable()[[4, 20]].numpy()
    bound = np.abs(diff[np.broadcast_to(attendable[:, None], diff.shape)]).max()
    assert (layout.color.vmin, layout.color.vmax) == pytest.approx((-bound, bound))
    reference = matplotlib.colormaps["RdBu_r"](mcolors.Normalize(-bound, bound)(diff[1, 7]))
    assert_colors(panel_cells(png, layout, 20, 7), reference, attendable[1])
    shorter = synthetic_cube(30, 9, 3, tokens=smol_cube.num_keys - 1)
    with pytest.raises(InputError, match="same number of tokens"):
        plot_grid_difference(smol_cube, shorter)


def test_probes_downsampled_cube_draws_its_causal_shape(tmp_path):
    """A long cube pooled by probes' Downsampler: pooled cells above the diagonal stay background."""
    from llm_heatmap.probes import downsample

    long = synthetic_cube(2, 4, 2, tokens=300)
    pooled = downsample(long, 60)
    assert pooled.pattern.shape[-2:] == (60, 60)
    layout = save_grid(pooled, tmp_path / "pooled.png", cell_px=3, scale="linear")
    assert layout.downsampled and not layout.token_labels and layout.panel_shape == (60, 60)
    png = mimage.imread(tmp_path / "pooled.png")
    cells = panel_cells(png, layout, 1, 2)
    above = np.triu(np.ones((60, 60), bool), 1)
    assert np.allclose(cells[above], 1.0) and not np.allclose(cells[~above], 1.0)
    expected = VIRIDIS(mcolors.Normalize(0, layout.color.vmax)(pooled.pattern[1, 2].numpy()))
    assert_colors(cells, expected, ~above)


def test_auto_scale_is_linear_for_short_and_log_for_downsampled_panels(tmp_path):
    from llm_heatmap.probes import downsample

    short = synthetic_cube(2, 4, 2, tokens=12)
    assert plot_grid(short).layout.color.scale == "linear"
    pooled = downsample(synthetic_cube(2, 4, 2, tokens=300), 60)
    assert plot_grid(pooled).layout.color.scale == "log"
    assert plot_grid(pooled, scale="power").layout.color.scale == "power"


@pytest.mark.parametrize("heads", [None, [0]])
def test_titles_fit_the_image_for_a_long_path_and_a_long_prompt(heads):
    """A .gguf path is named by its file, the prompt is shortened to fit (on its own line when the scale
    text leaves it too little room), and no title line runs past the image edge."""
    cube = synthetic_cube(2, 4, 2, tokens=600)  # downsampled: the longest scale text
    cube.source = "/home/someone/models/" + "very-long-folder-name/" * 6 + "SmolLM2-135M-Instruct.Q4_1.gguf"
    cube.prompt = " ".join(f"word{i}" for i in range(400))
    drawn = plot_grid(cube, heads=heads, per_head_range=True, sink="mask")
    head, prompt = drawn.layout.title_lines[:2]
    assert head.startswith("SmolLM2-135M-Instruct.Q4_1 · ") and "/" not in head.split(" · ")[0]
    assert prompt.startswith('"word0 word1 word2') and "…" in prompt, prompt
    if heads:  # a narrow image: the facts go to a third line so the prompt keeps its room
        assert len(drawn.layout.title_lines) == 3 and drawn.layout.title_lines[2].startswith("600 tokens")
    layout = drawn.layout
    for text, box in text_boxes(drawn.figure):
        if text in layout.title_lines:
            assert 0 <= box.x0 and box.x1 <= layout.width, f"title line {text!r} runs past the image edge"
    assert sum(text in layout.title_lines for text, _ in text_boxes(drawn.figure)) == len(layout.title_lines)
