"""One geometry: which cells may carry attention, at full resolution and in pooled bins, and how bins
are cut; every view (PNG, HTML) and the metrics agree on it, also for a sliding-window model streamed
past its window."""

from __future__ import annotations

import base64
import json
import re

import matplotlib.image as mimage
import numpy as np
import pandas as pd
import pytest
import torch

from llm_heatmap.analyses import head_metrics
from llm_heatmap.analyses.heads.metrics import HeadMetricsReducer
from llm_heatmap.models import ModelSpec
from llm_heatmap.probes import AttentionCube, Downsampler, capture, downsample
from llm_heatmap.probes.geometry import Spans, attendable, attendable_mask, bin_edges, bin_index, kernel_causality
from llm_heatmap.viz import save_grid, write_html
from tiny_models import VOCAB, tiny_model


def spec(causal=True, window=None, layers=1, blocks=()):
    types = ("sliding_attention" if window else "full_attention",) * layers
    return ModelSpec(model_type="toy", architecture="Toy", num_layers=layers, num_heads=1, num_kv_heads=1, head_dim=4,
                     causal=causal, layer_types=types, sliding_window=window, bidirectional_blocks=blocks)


def test_full_resolution_by_hand():
    real = torch.tensor([False, True, True, True, True])  # one left-padding key
    causal = attendable_mask(spec(), [0], torch.arange(5), real)[0]
    assert causal.int().tolist() == [[0, 0, 0, 0, 0],
                                     [0, 1, 0, 0, 0],
                                     [0, 1, 1, 0, 0],
                                     [0, 1, 1, 1, 0],
                                     [0, 1, 1, 1, 1]]
    window = attendable_mask(spec(window=2), [0], torch.arange(5), torch.ones(5, dtype=torch.bool))[0]
    assert window.int().tolist() == [[1, 0, 0, 0, 0],
                                     [1, 1, 0, 0, 0],
                                     [0, 1, 1, 0, 0],
                                     [0, 0, 1, 1, 0],
                                     [0, 0, 0, 1, 1]]  # q - k < 2, as transformers' sliding masks
    encoder = attendable_mask(spec(causal=False), [0], torch.tensor([3, 4]), real)[0]
    assert encoder.int().tolist() == [[0, 1, 1, 1, 1]] * 2
    image = attendable_mask(spec(window=2, blocks=((1, 3),)), [0], torch.arange(5), torch.ones(5, dtype=torch.bool))[0]
    assert image.int().tolist() == [[1, 0, 0, 0, 0],
                                    [1, 1, 1, 1, 0],
                                    [0, 1, 1, 1, 0],
                                    [0, 0, 1, 1, 0],
                                    [0, 0, 0, 1, 1]]  # positions 1..3 see later ones (Gemma 3's image tokens); the window stays
    rows = attendable(spec(), [0], Spans.points([0, 1]), Spans.points(torch.arange(3)), torch.ones(3, dtype=torch.bool),
                      query_real=torch.tensor([False, True]))[0]
    assert rows.int().tolist() == [[0, 0, 0], [1, 1, 0]], "a padded query row attends nothing"


def test_causality_is_read_from_the_kernel_call():
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    image = causal.clone()
    image[1:4, 1:4] = True  # positions 1..3 see each other
    additive = torch.zeros(5, 5).masked_fill(~image, torch.finfo(torch.float32).min)
    assert kernel_causality("eager", additive[None, None], True, 5, 5, declared=True) == (True, ((1, 3),))
    assert kernel_causality("sdpa", image[None, None], True, 5, 5, declared=False) == (False, ())
    assert kernel_causality("sdpa", causal[None, None], False, 5, 5, declared=False) == (True, ()), "CLIP's text"
    assert kernel_causality("sdpa", None, True, 5, 5, declared=False) == (True, ())
    assert kernel_causality("eager", None, True, 5, 5, declared=True) == (False, ()), "eager applies no is_causal"
    assert kernel_causality("sdpa", None, True, 1, 5, declared=True) == (True, ()), "a decode step keeps the spec's"
    padded = causal.clone()
    padded[0] = True  # a padding row the mask lets see every key is no block
    assert kernel_causality("sdpa", padded[None, None], True, 5, 5, declared=True) == (True, ())
    two = torch.stack([image, causal])[:, None]  # a spec holds one sequence's blocks
    assert kernel_causality("sdpa", two, True, 5, 5, declared=True) == (True, ())


@pytest.mark.parametrize("causal,window,blocks", [(True, None, ()), (True, 3, ()), (False, None, ()), (False, 4, ()),
                                                  (True, None, ((2, 9), (14, 15))), (True, 3, ((1, 7),))])
def test_a_bin_is_attendable_exactly_when_some_pair_inside_is(causal, window, blocks):
    generator = torch.Generator().manual_seed(0)
    model = spec(causal=causal, window=window, blocks=blocks)
    for trial in range(20):
        n = int(torch.randint(3, 40, (1,), generator=generator))
        bins = int(torch.randint(1, n + 1, (1,), generator=generator))
        real = torch.rand(n, generator=generator) > 0.15
        full = attendable_mask(model, [0], torch.arange(n), real)[0]
        full &= real[:, None]
        edges = bin_edges(n, bins)
        onehot = torch.nn.functional.one_hot(bin_index(n, bins)).float()
        expected = torch.einsum("q a, q k, k b -> a b", onehot, full.float(), onehot) > 0
        spans = Spans.from_edges(edges)
        bin_real = onehot.T @ real.float() > 0
        pooled = attendable(model, [0], spans, spans, bin_real, bin_real)[0]
        if window is None and causal and not blocks:  # exact: any real row and key with first(B) <= last(A)
            assert torch.equal(pooled, expected)
        else:  # with padding inside a bin the span test may keep a bin whose real pairs all fall outside
            assert (pooled | ~expected).all(), "every bin with an attendable pair is attendable"
        if real.all():
            assert torch.equal(pooled, expected), f"n={n}, bins={bins}"


def test_bins_are_the_one_rule():
    assert bin_edges(5, 2) == [0, 3, 5] and bin_index(5, 2).tolist() == [0, 0, 0, 1, 1]
    assert bin_edges(7, 7) == list(range(8)) and bin_edges(3, 10) == [0, 1, 2, 3]
    sizes = np.diff(bin_edges(1000, 256))
    assert len(sizes) == 256 and set(sizes) <= {3, 4}


@pytest.mark.parametrize("keys", [48, 45, 5])
def test_equal_bins_are_summed_as_the_scatter_sums_them(keys):
    """`pool_keys` with the bins' one width (a product with ones) against the scatter over each key's bin, on the
    first `keys` of 48 keys in 12 bins of 4: every bin, the last one cut short, one bin and a part."""
    from llm_heatmap.probes.geometry import bin_width, edges_index, pool_keys

    edges = bin_edges(48, 12)
    assert bin_width(edges) == 4 and bin_width(bin_edges(50, 12)) is None
    values = torch.rand(2, 3, 48, generator=torch.Generator().manual_seed(5))[..., :keys]
    bins, count = edges_index(edges)[:keys], -(-keys // 4)
    scattered = torch.zeros(2, 3, count).index_add_(-1, bins, values)
    torch.testing.assert_close(pool_keys(values, bins, count, bin_width(edges)), scattered)
    torch.testing.assert_close(pool_keys(values, bins, count), scattered)


def random_cube(tokens: int, layers: int, heads: int, window: int | None) -> AttentionCube:
    model = ModelSpec(model_type="toy", architecture="Toy", num_layers=layers, num_heads=heads, num_kv_heads=heads,
                      head_dim=4, causal=True, layer_types=("sliding_attention",) * layers, sliding_window=window)
    allowed = attendable_mask(model, range(layers), torch.arange(tokens), torch.ones(tokens, dtype=torch.bool))
    logits = torch.randn(layers, heads, tokens, tokens, generator=torch.Generator().manual_seed(2))
    pattern = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    return AttentionCube.from_pattern(pattern, model, torch.arange(tokens))


def test_pooling_a_pooled_cube_composes_the_bins():
    cube = random_cube(tokens=37, layers=2, heads=2, window=6)
    once = downsample(downsample(cube, 12), 5)
    direct = downsample(cube, 5)
    assert once.pooling.key_edges == tuple(np.asarray(bin_edges(37, 12))[bin_edges(12, 5)])
    # rows are averaged weighted by the rows each pooled row stands for: the same as pooling the composed bins
    from llm_heatmap.probes.geometry import area_pool

    expected = area_pool(cube.pattern, once.pooling.query_edges, once.pooling.key_edges)
    torch.testing.assert_close(once.pattern, expected, atol=1e-6, rtol=0)
    assert direct.pattern.shape == once.pattern.shape
    torch.testing.assert_close(once.pattern.sum(-1), torch.ones_like(once.pattern.sum(-1)), atol=1e-5, rtol=0)


# ---- every view agrees ----------------------------------------------------------------------

def decode_html_mask(path) -> np.ndarray:
    page = path.read_text()
    meta = json.loads(re.search(r'<script id="hm-meta" type="application/json">(.*?)</script>', page, re.S).group(1))
    packed = np.frombuffer(base64.b64decode(re.search(r'<script id="hm-mask"[^>]*>(.*?)</script>', page, re.S).group(1)),
                           dtype=np.uint8)
    layers, rows, cols = len(meta["layers"]), len(meta["rows"]), len(meta["cols"])
    return np.unpackbits(packed.reshape(layers, -1), axis=1)[:, : rows * cols].reshape(layers, rows, cols).astype(bool)


def png_drawn(path, layout) -> np.ndarray:
    """bool `"l q k"`: which cells of head 0 of every layer the PNG colours (the rest is white background)."""
    png = (mimage.imread(path)[..., :3] * 255).round().astype(int)
    q, k = layout.panel_shape
    out = []
    for layer in layout.layers:
        x0, y0, _, _ = layout.panel(layer, layout.heads[0])
        c = layout.cell_px
        centres = png[np.ix_(y0 + c * np.arange(q) + c // 2, x0 + c * np.arange(k) + c // 2)]
        out.append(~(centres == 255).all(-1))
    return np.stack(out)


def pooled_any(mask: torch.Tensor, size: int) -> np.ndarray:
    onehot = torch.nn.functional.one_hot(bin_index(mask.shape[-1], size)).float()
    return (torch.einsum("q a, l q k, k b -> l a b", onehot, mask.float(), onehot) > 0).numpy()


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_png_html_and_metrics_agree_on_a_sliding_window_model_past_its_window(family, tmp_path):
    model = tiny_model(family, "sdpa")
    window = model.config.sliding_window
    tokens = 23  # well past the window (5 for mistral, 4 for gemma3)
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(1))
    sampler, reducer = Downsampler(8), HeadMetricsReducer()
    with torch.no_grad(), capture(model, consumers=[sampler, reducer]) as probe:
        model(input_ids=ids)
    full, streamed = probe.cube(ids), sampler.cube()
    mask = full.attendable()

    # the geometry is the model's own mask: weights are positive exactly on attendable cells
    assert torch.equal(full.pattern.gt(0).all(1), mask) and not full.pattern.gt(0).any(1)[~mask].any()
    sliding = [i for i, layer in enumerate(full.layers) if full.spec.window(layer)]
    assert sliding and not mask[sliding[0], tokens - 1, : tokens - window].any()

    # metrics: streamed equals kept, and the spread of each row counts exactly its attendable keys
    table = head_metrics(full)
    pd.testing.assert_frame_equal(table, reducer.table(), check_exact=False, atol=1e-6)
    n = mask.sum(-1).double()  # "l q"
    spread = n >= 2
    p = full.pattern.double()
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)  # "l h q"
    expected = ((entropy / n.clamp(min=2).log()[:, None]) * spread[:, None]).sum(-1) / spread.sum(-1)[:, None]
    torch.testing.assert_close(torch.tensor(table["norm_entropy"].to_numpy()).reshape(expected.shape), expected,
                               atol=1e-5, rtol=0)

    # full resolution: the PNG and the HTML draw exactly the attendable cells
    layout = save_grid(full, tmp_path / "full.png", cell_px=3)
    assert np.array_equal(png_drawn(tmp_path / "full.png", layout), mask.numpy())
    assert np.array_equal(decode_html_mask(write_html(full, tmp_path / "full.html")), mask.numpy())

    # pooled to 8 x 8, streamed or after the fact: a bin is drawn exactly when a pair inside it may attend
    expected_bins = pooled_any(mask, 8)
    for name, cube in (("streamed", streamed), ("pooled", full)):
        layout = save_grid(cube, tmp_path / f"{name}.png", cell_px=3, max_tokens=8)
        assert layout.downsampled and layout.panel_shape == (8, 8)
        assert np.array_equal(png_drawn(tmp_path / f"{name}.png", layout), expected_bins), name
        html = write_html(cube, tmp_path / f"{name}.html", max_tokens=8)
        assert np.array_equal(decode_html_mask(html), expected_bins), name
    assert np.array_equal(streamed.attendable().numpy(), expected_bins)
