"""One way to show a token in every view (issue 21, item 4): `viz.labels.token_text`."""

from __future__ import annotations

import json
import re

import pytest
import torch

from llm_heatmap.models.spec import ModelSpec
from llm_heatmap.probes import AttentionCube
from llm_heatmap.viz import html_view, plot_grid
from llm_heatmap.viz.labels import token_label, token_text


@pytest.mark.parametrize("raw, shown", [
    ("Ġa", "␣a"), ("Ċ", "\\n"), ("ĊĊ", "\\n\\n"), ("ĉx", "\\tx"), ("▁the", "␣the"), ("Ã©", "é"),
    ("é", "é"), ("##ing", "##ing"), ("[CLS]", "[CLS]"), ("<|im_start|>", "<|im_start|>"), ("a b\n", "a␣b\\n"),
    ("Ġme|Ġthe", "␣me|␣the"),
])
def test_token_text(raw, shown):
    assert token_text(raw) == shown
    assert token_label(raw) == shown  # the figures draw the same text (short tokens are not cut)


def _cube(tokens):
    n = len(tokens)
    spec = ModelSpec(model_type="llama", architecture="LlamaForCausalLM", num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=8, causal=True, layer_types=("full_attention",))
    logits = torch.randn(1, 2, n, n, generator=torch.Generator().manual_seed(0))
    logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return AttentionCube.from_pattern(logits.softmax(-1), spec, torch.arange(n), tokens, prompt="x", source="t")


def test_png_and_html_show_the_same_token_text():
    tokens = ["<s>", "ĠThe", "Ġcat", "Ċ", "Ġsat"]
    page = html_view(_cube(tokens)).page
    meta = json.loads(re.search(r'<script id="hm-meta" type="application/json">(.*?)</script>', page, re.S)
                      .group(1).replace("\\/", "/"))
    assert [c["t"] for c in meta["cols"]] == ["<s>", "␣The", "␣cat", "\\n", "␣sat"]
    assert [c["r"] for c in meta["cols"]] == tokens  # the raw token, for hover
    drawn = plot_grid(_cube(tokens), cell_px=40)
    texts = {t.get_text() for t in drawn.figure.texts}
    assert {"␣The", "␣cat", "\\n", "␣sat"} <= texts and not any("Ġ" in t or "Ċ" in t for t in texts)
