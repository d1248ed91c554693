"""Query-key maps (AttentionViz): the alignment keeps every attention pattern, the points are the captured
tokens, and the figures and the HTML view show them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llm_heatmap.analyses import qk_map
from llm_heatmap.analyses.maps.qk_maps import align_queries_and_keys, project
from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec
from llm_heatmap.probes import AttentionCube, attendable_mask


def qk_cube(layers=2, heads=4, kv_heads=2, tokens=11, dim=8, seed=0) -> AttentionCube:
    """A causal GQA cube whose pattern is softmax(q k^T / sqrt(d)) of its own random queries and keys."""
    spec = ModelSpec(model_type="toy", architecture="Toy", num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                     head_dim=dim, causal=True, layer_types=("full_attention",) * layers)
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(layers, heads, tokens, dim, generator=generator) + 1.5  # off-centre, as real queries are
    keys = torch.randn(layers, kv_heads, tokens, dim, generator=generator) * 2 - 1
    expanded = keys.repeat_interleave(heads // kv_heads, dim=1)
    scores = queries @ expanded.transpose(-1, -2) / math.sqrt(dim)
    allowed = attendable_mask(spec, range(layers), torch.arange(tokens), torch.ones(tokens, dtype=torch.bool))
    pattern = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    return AttentionCube.from_pattern(pattern, spec, torch.arange(tokens), [f"w{i}" for i in range(tokens)],
                                      queries=queries, keys=keys, prompt="toy", source="toy")


def test_alignment_keeps_every_attention_pattern_and_scaling_keeps_dot_products():
    cube = qk_cube()
    queries, keys = cube.queries[1, 2:4], cube.keys[1, 1]  # KV group 1 of layer 1: heads 2 and 3
    aligned_q, aligned_k = align_queries_and_keys(queries, keys)
    mask = ~torch.ones(11, 11, dtype=torch.bool).tril()
    before = (queries.double() @ keys.double().T / math.sqrt(8)).masked_fill(mask, float("-inf")).softmax(-1)
    after = (aligned_q @ aligned_k.T / math.sqrt(8)).masked_fill(mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(after, before, atol=1e-12, rtol=0)
    scale = aligned_q[0, 0, 0] / queries[0, 0, 0].double()  # queries x s, keys / s
    torch.testing.assert_close(aligned_k.mean(0) * scale, queries.double().reshape(-1, 8).mean(0), atol=1e-10, rtol=0,
                               msg="before scaling, the keys' centroid is the queries' centroid")
    assert float(aligned_q.norm(dim=-1).mean()) == pytest.approx(float(aligned_k.norm(dim=-1).mean()), rel=1e-12)
    # the scale alone changes no dot product at all
    translated = keys.double() - keys.double().mean(0) + queries.double().reshape(-1, 8).mean(0)
    torch.testing.assert_close(aligned_q @ aligned_k.T, queries.double() @ translated.T, atol=1e-10, rtol=0)


def test_map_points_are_the_captured_tokens():
    cube = qk_cube()
    group = qk_map(cube, 1, group=1)
    assert group.heads == (2, 3) and group.points.shape == (3 * 11, 2)
    assert group.is_key.tolist() == [False] * 22 + [True] * 11
    assert group.head.tolist() == [2] * 11 + [3] * 11 + [-1] * 11
    assert group.position.tolist() == list(range(11)) * 3 and group.tokens[12] == "w1"
    # PCA of the aligned points, by hand
    q, k = align_queries_and_keys(cube.queries[1, 2:4], cube.keys[1, 1])
    points = torch.cat([q.reshape(-1, 8), k])
    centred = points - points.mean(0)
    _, values, vectors = torch.linalg.svd(centred, full_matrices=False)
    expected = centred @ vectors[:2].T
    signs = torch.sign((expected * group.points.double()).sum(0))  # an axis may come out flipped
    torch.testing.assert_close(group.points.double(), expected * signs, atol=1e-5, rtol=0)
    assert sum(group.explained) == pytest.approx(float((values[:2] ** 2).sum() / (values**2).sum()), rel=1e-6)
    one = qk_map(cube, 0, head=1)
    assert one.heads == (1,) and one.group == 0 and one.points.shape == (22, 2)


def test_bad_requests_say_what_to_do():
    cube = qk_cube()
    with pytest.raises(InputError, match="exactly one"):
        qk_map(cube, 0)
    with pytest.raises(InputError, match="layer 5"):
        qk_map(cube, 5, head=0)
    with pytest.raises(InputError, match="queries_and_keys=True"):
        qk_map(AttentionCube.from_pattern(cube.pattern, cube.spec, cube.token_ids), 0, head=0)
    with pytest.raises(InputError, match="method='tsne' needs scikit-learn|method"):
        project(torch.randn(10, 4, generator=torch.Generator().manual_seed(10)), "nope")


def test_tsne_and_umap_are_optional():
    import importlib.util

    for method, module in (("tsne", "sklearn"), ("umap", "umap")):
        if importlib.util.find_spec(module) is None:
            with pytest.raises(InputError, match=rf"method='{method}' needs .*pip install 'llm-heatmap\[maps\]'"):
                project(torch.randn(30, 4, generator=torch.Generator().manual_seed(30)), method)
        else:
            points, explained = project(torch.randn(30, 4, generator=torch.Generator().manual_seed(30)), method)
            assert points.shape == (30, 2) and explained is None


def test_figures_draw_every_point(tmp_path):
    from matplotlib.collections import PathCollection

    from llm_heatmap.viz import plot_qk_map, plot_qk_maps, save_figure

    cube = qk_cube()
    one = plot_qk_map(qk_map(cube, 1, group=1))
    panel = [ax for ax in one.axes if ax.get_title()][0]
    assert sum(len(c.get_offsets()) for c in panel.collections if isinstance(c, PathCollection)) == 33
    assert len([t for t in one.texts + [t for ax in one.axes for t in ax.texts] if t.get_text() == "w3"]) == 3
    layer = plot_qk_maps([qk_map(cube, 0, head=h) for h in range(4)], columns=2)
    assert len([ax for ax in layer.axes if ax.get_title().startswith("L0 head")]) == 4
    assert save_figure(layer, tmp_path / "qk.png").stat().st_size > 0
    assert one._repr_png_().startswith(b"\x89PNG")


def test_html_view_embeds_each_groups_map(tmp_path):
    import base64
    import json
    import re

    from llm_heatmap.viz import write_html

    cube = qk_cube()
    maps = [qk_map(cube, layer, group=g) for layer in (0, 1) for g in (0, 1)]
    page = write_html(cube, tmp_path / "qk.html", qk_maps=maps).read_text()
    meta = json.loads(re.search(r'<script id="hm-meta" type="application/json">(.*?)</script>', page, re.S).group(1))
    entry = meta["qk"]["1,1"]
    assert entry["heads"] == [2, 3] and entry["keys"] == 11 and entry["positions"][11] == 0
    points = np.frombuffer(base64.b64decode(entry["points"]), dtype="<f4").reshape(-1, 2)
    assert np.allclose(points, maps[3].points.numpy())


def test_single_map_title_is_whole_and_heads_have_their_own_markers():
    """A one-panel figure wrapped its heading instead of cutting it; heads of a group differ by marker (issue 21)."""
    from llm_heatmap.viz import plot_qk_map

    fig = plot_qk_map(qk_map(qk_cube(), 1, group=1))
    assert "…" not in fig._suptitle.get_text() and "nearness tracks q·k" in fig._suptitle.get_text()
    ax = fig.axes[0]
    markers = {tuple(map(tuple, c.get_paths()[0].vertices.round(3))) for c in ax.collections[1:]}
    assert len(ax.collections) == 3 and len(markers) == 2  # keys, then two query heads with two markers
