"""entropy_from_scores against the direct -sum p ln p, on rows built to break it."""

from __future__ import annotations

import pytest
import torch

from llm_heatmap.probes.score_entropy import entropy_from_scores

FLOOR = torch.finfo(torch.float32).min


def _direct(probs: torch.Tensor) -> torch.Tensor:
    probs = probs.double()
    return -torch.xlogy(probs, probs).sum(-1)


def _check(scores: torch.Tensor, sinks: torch.Tensor | None = None, atol: float = 2e-6):
    if sinks is None:
        probs = torch.softmax(scores, -1)
    else:
        probs = torch.softmax(torch.cat([scores, sinks.expand(*scores.shape[:-1], 1)], -1), -1)[..., :-1]
    reference = _direct(probs)
    mine = entropy_from_scores(scores, probs)
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine.double(), reference, atol=atol, rtol=1e-5, equal_nan=True)
    return mine


def test_random_rows_with_large_offsets():
    """Scores of a few hundred: ln Z and sum p s are each ~300 and would cancel without the shift."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 6, 64, generator=generator) * 3 + torch.linspace(-300, 300, 6)[None, :, None]
    _check(scores)


def test_peaked_rows():
    scores = torch.full((3, 50), -10.0)
    scores[0, 7] = 40.0  # one key has essentially all the mass
    scores[1, :2] = 25.0  # two keys split it
    scores[2, 3] = 12.0  # a peak with a visible tail
    entropy = _check(scores, atol=1e-6)
    assert entropy[0] >= 0 and entropy[1] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)


def test_masked_keys_and_fully_masked_rows():
    scores = torch.randn(4, 10, generator=torch.Generator().manual_seed(1)) * 5
    scores[0, 3:] = FLOOR  # causal-style mask at float32's minimum
    scores[1, :] = FLOOR  # fully masked row: softmax is uniform, entropy ln 10
    scores[2, ::2] = float("-inf")
    scores[3, 1:] = float("-inf")  # one key left: entropy 0
    entropy = _check(scores)
    assert entropy[1] == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=1e-6)
    assert entropy[3] == 0


def test_every_key_minus_infinity_is_nan_like_the_softmax():
    scores = torch.full((1, 5), float("-inf"))
    assert entropy_from_scores(scores, torch.softmax(scores, -1)).isnan().all()


def test_softcapped_scores():
    raw = torch.randn(8, 32, generator=torch.Generator().manual_seed(2)) * 40
    softcap = 5.0
    _check(torch.tanh(raw / softcap) * softcap)


def test_sinks_take_mass_outside_the_keys():
    scores = torch.randn(5, 20, generator=torch.Generator().manual_seed(3)) * 4
    scores[4] = float("-inf")  # nothing but the sink: every probability 0, entropy 0
    sinks = torch.tensor([[3.0], [-2.0], [30.0], [0.0], [1.0]])
    entropy = _check(scores, sinks)
    assert entropy[4] == 0
