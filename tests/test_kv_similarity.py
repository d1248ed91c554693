"""KV-group similarity: hand-computed head similarities, the permutation test, the all-heads JS matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llm_heatmap.analyses import group_gap, head_similarity_matrix, kv_group_similarity, layer_similarity
from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec
from llm_heatmap.probes import AttentionCube, attendable_mask


def spec_of(layers, heads, kv_heads, causal=True):
    return ModelSpec(model_type="test", architecture="Test", num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                     head_dim=4, causal=causal, layer_types=("full_attention",) * layers)


def cube_of(pattern, spec):
    keys = pattern.shape[-1]
    return AttentionCube.from_pattern(pattern.float(), spec, torch.arange(keys), [f"t{i}" for i in range(keys)])


def random_pattern(spec, keys, seed):
    generator = torch.Generator().manual_seed(seed)
    allowed = attendable_mask(spec, range(spec.num_layers), torch.arange(keys), torch.ones(keys, dtype=torch.bool))
    logits = 2 * torch.randn(spec.num_layers, spec.num_heads, keys, keys, generator=generator)
    return logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)


def entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def test_js_similarity_hand_computed():
    # bidirectional, two keys: every row is a spread row
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    c = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    pattern = torch.stack([a, b, c])
    mask = torch.ones(2, 2, dtype=torch.bool)
    s = layer_similarity(pattern, mask, "js")
    js_ac = entropy([0.75, 0.25]) - (0 + math.log(2)) / 2
    assert s[0, 1].item() == pytest.approx(0.0, abs=1e-12)  # disjoint rows: JS = ln 2
    assert s[0, 2].item() == pytest.approx(1 - js_ac / math.log(2))
    assert s[1, 2].item() == pytest.approx(1 - js_ac / math.log(2))
    assert torch.allclose(s.diagonal(), torch.ones(3, dtype=torch.float64))


def test_causal_zeros_and_single_key_rows_do_not_count():
    a = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    b = torch.tensor([[1.0, 0, 0], [0.6, 0.4, 0], [0.5, 0.3, 0.2]])
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    entries_a = np.array([0.5, 0.5, 0.2, 0.3, 0.5])  # rows 1 and 2 only: row 0 has one key
    entries_b = np.array([0.6, 0.4, 0.5, 0.3, 0.2])
    pattern = torch.stack([a, b])
    pearson = layer_similarity(pattern, mask, "pearson")[0, 1].item()
    cosine = layer_similarity(pattern, mask, "cosine")[0, 1].item()
    assert pearson == pytest.approx(np.corrcoef(entries_a, entries_b)[0, 1])
    assert cosine == pytest.approx(entries_a @ entries_b / np.linalg.norm(entries_a) / np.linalg.norm(entries_b))
    # counting the zero triangle and row 0 would inflate both
    assert np.corrcoef(a.flatten(), b.flatten())[0, 1] > pearson + 0.1
    full = a.flatten() @ b.flatten() / a.flatten().norm() / b.flatten().norm()
    assert full.item() > cosine + 0.01
    js = layer_similarity(pattern, mask, "js")[0, 1].item()
    row1 = entropy([0.55, 0.45]) - (entropy([0.5, 0.5]) + entropy([0.6, 0.4])) / 2
    row2 = entropy([0.35, 0.3, 0.35]) - (entropy([0.2, 0.3, 0.5]) + entropy([0.5, 0.3, 0.2])) / 2
    assert js == pytest.approx(1 - (row1 + row2) / 2 / math.log(2))


def test_dropping_first_token_renormalises_js_rows():
    mask = torch.ones(3, 3, dtype=torch.bool)
    a = torch.tensor([[0.8, 0.1, 0.1], [0.8, 0.15, 0.05], [0.2, 0.4, 0.4]])
    b = torch.tensor([[0.2, 0.4, 0.4], [0.4, 0.45, 0.15], [0.8, 0.1, 0.1]])
    pattern = torch.stack([a, b])
    dropped = layer_similarity(pattern, mask, "js", drop_first=0)
    kept = layer_similarity(pattern, mask, "js")
    assert dropped[0, 1].item() == pytest.approx(1.0)  # the same distribution once the sink column is gone
    assert kept[0, 1].item() < 0.95
    assert layer_similarity(pattern, mask, "cosine", drop_first=0)[0, 1].item() < 1.0  # not renormalised


def test_group_gap_hand_computed_and_permutation_p_value():
    s = torch.tensor([[1.0, 0.9, 0.2, 0.1],
                      [0.9, 1.0, 0.3, 0.2],
                      [0.2, 0.3, 1.0, 0.7],
                      [0.1, 0.2, 0.7, 1.0]], dtype=torch.float64)
    result = group_gap(s, [0, 0, 1, 1], n_permutations=3000, seed=1)
    assert result["within"] == pytest.approx((0.9 + 0.7) / 2)
    assert result["between"] == pytest.approx((0.2 + 0.1 + 0.3 + 0.2) / 4)
    assert result["gap"] == pytest.approx(0.8 - 0.2)
    # 3 ways to pair 4 heads into two groups of two; only the true pairing reaches the gap
    assert result["p_value"] == pytest.approx(1 / 3, abs=0.03)
    assert group_gap(s, [0, 0, 1, 1], n_permutations=3000, seed=1) == result
    with pytest.raises(InputError):
        group_gap(s, [0, 0, 0, 0])


def test_identical_heads_in_a_group_are_fully_similar():
    spec = spec_of(2, 9, 3)
    base = random_pattern(spec_of(2, 3, 3), 10, seed=0)
    pattern = base.repeat_interleave(3, dim=1)  # each KV group: three copies of one head
    table = kv_group_similarity(cube_of(pattern, spec), n_permutations=500, seed=0)
    assert len(table) == 2 * 2 * 3
    assert list(table.columns) == ["layer", "measure", "first_token", "grouping", "group_size", "within", "between",
                                   "gap", "p_value", "n_permutations"]
    assert (table.grouping == "kv").all() and (table.group_size == 3).all()
    np.testing.assert_allclose(table.within, 1.0, atol=1e-6)
    assert (table.gap > 0).all()
    # 280 ways to split 9 heads into three groups of three; only the true one reaches the gap
    assert (table.p_value < 0.02).all()


def test_mha_uses_pseudo_groups():
    spec = spec_of(1, 6, 6, causal=False)
    table = kv_group_similarity(cube_of(random_pattern(spec, 7, seed=1), spec), pseudo_group_size=2,
                                measures=("js",), n_permutations=100)
    assert (table.grouping == "pseudo").all() and (table.group_size == 2).all()
    assert table.p_value.between(0, 1).all() and not table.isna().any().any()
    with pytest.raises(InputError):
        kv_group_similarity(cube_of(random_pattern(spec, 7, seed=1), spec), measures=("euclid",))


def test_head_similarity_matrix_matches_pairwise_reference():
    spec = spec_of(2, 3, 3)
    pattern = random_pattern(spec, 6, seed=2)
    pattern[1, 2] = pattern[0, 0]  # an identical head in another layer
    result = head_similarity_matrix(cube_of(pattern, spec))
    assert result.labels[0] == (0, 0) and result.labels[5] == (1, 2)
    assert result.divergence[0, 5].item() == pytest.approx(0.0, abs=1e-7)
    assert sorted(result.order) == list(range(6))
    assert abs(result.order.index(0) - result.order.index(5)) == 1  # clustered side by side
    # one pair by hand: mean row-wise JS over rows 1..5 (row 0 has one key)
    p, q = pattern[0, 1].double(), pattern[1, 0].double()
    rows = [entropy(((p[i] + q[i]) / 2)[: i + 1].tolist()) - (entropy(p[i, : i + 1].tolist()) + entropy(q[i, : i + 1].tolist())) / 2
            for i in range(1, 6)]
    assert result.divergence[1, 3].item() == pytest.approx(np.mean(rows), abs=1e-6)
    assert torch.allclose(result.divergence, result.divergence.T)
    frame = result.frame()
    assert frame.shape == (6, 6) and frame.index[0] == f"L{result.labels[result.order[0]][0]}.H{result.labels[result.order[0]][1]}"
    sub = head_similarity_matrix(cube_of(pattern, spec), max_rows=3, drop_first_token=True)
    assert sub.similarity.shape == (6, 6) and not torch.isnan(sub.similarity).any()


def test_real_smollm2_and_minilm(smollm2_eager, minilm_eager):
    for (model, tokenizer, spec), grouping in ((smollm2_eager, "kv"), (minilm_eager, "pseudo")):
        ids = tokenizer("Heads that share a key and value projection might attend alike.", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model(ids, output_attentions=True)
        cube = cube_of(torch.stack(out.attentions, 1)[0], spec)
        table = kv_group_similarity(cube.select(layers=[0, 1]), n_permutations=200)
        assert (table.grouping == grouping).all() and len(table) == 2 * 2 * 3
        assert not table.isna().any().any() and table.p_value.between(0, 1).all()
