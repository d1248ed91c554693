"""The all-heads Jensen-Shannon matrix as the library computed it before `analyses.divergence`: every
pair of heads over every entry of the full `q x k` square, pairs in chunks. Kept as the reference the
fast path is tested (tests/test_divergence.py) and timed (benchmarks/bench_atlas.py) against."""

from __future__ import annotations

import math

import torch

CHUNK_ELEMENTS = 1 << 20


def plogp(p: torch.Tensor) -> torch.Tensor:
    return p * p.clamp_min(torch.finfo(p.dtype).tiny).log()


def pairwise_js_divergence(p: torch.Tensor) -> torch.Tensor:
    """Mean row-wise JS divergence (nats) between heads `"h q k"` -> `"h h"`; all-zero rows left out of a pair."""
    heads = p.shape[0]
    valid = (p.sum(-1) > 0).double()
    p = p.float()
    entropy = -plogp(p).sum(-1).double()
    first, second = torch.triu_indices(heads, heads, 1)
    out = torch.zeros(heads, heads, dtype=torch.float64)
    chunk = max(1, CHUNK_ELEMENTS // max(1, p[0].numel()))
    for start in range(0, len(first), chunk):
        a, b = first[start:start + chunk], second[start:start + chunk]
        middle = (p[a] + p[b]) / 2
        js = -plogp(middle).sum(-1).double() - (entropy[a] + entropy[b]) / 2
        both = valid[a] * valid[b]
        out[a, b] = (js.clamp(0, math.log(2)) * both).sum(-1) / both.sum(-1).clamp(min=1)
    return out + out.T
