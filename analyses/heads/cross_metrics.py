"""Metrics of a cross-attention site (target rows over source keys), per layer and head, vectorised.

For a pattern `"l h q k"` whose rows are target positions and whose keys are source positions:

- `alignment`: Pearson correlation, over the rows, between a row's position and the expected source
  position it reads (its attention-weighted mean key, sum_j p_ij j): +1 for a monotone diagonal
  alignment (translation of a like-ordered language), -1 for an anti-diagonal one (reversal), 0 for none;
- `monotonicity`: the share of consecutive rows whose most-attended key moves the alignment's way
  (never back), from 0.5 (random) to 1;
- `coverage`: the share of source keys that receive at least half a row's worth of attention in total,
  summed over all rows (Tu et al. 2016's coverage, thresholded): how much of the source the head reads;
- `source_entropy`: the mean over rows of the entropy of the row over the source, in nats.
"""

from __future__ import annotations

import pandas as pd
import torch

COVERAGE_THRESHOLD = 0.5


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def alignment(pattern: torch.Tensor) -> torch.Tensor:
    """`"l h q k -> l h"`: correlation of each row's position with its expected source position."""
    p = pattern.double()
    keys = torch.arange(p.shape[-1], dtype=torch.float64)
    expected = p @ keys  # "l h q"
    rows = _centred(torch.arange(p.shape[-2], dtype=torch.float64))
    centred = _centred(expected)
    scale = centred.norm(dim=-1) * rows.norm()
    return torch.where(scale > 0, (centred @ rows) / scale.clamp(min=1e-300), torch.zeros_like(scale))


def monotonicity(pattern: torch.Tensor) -> torch.Tensor:
    """`"l h q k -> l h"`: share of steps between consecutive rows whose argmax key moves with the alignment."""
    steps = pattern.argmax(-1).diff(dim=-1)  # "l h (q-1)"
    if steps.shape[-1] == 0:
        return torch.ones(pattern.shape[:2], dtype=torch.float64)
    forward = (steps >= 0).double().mean(-1)
    backward = (steps <= 0).double().mean(-1)
    return torch.where(alignment(pattern) >= 0, forward, backward)


def coverage(pattern: torch.Tensor, threshold: float = COVERAGE_THRESHOLD) -> torch.Tensor:
    """`"l h q k -> l h"`: share of source keys whose attention summed over rows reaches `threshold`."""
    return (pattern.double().sum(-2) >= threshold).double().mean(-1)


def source_entropy(pattern: torch.Tensor) -> torch.Tensor:
    """`"l h q k -> l h"`: mean row entropy over the source, in nats."""
    p = pattern.double()
    return -torch.special.xlogy(p, p).sum(-1).mean(-1)


def cross_metrics(cube) -> pd.DataFrame:
    """One row per layer x head of a cross-attention cube: alignment, monotonicity, coverage, source entropy."""
    pattern = cube.one_sequence().pattern
    values = {"alignment": alignment(pattern), "monotonicity": monotonicity(pattern), "coverage": coverage(pattern),
              "source_entropy": source_entropy(pattern)}
    layers = torch.tensor(cube.layers).repeat_interleave(len(cube.heads))
    heads = torch.tensor(cube.heads).repeat(len(cube.layers))
    return pd.DataFrame({"layer": layers.numpy(), "head": heads.numpy(),
                         **{name: value.flatten().numpy() for name, value in values.items()}})
