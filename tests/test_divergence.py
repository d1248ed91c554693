"""All-heads divergences: the fast exact JS and the Bhattacharyya affinity against hand computations,
scipy, the old pair-by-pair JS (tests/js_reference.py) and float64, on random, tiny and real models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from llm_heatmap.analyses.similarity import divergence
from llm_heatmap.analyses.similarity.divergence import bhattacharyya_matrix, js_divergence_matrix
from llm_heatmap.analyses.similarity.kv_similarity import head_distributions, head_similarity_matrix
from llm_heatmap.probes import capture_prompt, capture
from js_reference import pairwise_js_divergence
from tiny_models import VOCAB, tiny_model

# stated tolerance of the fast path against the old pair-by-pair JS and against float64, in nats
TOLERANCE = 1e-6


def entropy(values) -> float:
    return -sum(x * math.log(x) for x in values if x > 0)


def test_hand_computed_three_heads():
    # heads x rows x keys; head 2 has no second row (all zero), so its pairs average row 0 only
    p = torch.tensor([
        [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]],
        [[0.0, 1.0, 0.0], [0.5, 0.25, 0.25]],
        [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]],
    ])
    js = js_divergence_matrix(p)
    row1 = entropy([0.5, 0.375, 0.125]) - (entropy([0.5, 0.5]) + entropy([0.5, 0.25, 0.25])) / 2
    assert js[0, 1].item() == pytest.approx((math.log(2) + row1) / 2, abs=1e-7)  # row 0: disjoint, ln 2
    assert js[0, 2].item() == pytest.approx(entropy([0.75, 0.25]) - math.log(2) / 2, abs=1e-7)
    assert js[1, 2].item() == pytest.approx(entropy([0.25, 0.75]) - math.log(2) / 2, abs=1e-7)
    assert torch.equal(js, js.T) and js.diagonal().abs().max() == 0
    bc = bhattacharyya_matrix(p)
    assert bc[0, 1].item() == pytest.approx((0 + math.sqrt(0.25) + math.sqrt(0.125)) / 2)
    assert bc[0, 2].item() == pytest.approx(math.sqrt(0.5))
    assert bc[1, 2].item() == pytest.approx(math.sqrt(0.5))
    np.testing.assert_allclose(bc.diagonal(), 1.0, atol=1e-7)


def random_rows(heads, rows, keys, *, window=None, seed=0, scale=3.0):
    """Causal (optionally sliding-window) softmax rows, the first row left out as a single-key row."""
    generator = torch.Generator().manual_seed(seed)
    i, j = torch.arange(rows)[:, None], torch.arange(keys)[None, :]
    allowed = (j <= i) if window is None else (j <= i) & (j > i - window)
    logits = torch.randn(heads, rows, keys, generator=generator) * scale
    p = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    p[:, 0] = 0
    return p


def float64_reference(p: torch.Tensor, pairs) -> dict:
    """JS (nats) per pair from scipy, in float64, over the rows both heads hold."""
    p = p.double().numpy()
    out = {}
    for a, b in pairs:
        rows = [i for i in range(p.shape[1]) if p[a, i].sum() > 0 and p[b, i].sum() > 0]
        out[a, b] = float(np.mean([jensenshannon(p[a, i], p[b, i]) ** 2 for i in rows]))
    return out


@pytest.mark.parametrize("window", [None, 7])
def test_random_heads_against_scipy_and_the_pairwise_reference(window, monkeypatch):
    # small buffers so that row blocks, pair chunks and pair groups all have several steps
    monkeypatch.setattr(divergence, "_CHUNK_ELEMENTS", 3000)
    monkeypatch.setattr(divergence, "_PAIR_ROWS", 2000)
    p = random_rows(20, 70, 70, window=window, seed=1)
    fast = js_divergence_matrix(p)
    assert (fast - pairwise_js_divergence(p)).abs().max().item() < TOLERANCE
    pairs = [(0, 1), (3, 17), (5, 19), (11, 12)]
    for (a, b), value in float64_reference(p, pairs).items():
        assert fast[a, b].item() == pytest.approx(value, abs=TOLERANCE)
    roots = p.double().sqrt()
    rows = p.sum(-1) > 0
    expected = (roots[3] * roots[17]).sum(-1)[rows[3] & rows[17]].mean().item()
    assert bhattacharyya_matrix(p)[3, 17].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("family", ["mistral", "gemma3", "bert"])
def test_tiny_models_against_the_pairwise_reference(family):
    model = tiny_model(family)
    ids = torch.randint(1, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), capture(model) as probe:
        model(input_ids=ids)
    cube = probe.cube(ids)
    for drop in (False, True):
        p = head_distributions(cube, drop_first_token=drop)
        assert (js_divergence_matrix(p) - pairwise_js_divergence(p)).abs().max().item() < TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "minilm"])
def test_real_models_against_the_pairwise_reference_and_float64(name, request):
    model, tokenizer, spec = request.getfixturevalue(name)
    text = ("The head atlas compares every attention head over many prompts. Heads that look back one token, "
            "heads that rest on the first token and heads that copy earlier tokens all show up in it.")
    cube = capture_prompt(model, tokenizer, text, spec=spec)
    p = head_distributions(cube)
    fast = js_divergence_matrix(p)
    assert (fast - pairwise_js_divergence(p)).abs().max().item() < TOLERANCE
    heads = p.shape[0]
    pairs = [(0, heads - 1), (1, 2), (heads // 2, heads // 3), (5, heads - 7)]
    for (a, b), value in float64_reference(p, pairs).items():
        assert fast[a, b].item() == pytest.approx(value, abs=TOLERANCE)
    result = head_similarity_matrix(cube, measure="hellinger")
    assert result.measure == "hellinger" and torch.allclose(result.divergence, 1 - result.similarity, atol=1e-12)
    assert result.similarity.diagonal().sub(1).abs().max() < 1e-6 and sorted(result.order) == list(range(heads))
