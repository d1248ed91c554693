"""Streaming: hand each layer's pattern to consumers in query-row blocks instead of keeping the cube.

A *part* is an unbatched `AttentionCube` holding ONE layer and a block of query rows
(`"1 h q k"`, all keys); `part.metadata["stream"]` says which pass it belongs to and which
rows of how many it holds. Parts arrive in layer order, rows in order within a layer.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Protocol, runtime_checkable

import torch

from llm_heatmap.errors import InputError

from .cube import AttentionCube

# Past this many bytes of fp32 pattern per layer, rows are computed in chunks.
CHUNK_BYTES = 8 * 2**20


@runtime_checkable
class CubeConsumer(Protocol):
    """What a probe streams to: `consume(part)` for every part, `finish()` once at the end.

    The probe calls `finish()` (when the consumer has one) once, when its `with` block exits
    without an error, after every part of every forward pass run inside the block.
    """

    def consume(self, part: AttentionCube) -> None: ...

    def finish(self) -> None: ...


def auto_chunk_rows(batch: int, heads: int, keys: int, rows: int, chunk_rows: int | None = None) -> int:
    """Query rows per chunk: `chunk_rows` if given, else as many as fit `CHUNK_BYTES` of fp32."""
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise InputError(f"chunk_rows={chunk_rows} is not a positive number of query rows; pass 1 or more.")
        return chunk_rows
    per_row = max(1, batch * heads * keys * 4)
    return max(1, min(rows, CHUNK_BYTES // per_row))


def stream_info(part: AttentionCube) -> dict:
    info = part.metadata.get("stream")
    if info is None:
        raise InputError("this cube is not a streamed part (no metadata['stream']); feed it with replay(cube, consumers).")
    return info


def iter_parts(cube: AttentionCube, chunk_rows: int | None = None):
    """The parts streaming capture would deliver for a kept (unbatched) cube: one layer, a row block each."""
    if cube.batched:
        raise InputError("streaming takes one sequence; pass cube.item(i) for a batched cube.")
    rows = cube.num_queries
    step = auto_chunk_rows(1, cube.num_heads, cube.num_keys, rows, chunk_rows)
    for slot, layer in enumerate(cube.layers):
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            yield replace(
                cube,
                pattern=cube.pattern[slot : slot + 1, :, start:stop],
                layers=(layer,),
                query_positions=cube.query_positions[start:stop],
                query_mask=cube.query_mask[start:stop],
                metadata={**cube.metadata, "stream": {"pass": 0, "row_start": start, "row_stop": stop, "num_queries": rows}},
            )


def replay(cube: AttentionCube, consumers: Iterable, chunk_rows: int | None = None, finish: bool = True) -> None:
    """Stream a kept (unbatched) cube to consumers as if it were being captured."""
    consumers = list(consumers)
    for part in iter_parts(cube, chunk_rows):
        for consumer in consumers:
            consumer.consume(part)
    if finish:
        for consumer in consumers:
            getattr(consumer, "finish", lambda: None)()


def bin_index(n: int, max_size: int) -> torch.Tensor:
    """Bin of each of `n` positions for at most `max_size` bins of (nearly) equal size.

    With `m = min(n, max_size)` bins, position i goes to bin `i * m // n`; bins hold
    floor(n/m) or ceil(n/m) positions when n is not a multiple of m.
    """
    bins = min(n, max_size)
    return torch.arange(n) * bins // n


def bin_edges(index: torch.Tensor) -> list[int]:
    """First position of each bin, then the total: `[s0, s1, ..., n]`."""
    bins = int(index[-1]) + 1
    return torch.searchsorted(index, torch.arange(bins + 1)).tolist()


class Downsampler:
    """A consumer that area-pools every head to at most `max_size x max_size`, for drawing long prompts.

    A pooled cell is the mean over the query rows of its bin of the sum over the key columns of
    its bin, so every pooled row still sums to what the original rows summed to (1). `cube()`
    gives the pooled `AttentionCube`: `query_positions` are each query bin's middle row's
    position, tokens/token_ids those of each key bin's first position, and
    `metadata["downsample"]` records the bin edges (row and key indices) and original sizes.
    """

    def __init__(self, max_size: int):
        if int(max_size) < 1:
            raise InputError(f"Downsampler max_size={max_size} must be at least 1.")
        self.max_size = int(max_size)
        self._reset(None)

    def _reset(self, stream_pass) -> None:
        self._pass = stream_pass
        self._sums: dict[int, torch.Tensor | None] = {}
        self._result: torch.Tensor | None = None
        self._first: AttentionCube | None = None
        self._query_bins = self._key_bins = None
        self._positions = self._query_mask = None

    def consume(self, part: AttentionCube) -> None:
        info = stream_info(part)
        if info["pass"] != self._pass:
            self._reset(info["pass"])
        if self._first is None:
            self._first = part
            self._query_bins = bin_index(info["num_queries"], self.max_size)
            self._key_bins = bin_index(part.num_keys, self.max_size)
            self._positions = torch.zeros(info["num_queries"], dtype=torch.long)
            self._query_mask = torch.zeros(info["num_queries"], dtype=torch.bool)
        start, stop = info["row_start"], info["row_stop"]
        self._positions[start:stop] = part.query_positions.cpu()
        self._query_mask[start:stop] = part.query_mask.cpu().bool()
        if self._result is not None:  # more parts after cube(): turn the result back into running sums
            counts = torch.bincount(self._query_bins).float()[None, :, None]
            self._sums = {layer: self._result[i] * counts for i, layer in enumerate(sorted(self._sums))}
            self._result = None
        layer = part.layers[0]
        heads, bins_q, bins_k = part.num_heads, int(self._query_bins[-1]) + 1, int(self._key_bins[-1]) + 1
        if layer not in self._sums:
            self._sums[layer] = torch.zeros(heads, bins_q, bins_k)
        block = part.pattern[0].detach().cpu().float()
        pooled_keys = torch.zeros(heads, stop - start, bins_k).index_add_(-1, self._key_bins, block)
        self._sums[layer].index_add_(1, self._query_bins[start:stop], pooled_keys)

    def finish(self) -> None:
        """Nothing to flush: pooling happens as parts arrive."""

    def cube(self) -> AttentionCube:
        if self._first is None:
            raise InputError("the Downsampler has received no attention yet; run the model inside capture(..., consumers=[it]).")
        first, layers = self._first, sorted(self._sums)
        qbins, kbins = self._query_bins, self._key_bins
        counts = torch.bincount(qbins).float()
        if self._result is None:
            # the pooled cube replaces the running sums, so the result is held once, not twice
            self._result = torch.stack([self._sums[layer] for layer in layers]).div_(counts[None, None, :, None])
            self._sums = {layer: None for layer in layers}
        pattern = self._result
        q_edges, k_edges = bin_edges(qbins), bin_edges(kbins)
        middles = torch.tensor([(a + b - 1) // 2 for a, b in zip(q_edges, q_edges[1:])])
        starts = torch.tensor(k_edges[:-1])
        key_mask = _any_in_bins(first.key_mask, kbins)
        query_mask = _any_in_bins(self._query_mask, qbins)
        generated = None if first.generated is None else _any_in_bins(first.generated, kbins)
        metadata = {k: v for k, v in first.metadata.items() if k != "stream"}
        metadata["downsample"] = {
            "max_size": self.max_size,
            "query_bins": q_edges,
            "key_bins": k_edges,
            "num_queries": len(qbins),
            "num_keys": len(kbins),
        }
        return replace(
            first,
            pattern=pattern,
            tokens=[first.tokens[i] for i in k_edges[:-1]] if len(first.tokens) == len(kbins) else list(first.tokens),
            token_ids=first.token_ids.cpu()[starts] if len(first.token_ids) == len(kbins) else first.token_ids,
            layers=tuple(layers),
            query_positions=self._positions[middles],
            key_mask=key_mask,
            query_mask=query_mask,
            generated=generated,
            metadata=metadata,
        )


def _any_in_bins(flags: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """bool per bin: does any position in the bin have the flag."""
    counts = torch.zeros(int(index[-1]) + 1, dtype=torch.long).index_add_(0, index, flags.cpu().long())
    return counts > 0


def downsample(cube: AttentionCube, max_size: int) -> AttentionCube:
    """Area-pool a kept, unbatched cube the way `Downsampler` pools a stream."""
    sampler = Downsampler(max_size)
    replay(cube, [sampler])
    return sampler.cube()
