"""Streaming: hand each layer's pattern to consumers in query-row blocks instead of keeping the cube.

A *part* is an unbatched `AttentionCube` holding ONE layer and a block of query rows
(`"1 h q k"`, all keys); `part.stream` (a `StreamPart`) says which pass it belongs to and which
rows of how many it holds. Parts arrive in layer order, rows in order within a layer.

A causal block of rows sees no key past its last row, so the capture computes only those keys
and says where they stop (`StreamPart.key_stop`); a consumer whose `takes_trimmed_parts` is True
gets the pattern cut there instead of padded with zeros to every key.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Iterable, Protocol, runtime_checkable

import torch

from llm_heatmap.choices import WEIGHTINGS
from llm_heatmap.errors import InputError

from . import geometry, native_softmax
from .cube import AttentionCube, Pooling, StreamPart
from .cube_schema import SIDE_TENSORS

# Past this many bytes of fp32 pattern per layer, rows are computed in chunks, of at least MIN_CHUNK_ROWS rows
# while a chunk stays within MAX_CHUNK_BYTES: below that many rows the fixed work of every block (the consumers'
# small steps, a thread's share of the products) costs more than the cache saves; above that many bytes the
# cache loses more (SmolLM2, streaming Downsampler + metrics computed, two threads, 56 / 112 rows: 1.68x / 1.42x
# the plain forward at 4,096 tokens, 1.73x / 1.58x at 8,192; at 16,384, 8 layers, 56 rows (32 MiB) 1.80x,
# 112 (64 MiB) 1.89x; at 2,048 tokens, two threads, 227 rows (16 MiB) 1.33x against 113 rows (8 MiB) 1.55x, one
# thread 1.36x against 1.38x: half as many blocks halve the consumers' steps around them, while q k^T, softmax and
# P V of a layer cost the same; README "Benchmarks").
CHUNK_BYTES = 16 * 2**20
MIN_CHUNK_ROWS = 112
MAX_CHUNK_BYTES = 32 * 2**20


@runtime_checkable
class CubeConsumer(Protocol):
    """What a probe streams to: `consume(part)` for every part, `finish()` once at the end.

    The probe calls `finish()` (when the consumer has one) once, when its `with` block exits
    without an error, after every part of every forward pass run inside the block. A consumer with
    `takes_trimmed_parts = True` accepts parts whose pattern holds only the keys before
    `part.stream.key_stop` (module doc); one with `takes_entropy_terms = True` gets the fp32 pattern's
    `part.stream.entropy_terms` (`entropy_terms.py`) where the capture computed it, valid during `consume`.
    Parts carry the heads' value and output norms where the capture records them (`capture(value_norms=...)`);
    a consumer that never reads them says `takes_value_norms = False`, and a capture that keeps no cube and
    streams only to such consumers does not compute them (unless `value_norms=True` asks for them).
    A streamed part's tensors are valid during `consume` only: the capture writes the next block into the
    same memory, so a consumer that keeps values copies them (`part.pattern.clone()`).

    A consumer with `factors(part)` may ask, per part, for the part's weights A (`"h q k"`) times key
    columns (`native_softmax.Factors.key_columns`, `"h f k"` over the keys before `key_stop`: A C^T) and
    times row weights (`row_weights`, `"g q"`: U A, per head). Where the native softmax computes the
    part (`native_softmax.py`) it multiplies each row while the row is in the cache, and
    `part.stream.products[consumer]` holds the results (`native_softmax.Products`: `"l h q f"` key sums,
    `"l h g k"` row sums); elsewhere there is no entry and the consumer multiplies. `factors` is called
    before the part's weights exist: it reads the part's sequence, rows and side tensors, never its
    pattern's values.
    """

    def consume(self, part: AttentionCube) -> None: ...

    def finish(self) -> None: ...


def auto_chunk_rows(batch: int, heads: int, keys: int, rows: int, chunk_rows: int | None = None) -> int:
    """Query rows per chunk: `chunk_rows` if given, else as many as fit `CHUNK_BYTES` of fp32, and at least
    `MIN_CHUNK_ROWS` where they fit `MAX_CHUNK_BYTES`."""
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise InputError(f"chunk_rows={chunk_rows} is not a positive number of query rows; pass 1 or more.")
        return chunk_rows
    per_row = max(1, batch * heads * keys * 4)
    return max(1, min(rows, max(CHUNK_BYTES // per_row, min(MIN_CHUNK_ROWS, MAX_CHUNK_BYTES // per_row))))


def chunk_bytes(batch: int, heads: int, keys: int) -> int:
    """The fp32 bytes of one automatic chunk of rows over `keys` keys (the most a streaming capture computes at once)."""
    per_row = batch * heads * keys * 4
    return auto_chunk_rows(batch, heads, keys, sys.maxsize) * per_row


def iter_parts(cube: AttentionCube, chunk_rows: int | None = None):
    """The parts streaming capture would deliver for a kept cube: one layer, a row block each."""
    cube = cube.one_sequence()
    if cube.pooling is not None:
        raise InputError("this cube is area-pooled, so its rows cannot be streamed again; stream the full cube.")
    rows = cube.num_queries
    step = auto_chunk_rows(1, cube.num_heads, cube.num_keys, rows, chunk_rows)
    for slot, layer in enumerate(cube.layers):
        layer_tensors = cube._take("l", slice(slot, slot + 1))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            yield replace(
                cube,
                **cube._take("q", slice(start, stop), layer_tensors),
                layers=(layer,),
                query_positions=cube.query_positions[start:stop],
                query_mask=cube.query_mask[start:stop],
                stream=StreamPart(pass_index=0, row_start=start, row_stop=stop, num_queries=rows),
            )


def replay(cube: AttentionCube, consumers: Iterable, chunk_rows: int | None = None, finish: bool = True) -> None:
    """Stream a kept cube to consumers as if it were being captured."""
    consumers = list(consumers)
    for part in iter_parts(cube, chunk_rows):
        for consumer in consumers:
            consumer.consume(part)
    if finish:
        for consumer in consumers:
            getattr(consumer, "finish", lambda: None)()


def pooled_cube(source: AttentionCube, pattern: torch.Tensor, row_edges: list[int], key_edges: list[int]) -> AttentionCube:
    """`source` with its axes cut into the bins `row_edges` / `key_edges` (over its entries) and
    `pattern` as the pooled values: tokens and ids of each key bin's first entry, query positions
    of each row bin's middle entry, masks true where any entry of the bin is real. Pooling a pooled
    cube composes the bins, so `pooling` always maps onto the prompt itself."""
    rows, keys = torch.tensor(row_edges), torch.tensor(key_edges)
    middles = (rows[:-1] + rows[1:] - 1) // 2
    spans = source.query_spans()
    if source.pooling is None:
        query_edges, original_keys = row_edges, key_edges
    else:
        query_edges = [source.pooling.query_edges[i] for i in row_edges]
        original_keys = [source.pooling.key_edges[i] for i in key_edges]
    pooling = Pooling(query_edges=tuple(query_edges), key_edges=tuple(original_keys),
                      query_first=tuple(spans.first[rows[:-1]].tolist()), query_last=tuple(spans.last[rows[1:] - 1].tolist()))
    firsts = keys[:-1]
    labelled = len(source.tokens) == len(source.key_mask)
    return replace(
        source,
        pattern=pattern,
        tokens=[source.tokens[i] for i in firsts.tolist()] if labelled else list(source.tokens),
        token_ids=source.token_ids.cpu()[firsts] if len(source.token_ids) == len(source.key_mask) else source.token_ids,
        query_positions=source.query_positions.cpu()[middles],
        key_mask=geometry.any_in_bins(source.key_mask, key_edges),
        query_mask=geometry.any_in_bins(source.query_mask, row_edges),
        generated=None if source.generated is None else geometry.any_in_bins(source.generated, key_edges),
        pooling=pooling,
        stream=None,
        **{name: None for name in SIDE_TENSORS},  # per-key and per-row vectors do not pool
    )


class Downsampler:
    """A consumer that area-pools every head to at most `max_size x max_size`, for drawing long prompts.

    Bins and pooling are `geometry`'s: a pooled cell is the mean over the query rows of its bin of
    the sum over the key columns of its bin, so every pooled row still sums to what the original
    rows summed to (1). `cube()` gives the pooled `AttentionCube` (its `pooling` records the bins).
    The running sums stay on the device the parts come from until `cube()`. With
    `weighting="norms"` it pools the norm-weighted pattern `alpha_ij ||v_j W_O^h||` instead (the parts
    must carry value norms), since that cannot be recovered from pooled weights.
    """

    takes_trimmed_parts = True

    def __init__(self, max_size: int, weighting: str = "weights"):
        if int(max_size) < 1:
            raise InputError(f"Downsampler max_size={max_size} must be at least 1.")
        if weighting not in WEIGHTINGS:
            raise InputError(f"weighting={weighting!r} is not one of {', '.join(WEIGHTINGS)}; pick one of them.")
        self.max_size = int(max_size)
        self.weighting = weighting
        self._reset(None)

    @property
    def takes_value_norms(self) -> bool:
        return self.weighting == "norms"

    def _reset(self, stream_pass) -> None:
        self._pass = stream_pass
        self._sums: dict[int, torch.Tensor | None] = {}
        self._result: torch.Tensor | None = None
        self._first: AttentionCube | None = None
        self._row_edges = self._key_edges = None
        self._positions = self._query_mask = None

    def factors(self, part: AttentionCube) -> native_softmax.Factors:
        """The part's rows summed per row bin, for the capture to do in the softmax's pass (`CubeConsumer`)."""
        start, stop = self._bins(part)
        one_hot = self._row_bin_weights.get((start, stop))
        if one_hot is None:  # every layer's block of these rows asks for the same
            row_bins = self._row_bins[start:stop] - self._row_bin_list[start]
            one_hot = self._row_bin_weights[start, stop] = torch.nn.functional.one_hot(row_bins).T.float()
        return native_softmax.Factors(row_weights=(one_hot,))

    def _bins(self, part: AttentionCube) -> tuple[int, int]:
        """The part's rows (`row_start`, `row_stop`), once the bins of its pass are set."""
        info = part.stream
        if info is None:
            raise InputError("this cube is not a streamed part; feed a kept cube with replay(cube, consumers).")
        if info.pass_index != self._pass:
            self._reset(info.pass_index)
        if self._first is None:
            self._first = replace(part, pattern=part.pattern.new_empty(0), stream=None)  # the sequence, not its rows
            self._row_edges = geometry.bin_edges(info.num_queries, self.max_size)
            self._key_edges = geometry.bin_edges(part.num_keys, self.max_size)
            self._row_bins = geometry.edges_index(self._row_edges)
            self._key_bins = geometry.edges_index(self._key_edges)
            self._row_bin_list, self._key_width = self._row_bins.tolist(), geometry.bin_width(self._key_edges)
            self._row_bin_weights = {}
            self._bins_on_device = (self._row_bins.to(part.pattern.device), self._key_bins.to(part.pattern.device))
            self._positions = torch.zeros(info.num_queries, dtype=torch.long)
            self._query_mask = torch.zeros(info.num_queries, dtype=torch.bool)
        return info.row_start, info.row_stop

    def consume(self, part: AttentionCube) -> None:
        info = part.stream
        start, stop = self._bins(part)
        device = part.pattern.device
        self._positions[start:stop] = part.query_positions.cpu()
        self._query_mask[start:stop] = part.query_mask.cpu().bool()
        if self._result is not None:  # more parts after cube(): turn the result back into running sums
            counts = self._row_bins.bincount().float()[None, :, None]
            self._sums = {layer: (self._result[i] * counts).to(device) for i, layer in enumerate(sorted(self._sums))}
            self._result = None
        layer = part.layers[0]
        sums = self._sums.get(layer)
        if sums is None:
            sums = self._sums[layer] = torch.zeros(part.num_heads, len(self._row_edges) - 1, len(self._key_edges) - 1,
                                                   device=device)
        keys = min(part.pattern.shape[-1], part.num_keys if info.key_stop is None else info.key_stop)
        # only the bins this block of rows and its computed keys fall into
        first_bin, last_bin = self._row_bin_list[start], self._row_bin_list[stop - 1]
        key_bin_count = int(self._key_bins[keys - 1]) + 1
        row_bins, key_bins = self._bins_on_device
        norms = None
        if self.weighting == "norms":
            if part.value_norms is None:
                raise InputError("weighting='norms' needs parts with value norms; capture with value_norms=True.")
            norms = part.value_norms[0, :, None, :keys].float().to(device)  # "h 1 k"
        pooled = (info.products or {}).get(self)
        if pooled is not None:  # the rows summed per bin in the softmax's pass; n_j is per key, so it comes after
            rows = pooled.row_sums[0][0, ..., :keys]
            rows = rows if norms is None else rows * norms
            block = geometry.pool_keys(rows, key_bins[:keys], key_bin_count, self._key_width)
        else:
            values = part.pattern[0, ..., :keys].detach().float()
            values = values if norms is None else values * norms
            block = geometry.pool_sums(values, row_bins[start:stop] - first_bin, last_bin - first_bin + 1,
                                       key_bins[:keys], key_bin_count, self._key_width)
        sums[:, first_bin:last_bin + 1, :key_bin_count] += block

    def finish(self) -> None:
        """Nothing to flush: pooling happens as parts arrive."""

    def cube(self) -> AttentionCube:
        if self._first is None:
            raise InputError("the Downsampler has received no attention yet; run the model inside capture(..., consumers=[it]).")
        layers = sorted(self._sums)
        if self._result is None:
            # the pooled cube replaces the running sums, so the result is held once, not twice
            counts = self._row_bins.bincount().float()
            self._result = torch.stack([self._sums[layer] for layer in layers]).cpu().div_(counts[None, None, :, None])
            self._sums = {layer: None for layer in layers}
        source = replace(self._first, layers=tuple(layers), query_positions=self._positions, query_mask=self._query_mask,
                         stream=None, weighting=self.weighting)
        return pooled_cube(source, self._result, self._row_edges, self._key_edges)


def downsample(cube: AttentionCube, max_size: int) -> AttentionCube:
    """Area-pool a kept cube to at most `max_size` entries per axis, as `Downsampler` pools a stream
    (a cube already that small is returned as it is; a pooled cube is pooled further)."""
    cube = cube.one_sequence()
    if int(max_size) < 1:
        raise InputError(f"max_size={max_size} must be at least 1.")
    if max(cube.num_queries, cube.num_keys) <= max_size:
        return cube
    row_edges = geometry.bin_edges(cube.num_queries, max_size)
    key_edges = geometry.bin_edges(cube.num_keys, max_size)
    weights = cube.pooling.row_counts() if cube.pooling else None
    pattern = geometry.area_pool(cube.pattern, row_edges, key_edges, weights)
    return pooled_cube(cube, pattern, row_edges, key_edges)
