"""The matrix products of attention blocks, one per KV group (`"b g m k, b g k n -> b g m n"`).

With several torch threads the groups are multiplied one after another, each product on every thread,
instead of in one batched call: a batched call hands whole groups to threads, so SmolLM2's three groups
on two threads ran as two and one (q k^T of a 113-row block over 2,048 keys: 1.42 ms batched, 1.25 ms
group by group; 56 rows over 8,192 keys: 4.3 ms, slower than one thread's 4.0, against 3.4 ms). With one
thread the batched call is a few per cent faster and is kept.
"""

from __future__ import annotations

import torch


def group_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`a @ b` for `"b g m k"` and `"b g k n"` (`out`: where the `"b g m n"` product goes)."""
    pairs = a.shape[0] * a.shape[1]
    if torch.get_num_threads() == 1 or pairs == 1 or a.shape[:2] != b.shape[:2]:
        return torch.matmul(a, b, out=out)
    if out is None:
        out = a.new_empty(*a.shape[:-1], b.shape[-1])
    for item in range(a.shape[0]):
        for group in range(a.shape[1]):
            torch.matmul(a[item, group], b[item, group], out=out[item, group])
    return out
