"""The attention kernel's output computed from the pattern blocks the capture already holds.

In the computed mode (`capture(..., compute_output=True)`) the tap does not call the model's
kernel: per block of query rows the probe computes the fp32 pattern once (`KernelCall.pattern`),
hands it to its consumers, and multiplies the same block by the values here. The blocks together
are what the kernel would have returned, within fp32 rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_heatmap.errors import InputError

from .group_matmul import group_matmul


def check_computable(module: nn.Module, arguments: dict) -> None:
    """Refuse a kernel call whose output the pattern alone does not give (dropout while training)."""
    dropout = arguments.get("dropout", 0.0) or 0.0
    if module.training and dropout > 0:
        raise InputError(
            f"{type(module).__name__} runs attention dropout ({dropout}) in training mode, which compute_output "
            "does not reproduce; call model.eval() or capture with compute_output=False."
        )


def empty_output(query: torch.Tensor) -> torch.Tensor:
    """The kernel output `"b q h d"` for `query` `"b h q d"`, to be filled block by block."""
    batch, heads, queries, _ = query.shape
    return query.new_empty(batch, queries, heads, query.shape[-1])


def write_block(output: torch.Tensor, probs: torch.Tensor, value: torch.Tensor, start: int, stop: int) -> None:
    """output[:, start:stop] = probs @ value for one row block of every head.

    probs: `"b h q k'"` fp32 for query rows start:stop, k' <= the number of keys (later keys are 0);
    value: `"b g k d"` with h = g r; a KV head's query heads read its values with their rows stacked
    (`"b (g r) q k -> b g (r q) k"`), so the values are never repeated.
    """
    batch, heads, rows, keys = probs.shape
    groups = value.shape[1]
    values = value[:, :, :keys].float()
    block = group_matmul(probs.reshape(batch, groups, -1, keys), values)  # "b g (r q) d"
    block = block.view(batch, heads, rows, -1).transpose(1, 2)  # "b q h d"
    output[:, start:stop] = block.to(output.dtype)
