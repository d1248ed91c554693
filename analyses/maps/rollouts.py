"""Attention rollout (Abnar & Zuidema, 2020): how much each token feeds each position after l layers.

For each layer l of the cube (consecutive model layers, first layer first):
  Ā_l = mean over heads of A_l (`"l h q k -> l q k"`),
  Â_l = rownorm(residual * Ā_l + (1 - residual) * I), with residual = 0.5 by default,
  R_1 = Â_1,  R_l = Â_l R_{l-1}.
Each R_l is row-stochastic (products of row-stochastic matrices), and lower-triangular for a
causal model (products of lower-triangular matrices). Padded rows and keys are zeroed before
the identity is added, so padding never receives or passes on mass.
"""

from __future__ import annotations

import einops
import torch

from llm_heatmap.errors import InputError


def rollout(cube, *, residual: float = 0.5) -> torch.Tensor:
    """float64 `"l q k"`: rollout through the cube's first l + 1 layers (the last entry is the full rollout)."""
    cube = cube.one_sequence()
    if cube.num_queries != cube.num_keys or not torch.equal(cube.query_positions.long(), torch.arange(cube.num_keys)):
        raise InputError("rollout needs every query row, but this cube keeps only some; capture without last_queries.")
    layers = list(cube.layers)
    if layers != list(range(layers[0], layers[0] + len(layers))):
        raise InputError(f"rollout multiplies consecutive layers, but the cube holds layers {layers}; capture a consecutive range.")
    if not 0.0 <= residual <= 1.0:
        raise InputError(f"residual must be between 0 and 1, got {residual}.")
    real = cube.key_mask.bool() & cube.query_mask.bool()
    keep = cube.attendable().double()
    mean = einops.reduce(cube.pattern.double(), "l h q k -> l q k", "mean") * keep
    identity = torch.diag(real.double())
    mixed = residual * mean + (1 - residual) * identity
    mixed = mixed / mixed.sum(-1, keepdim=True).clamp(min=1e-300)
    result = torch.empty_like(mixed)
    current = None
    for index in range(len(layers)):
        current = mixed[index] if current is None else mixed[index] @ current
        result[index] = current
    return result
