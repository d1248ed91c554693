"""viz.html: the self-contained interactive page (decoded in Python, and driven in headless Chromium)."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec
from llm_heatmap.probes import AttentionCube, attendable_mask
from llm_heatmap.viz import GridStyle
from llm_heatmap.viz.html import write_html
from llm_heatmap.viz.labels import token_text
from eager_reference import eager_cube
from rendered import open_rendered, wait_drawn

ARTIFACTS = Path(__file__).parent / "artifacts"
WORDS = ["<s>", "The", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", ".", "ĠIt", "Ġwas", "Ġwarm", "\n", "http://x.io/a"]


def make_spec(layers, heads, kv_heads, *, causal=True, sliding=None, sliding_layers=()):
    types = tuple("sliding_attention" if i in sliding_layers else "full_attention" for i in range(layers))
    return ModelSpec(
        model_type="llama", architecture="LlamaForCausalLM", num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=16, causal=causal, layer_types=types, sliding_window=sliding,
    )


def make_cube(layers=3, heads=4, kv_heads=2, tokens=None, *, causal=True, seed=0, key_mask=None, **spec_options):
    """A cube of random softmax patterns that respect the spec's attendable mask (zeros elsewhere)."""
    tokens = list(WORDS if tokens is None else tokens)
    n = len(tokens)
    spec = make_spec(layers, heads, kv_heads, causal=causal, **spec_options)
    key_mask = torch.ones(n, dtype=torch.bool) if key_mask is None else key_mask
    positions = torch.arange(n)
    allowed = attendable_mask(spec, tuple(range(layers)), positions, key_mask)
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, heads, n, n, generator=generator) * 2.5
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    pattern = torch.softmax(logits, -1).nan_to_num(0.0)
    return AttentionCube(
        pattern=pattern, spec=spec, tokens=tokens, token_ids=torch.arange(n), layers=tuple(range(layers)),
        heads=tuple(range(heads)), query_positions=positions, key_mask=key_mask, query_mask=key_mask.clone(),
        prompt="The cat sat on the mat. It was warm", source="synthetic",
    )


def embedded(page: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """(meta, data bytes, mask bytes) read back from the page's script blocks."""
    def block(name):
        return re.search(rf'<script id="{name}" type="[^"]+">(.*?)</script>', page, re.S).group(1)

    meta = json.loads(block("hm-meta"))
    data = np.frombuffer(base64.b64decode(block("hm-data")), dtype=np.uint8)
    mask = np.frombuffer(base64.b64decode(block("hm-mask")), dtype=np.uint8)
    return meta, data, mask


def decode(page: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """The pattern `"l h q k"` (NaN where empty) and the mask `"l q k"`, following the documented format."""
    meta, data, packed = embedded(page)
    layers, heads, rows, cols = len(meta["layers"]), len(meta["heads"]), len(meta["rows"]), len(meta["cols"])
    mask = np.unpackbits(packed.reshape(layers, -1), axis=1)[:, : rows * cols].reshape(layers, rows, cols).astype(bool)
    levels = data if meta["bits"] == 8 else data.view("<u2")
    scales = np.array(meta["scales"]).reshape(layers, heads)
    out = np.full((layers, heads, rows, cols), np.nan)
    start = 0
    for layer in range(layers):
        count = int(mask[layer].sum())
        for head in range(heads):
            out[layer, head][mask[layer]] = levels[start : start + count] * scales[layer, head] / (2 ** meta["bits"] - 1)
            start += count
    assert start == len(levels)
    return out, mask, meta


# ---- the file ----------------------------------------------------------------------------
def test_page_is_self_contained(tmp_path):
    cube = make_cube()
    page = write_html(cube, tmp_path / "page.html", title="A </script> <b>title</b> http://x.io").read_text()
    assert not re.search(r"https?://", page), "no URL of any kind, not even inside token text"
    assert not re.search(r"<(link|iframe|img|object|embed)\b", page, re.I)
    assert not re.search(r"\b(src|href)\s*=", page, re.I)
    assert "url(" not in page and "@import" not in page and "fetch(" not in page
    assert page.count("</script>") == page.count("<script")
    meta, _, _ = embedded(page)
    assert [c["r"] for c in meta["cols"]] == WORDS  # raw tokens (hover); shown as token_text gives them
    assert [c["t"] for c in meta["cols"]][1:4] + [meta["cols"][11]["t"]] == ["The", "␣cat", "␣sat", "\\n"]
    assert meta["title"] == "A </script> <b>title</b> http://x.io"


@pytest.mark.parametrize("bits", [8, 16])
def test_embedded_pattern_decodes_within_quantization_error(tmp_path, bits):
    cube = make_cube(layers=4, heads=6, kv_heads=2)
    decoded, mask, meta = decode(write_html(cube, tmp_path / "p.html", bits=bits).read_text())
    pattern = cube.pattern.numpy()
    assert np.array_equal(mask, cube.attendable().numpy())
    assert np.isnan(decoded[:, :, ~mask[0]]).all(), "the causal future is empty, not zero"
    step = pattern.max(axis=(-2, -1)) / (2**bits - 1)
    error = np.abs(np.where(mask[:, None], decoded - pattern, 0.0)).max(axis=(-2, -1))
    assert (error <= step / 2 + 1e-7).all()
    assert error.max() > 0 if bits == 8 else True
    assert meta["kv"] == [0, 0, 0, 1, 1, 1]


def test_padding_and_sliding_window_are_empty(tmp_path):
    key_mask = torch.tensor([False, False] + [True] * 11)
    cube = make_cube(layers=2, key_mask=key_mask, sliding=4, sliding_layers=(1,))
    decoded, mask, _ = decode(write_html(cube, tmp_path / "p.html").read_text())
    assert not mask[:, :2].any() and not mask[:, :, :2].any(), "padding rows and keys are empty"
    assert mask[0, 12, 2] and not mask[1, 12, 2], "layer 1 keeps only the last 4 keys"
    assert mask[1].sum() < mask[0].sum()
    real = mask[:, None]
    assert np.allclose(np.nansum(decoded, -1)[np.broadcast_to(real.any(-1), decoded.shape[:3])], 1.0, atol=0.03)


def test_last_query_rows_keep_their_positions(tmp_path):
    from dataclasses import replace

    full = make_cube(layers=2, heads=2, kv_heads=1)
    cube = replace(full, pattern=full.pattern[:, :, -4:], query_positions=torch.arange(9, 13), query_mask=torch.ones(4, dtype=torch.bool))
    decoded, mask, meta = decode(write_html(cube, tmp_path / "p.html").read_text())
    assert [r["r"] for r in meta["rows"]] == WORDS[9:] and meta["rows"][0]["p"] == [9, 9]
    assert np.array_equal(mask[0], np.tril(np.ones((13, 13), dtype=bool))[9:])
    assert np.allclose(np.nan_to_num(decoded), cube.pattern.numpy(), atol=1 / 510 + 1e-7)


def test_max_tokens_area_downsamples_rows_and_keys(tmp_path):
    tokens = [f"t{i}" for i in range(16)]
    cube = make_cube(layers=2, heads=2, kv_heads=1, tokens=tokens)
    decoded, mask, meta = decode(write_html(cube, tmp_path / "p.html", max_tokens=8, bits=16).read_text())
    reference = cube.pattern.reshape(2, 2, 8, 2, 8, 2).mean(3).sum(4).numpy()
    assert decoded.shape == (2, 2, 8, 8) and meta["downsampled"]
    assert np.allclose(np.nan_to_num(decoded), reference, atol=1e-4)
    assert np.allclose(np.nansum(decoded, -1), 1.0, atol=1e-3), "rows still sum to 1"
    assert mask[0, 0, 0] and not mask[0, 0, 1], "a bin is empty only when no cell in it is attendable"
    assert meta["cols"][3]["t"] == "t6…" and meta["cols"][3]["p"] == [6, 7]


def test_cube_pooled_by_the_downsampler_keeps_spans_and_empty_bins(tmp_path):
    from llm_heatmap.probes import downsample
    from llm_heatmap.probes.geometry import bin_index

    tokens = [f"w{i}" for i in range(40)]
    full = make_cube(layers=2, heads=2, kv_heads=1, tokens=tokens, sliding=9, sliding_layers=(1,))
    pooled = downsample(full, 8)
    decoded, mask, meta = decode(write_html(pooled, tmp_path / "p.html", bits=16).read_text())
    rows = bin_index(40, 8)
    onehot = torch.nn.functional.one_hot(rows).float()
    reference = torch.einsum("q a, l q k, k b -> l a b", onehot, full.attendable().float(), onehot) > 0
    assert np.array_equal(mask, reference.numpy()), "a bin is empty exactly when no pair inside it may attend"
    assert not mask[1, 7, 0] and mask[0, 7, 0], "the sliding-window layer drops far bins"
    assert np.allclose(np.nan_to_num(decoded), pooled.pattern.numpy(), atol=1e-4)
    assert meta["tokens"] == 40 and meta["downsampled"]
    assert meta["cols"][1] == {"t": "w5…", "r": "w5", "p": [5, 9], "g": False}
    assert [r["p"] for r in meta["rows"]] == [c["p"] for c in meta["cols"]]
    assert meta["rows"][2]["t"] == "w10…"


def test_metrics_rows_are_embedded_per_head(tmp_path):
    cube = make_cube(layers=2, heads=4, kv_heads=2)
    table = pd.DataFrame(
        [{"layer": l, "head": h, "kv_group": h // 2, "entropy": 0.5 * l + h, "sink": 1.0 / (1 + h), "kind": "x" if h else "y"}
         for l in range(2) for h in range(4)]
    )
    meta, _, _ = embedded(write_html(cube, tmp_path / "p.html", metrics=table).read_text())
    metrics = meta["metrics"]
    assert metrics["columns"] == ["entropy", "sink", "kind"]
    assert metrics["rows"]["1,3"] == [3.5, 0.25, "x"]
    assert metrics["ranges"][0] == [0.0, 3.5] and metrics["ranges"][2] is None


def test_bad_input_raises_input_error(tmp_path):
    cube = make_cube()
    with pytest.raises(InputError, match="layer"):
        write_html(cube, tmp_path / "p.html", metrics=pd.DataFrame({"entropy": [1.0]}))
    with pytest.raises(InputError, match="bits"):
        write_html(cube, tmp_path / "p.html", bits=12)
    with pytest.raises(InputError, match="colormap"):
        write_html(cube, tmp_path / "p.html", cmap="no-such-map")
    batch = AttentionCube(
        pattern=torch.stack([cube.pattern, cube.pattern]), spec=cube.spec, tokens=[cube.tokens, cube.tokens],
        token_ids=torch.stack([cube.token_ids] * 2), layers=cube.layers, heads=cube.heads,
        query_positions=cube.query_positions, key_mask=torch.stack([cube.key_mask] * 2),
        query_mask=torch.stack([cube.query_mask] * 2),
    )
    with pytest.raises(InputError, match="item"):
        write_html(batch, tmp_path / "p.html")


# ---- the browser -------------------------------------------------------------------------
def open_page(driver, path: Path, timeout=30.0) -> dict:
    open_rendered(driver, path, timeout)
    return driver.execute_script("return window.heatmapStats")


def test_browser_zoom_hover_and_filter(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    cube = make_cube(layers=6, heads=8, kv_heads=2, seed=3)
    table = pd.DataFrame([{"layer": l, "head": h, "entropy": float(l * 10 + h)} for l in range(6) for h in range(8)])
    path = write_html(cube, tmp_path / "page.html", metrics=table)
    stats = open_page(browser, path)
    assert stats["thumbs"] == 48
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid canvas")) == 48
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "html_grid.png"))

    layer, head = 4, 5
    # the thumbnail's pixels are the grid's colours for the same style (shared linear range, first token
    # out of the range), empty where nothing may be attended
    pixels = thumbnail_pixels(browser, layer, head)
    allowed = cube.attendable()[layer].numpy()
    assert_same_colours(pixels, grid_colours(cube, layer, head, GridStyle()), allowed, "viridis")
    assert (pixels[allowed][:, 3] == 255).all() and (pixels[~allowed] == 0).all()

    browser.find_element(By.CSS_SELECTOR, f'#grid td[data-layer="{layer}"][data-head="{head}"] canvas').click()
    zoom = browser.find_element(By.ID, "zoom")
    assert zoom.is_displayed()
    assert browser.find_element(By.ID, "z-title").text == f"Layer {layer} · Head {head} · KV group 1"
    raw = lambda title: json.loads(title.rsplit("; raw token ", 1)[1][:-1])  # noqa: E731
    cols = [raw(d.get_attribute("title")) for d in browser.find_elements(By.CSS_SELECTOR, "#z-cols div")]
    rows = [raw(d.get_attribute("title")) for d in browser.find_elements(By.CSS_SELECTOR, "#z-rows div")]
    assert cols == WORDS and rows == WORDS  # the raw token on hover
    assert browser.find_element(By.CSS_SELECTOR, "#z-cols div:nth-child(3)").text == "␣cat"  # token_text shown
    metric = browser.find_element(By.CSS_SELECTOR, '#z-metrics tr[data-metric="entropy"]').text
    assert "45" in metric

    canvas = browser.find_element(By.ID, "z-canvas")
    cell = int(canvas.get_attribute("data-cell"))
    width, height = len(WORDS) * cell, len(WORDS) * cell
    readout = browser.find_element(By.ID, "z-readout")
    scale = float(cube.pattern[layer, head].max())
    for q, k in [(9, 2), (12, 12), (5, 0)]:
        ActionChains(browser).move_to_element_with_offset(
            canvas, int((k + 0.5) * cell - width / 2), int((q + 0.5) * cell - height / 2)
        ).perform()
        assert (readout.get_attribute("data-query"), readout.get_attribute("data-key")) == (str(q), str(k))
        value = float(readout.get_attribute("data-value"))
        assert value == pytest.approx(float(cube.pattern[layer, head, q, k]), abs=scale / 510 + 1e-6)
        assert token_text(WORDS[q]) in readout.text and token_text(WORDS[k]) in readout.text
    browser.save_screenshot(str(ARTIFACTS / "html_zoom.png"))
    ActionChains(browser).move_to_element_with_offset(canvas, int(11.5 * cell - width / 2), int(1.5 * cell - height / 2)).perform()
    assert readout.get_attribute("data-value") == "" and "empty" in readout.text, "the causal future reads as empty"

    browser.find_element(By.ID, "z-close").click()
    assert not zoom.is_displayed()
    browser.find_element(By.ID, "f-layer").send_keys("1-2")
    Select(browser.find_element(By.ID, "f-kv")).select_by_value("1")
    shown = [(int(td.get_attribute("data-layer")), int(td.get_attribute("data-head")))
             for td in browser.find_elements(By.CSS_SELECTOR, "#grid td") if td.is_displayed()]
    assert shown == [(l, h) for l in (1, 2) for h in range(4, 8)]
    assert browser.find_element(By.ID, "count").text == "8 of 48 heads"
    browser.save_screenshot(str(ARTIFACTS / "html_filtered.png"))


def test_browser_colours_follow_the_grid_rules_for_every_option(browser, tmp_path):
    """The page opens with a cube's GridStyle and, switched to other options, colours as the PNG grid would."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    cube = make_cube(layers=3, heads=4, kv_heads=2, seed=7, sliding=5, sliding_layers=(2,))
    style = GridStyle(scale="log", sink="mask", per_head_range=True, cmap="magma")
    open_page(browser, write_html(cube, tmp_path / "page.html", style=style, bits=16))
    allowed = cube.attendable()[2].numpy()
    assert_same_colours(thumbnail_pixels(browser, 2, 3), grid_colours(cube, 2, 3, style, bits=16), allowed, style.cmap)
    for options in ({"o-scale": "power", "o-gamma": "0.25", "o-range": "shared", "o-sink": "keep"},
                    {"o-scale": "row", "o-sink": "exclude"}, {"o-scale": "linear", "o-cmap": "viridis"}):
        for control, value in options.items():
            Select(browser.find_element(By.ID, control)).select_by_value(value)
        wait_drawn(browser)
        style = style.but(scale=Select(browser.find_element(By.ID, "o-scale")).first_selected_option.get_attribute("value"),
                          gamma=float(Select(browser.find_element(By.ID, "o-gamma")).first_selected_option.get_attribute("value")),
                          per_head_range=Select(browser.find_element(By.ID, "o-range")).first_selected_option.get_attribute("value") == "head",
                          sink=Select(browser.find_element(By.ID, "o-sink")).first_selected_option.get_attribute("value"),
                          cmap=Select(browser.find_element(By.ID, "o-cmap")).first_selected_option.get_attribute("value"))
        for layer, head in ((0, 0), (2, 3)):
            allowed = cube.attendable()[layer].numpy()
            assert_same_colours(thumbnail_pixels(browser, layer, head), grid_colours(cube, layer, head, style, bits=16),
                                allowed, style.cmap)


def thumbnail_pixels(browser, layer, head) -> np.ndarray:
    data = browser.execute_script(
        f"const c = document.querySelector('#grid td[data-layer=\"{layer}\"][data-head=\"{head}\"] canvas');"
        "return [c.height, c.width, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];")
    return np.array(data[2], dtype=np.uint8).reshape(data[0], data[1], 4)


def grid_colours(cube, layer, head, style, bits=8) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) LUT index the PNG grid's rules (viz.raster) give each cell of one head when its
    weight is known to the page's embedded precision (half a quantization step either way); -1 where
    the grid draws grey."""
    from llm_heatmap.viz.raster import lut_index, normalise, range_and_grey

    values = cube.pattern.numpy()
    drawn = np.broadcast_to(cube.attendable().numpy()[:, None], values.shape)
    in_range, grey = range_and_grey(drawn, cube.first_key, style.sink)
    half = np.where(drawn, values, 0).max(axis=(-2, -1), keepdims=True) / (2**bits - 1) / 2
    _, color = normalise(values, in_range, scale=style.resolved_scale(False), per_head=style.per_head_range)
    lo, hi = (np.broadcast_to(bound, values.shape[:2] + (1, 1)) for bound in (color.vmin, color.vmax))
    indices = []
    for shifted in (np.clip(values - half, 0, None), values + half):
        if style.scale == "row":
            normalised, _ = normalise(shifted, in_range, scale="row")
        else:  # the range comes from the exact weights, as the page receives it
            normalised = _normalised(shifted, lo, hi, color.scale, style.gamma)
        index = lut_index(normalised[layer, head]).astype(int).clip(0, 255)
        index[grey[layer, head]] = -1
        indices.append(index)
    return indices[0], indices[1]


def _normalised(values, lo, hi, scale, gamma):
    if scale == "log":
        return (np.log(np.where(values > 0, values, lo)) - np.log(lo)) / (np.log(hi) - np.log(lo))
    out = (values - lo) / (hi - lo)
    return np.clip(out, 0, None) ** gamma if scale == "power" else out


def assert_same_colours(pixels, expected, where, cmap):
    """The page's colour of every drawn cell is a colormap entry the grid's rules allow for the embedded
    precision (at most one entry beyond, for rounding at a bin edge); grey where the grid draws grey."""
    from llm_heatmap.viz.raster import MASK_RGBA, colormap_bytes

    table = colormap_bytes(cmap)[:, :3].astype(int)
    rgb = pixels[where][:, :3].astype(int)
    shown = np.abs(rgb[:, None, :] - table[None]).sum(-1).argmin(-1)
    is_grey = (rgb == MASK_RGBA[:3]).all(-1)
    low, high = expected[0][where], expected[1][where]
    assert np.array_equal(is_grey, low == -1), "grey exactly where the grid masks the first token"
    inside = (shown >= np.minimum(low, high) - 1) & (shown <= np.maximum(low, high) + 1)
    assert inside[~is_grey].all(), f"{(~inside[~is_grey]).sum()} cells coloured outside the grid's range"


def test_browser_renders_448_heads_at_128_tokens(browser, tmp_path):
    cube = make_cube(layers=28, heads=16, kv_heads=8, tokens=[f"tok{i}" for i in range(128)], seed=1)
    start = time.perf_counter()
    path = write_html(cube, tmp_path / "qwen3-shaped.html")
    written = time.perf_counter() - start
    stats = open_page(browser, path)
    canvases = browser.execute_script("return document.querySelectorAll('#grid canvas').length")
    size = path.stat().st_size
    print(f"\n448 heads x 128 tokens: file {size / 2**20:.2f} MiB, written in {written:.2f} s, "
          f"decode {stats['decodeMs']:.0f} ms, thumbnails {stats['renderMs']:.0f} ms, "
          f"ready {stats['readyAt']:.0f} ms after navigation start")
    assert canvases == 448
    assert size < 16 * 2**20
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "html_448_heads.png"))
    browser.find_element("css selector", '#grid td[data-layer="27"][data-head="15"] canvas').click()
    assert browser.find_element("id", "z-title").text == "Layer 27 · Head 15 · KV group 7"
    assert len(browser.find_elements("css selector", "#z-cols div")) == 128
    browser.save_screenshot(str(ARTIFACTS / "html_448_zoom.png"))


@pytest.mark.slow
def test_browser_real_encoder_page(browser, minilm_eager, tmp_path):
    from selenium.webdriver.common.by import By

    cube = eager_cube(minilm_eager, "The quick brown fox jumps over the lazy dog because it was bored.",
                      source="all-MiniLM-L6-v2")
    entropy = -(cube.pattern * cube.pattern.clamp(min=1e-12).log()).sum(-1).mean(-1)
    table = pd.DataFrame(
        [{"layer": l, "head": h, "entropy": float(entropy[l, h]), "cls_share": float(cube.pattern[l, h, :, 0].mean())}
         for l in range(cube.num_layers) for h in range(cube.num_heads)]
    )
    decoded, mask, _ = decode(write_html(cube, tmp_path / "minilm.html", metrics=table).read_text())
    assert mask.all(), "a bidirectional encoder has no empty cells"
    assert np.allclose(decoded, cube.pattern.numpy(), atol=cube.pattern.max().item() / 510 + 1e-7)

    open_page(browser, tmp_path / "minilm.html")
    browser.find_element(By.ID, "o-theme").click()
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "html_minilm_grid_dark.png"))
    browser.find_element(By.CSS_SELECTOR, '#grid td[data-layer="2"][data-head="7"] canvas').click()
    labels = [d.get_attribute("title").rsplit(" (#", 1)[0] for d in browser.find_elements(By.CSS_SELECTOR, "#z-cols div")]
    assert labels == cube.tokens and labels[0] == "[CLS]"
    assert f"{float(entropy[2, 7]):.3f}"[:4] in browser.find_element(By.CSS_SELECTOR, '#z-metrics tr[data-metric="entropy"]').text
    browser.save_screenshot(str(ARTIFACTS / "html_minilm_zoom_dark.png"))


def test_browser_weighting_switch_and_query_key_map(browser, tmp_path):
    """The page switches to the norm-weighted pattern, coloured as the grid colours it, and shows the
    zoomed head's KV-group query-key map with a hover readout of the point's token."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    from llm_heatmap.analyses.maps.qk_maps import layer_maps
    from test_qk_maps import qk_cube

    cube = qk_cube(layers=2, heads=4, kv_heads=2, tokens=12, seed=3)
    cube.value_norms = torch.rand(2, 4, 12, generator=torch.Generator().manual_seed(1)) * 3 + 0.1
    style = GridStyle(per_head_range=True)
    open_page(browser, write_html(cube, tmp_path / "norms.html", style=style, bits=16, qk_maps=layer_maps(cube)))
    Select(browser.find_element(By.ID, "o-weighting")).select_by_value("norms")
    wait_drawn(browser)
    weighted = cube.norm_weighted()
    for layer, head in ((0, 1), (1, 3)):
        allowed = cube.attendable()[layer].numpy()
        assert_same_colours(thumbnail_pixels(browser, layer, head), grid_colours(weighted, layer, head, style, bits=16),
                            allowed, style.cmap)
    browser.find_element(By.CSS_SELECTOR, '#grid td[data-layer="1"][data-head="3"] canvas').click()
    canvas = browser.find_element(By.ID, "z-qk")
    assert canvas.is_displayed() and "KV GROUP 1" in browser.find_element(By.ID, "z-qk-title").text.upper()
    readout = browser.find_element(By.ID, "z-qk-readout")
    width = int(canvas.get_attribute("width"))
    found = False
    for x in range(6, width - 6, 6):  # sweep the canvas until the pointer lands on a point
        for y in range(6, width - 6, 12):
            ActionChains(browser).move_to_element_with_offset(canvas, x - width // 2, y - width // 2).perform()
            if readout.get_attribute("data-position"):
                found = True
                break
        if found:
            break
    assert found, "hovering the map finds a point"
    position = int(readout.get_attribute("data-position"))
    assert f"w{position}" in readout.text and readout.get_attribute("data-kind") in ("query", "key")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "html_norms_qk.png"))
