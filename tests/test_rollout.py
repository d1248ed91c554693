"""Attention rollout: a hand-computed 2-layer example and the invariants (rows sum to 1, causal stays causal)."""

from __future__ import annotations

import pytest
import torch

from llm_heatmap.analyses import rollout
from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec
from llm_heatmap.probes import AttentionCube


def cube_of(pattern, causal=True, layers=None):
    keys = pattern.shape[-1]
    spec = ModelSpec(model_type="test", architecture="Test", num_layers=8, num_heads=pattern.shape[1],
                     num_kv_heads=pattern.shape[1], head_dim=4, causal=causal, layer_types=("full_attention",) * 8)
    return AttentionCube(pattern=pattern, spec=spec, tokens=[f"t{i}" for i in range(keys)], token_ids=torch.arange(keys),
                         layers=tuple(layers or range(pattern.shape[0])), heads=tuple(range(pattern.shape[1])),
                         query_positions=torch.arange(keys), key_mask=torch.ones(keys, dtype=torch.bool),
                         query_mask=torch.ones(keys, dtype=torch.bool))


def test_hand_computed_two_layer_example():
    # layer 0: heads average to [[1,0,0],[.5,.5,0],[.5,.25,.25]]
    layer0 = torch.tensor([[[1, 0, 0], [1, 0, 0], [0.5, 0.5, 0]],
                           [[1, 0, 0], [0, 1, 0], [0.5, 0, 0.5]]])
    # layer 1: both heads [[1,0,0],[0,1,0],[0,0,1]] and [[1,0,0],[1,0,0],[1,0,0]] -> mean [[1,0,0],[.5,.5,0],[.5,0,.5]]
    layer1 = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
                           [[1, 0, 0], [1, 0, 0], [1, 0, 0]]])
    result = rollout(cube_of(torch.stack([layer0, layer1]).float()))
    # 0.5 * mean + 0.5 * I (rows already sum to 1)
    first = torch.tensor([[1, 0, 0], [0.25, 0.75, 0], [0.25, 0.125, 0.625]], dtype=torch.float64)
    second = torch.tensor([[1, 0, 0], [0.25, 0.75, 0], [0.25, 0, 0.75]], dtype=torch.float64)
    torch.testing.assert_close(result[0], first)
    torch.testing.assert_close(result[1], second @ first)
    # by hand: row 2 of second @ first = 0.25*[1,0,0] + 0.75*[0.25,0.125,0.625]
    torch.testing.assert_close(result[1][2], torch.tensor([0.4375, 0.09375, 0.46875], dtype=torch.float64))


def test_rows_stay_distributions_and_causal_stays_lower_triangular():
    generator = torch.Generator().manual_seed(0)
    keys = 9
    causal = torch.ones(keys, keys, dtype=torch.bool).tril()
    pattern = torch.randn(4, 3, keys, keys, generator=generator).masked_fill(~causal, float("-inf")).softmax(-1)
    result = rollout(cube_of(pattern))
    torch.testing.assert_close(result.sum(-1), torch.ones(4, keys, dtype=torch.float64))
    assert (result >= 0).all() and torch.equal(result, result.tril())
    bidirectional = rollout(cube_of(torch.randn(3, 2, keys, keys, generator=generator).softmax(-1), causal=False), residual=0.3)
    torch.testing.assert_close(bidirectional.sum(-1), torch.ones(3, keys, dtype=torch.float64))
    assert (bidirectional.triu(1) > 0).any()


def test_rollout_refuses_partial_cubes():
    pattern = torch.ones(2, 1, 4, 4).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    last_rows = cube_of(pattern[..., 2:, :])
    last_rows.query_positions = torch.tensor([2, 3])
    last_rows.query_mask = torch.ones(2, dtype=torch.bool)
    with pytest.raises(InputError, match="every query row"):
        rollout(last_rows)
    with pytest.raises(InputError, match="consecutive"):
        rollout(cube_of(pattern, layers=(0, 2)))
