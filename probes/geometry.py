"""Which cells of a pattern a query may attend to, and how positions are cut into bins.

This is the one place every room asks: capture, streaming, metrics, similarities, the grid and the
HTML view. A cube's query and key axes are either at full resolution (one row per query position,
one column per key position) or area-pooled into bins of consecutive positions. Both are *spans*:
entry b covers positions `first[b]..last[b]` (first == last at full resolution).

The rule is transformers' mask: key j is attendable from query i when both are real (not padding),
`j <= i` for a causal model (or both i and j lie in one of the spec's bidirectional blocks: Gemma 3's
image tokens see each other), and `i - j < window` on a sliding-window layer. A pooled cell (A, B)
is attendable when some query of A may attend some key of B: both hold a real position, causally
`first(B) <= last(A)` or A and B both reach into one bidirectional block, and with a window
`first(A) - last(B) < window`. For full resolution these are the same test. Either way the keys a
query entry may attend are one contiguous range of key entries (`key_ranges`) minus the padding,
which lets metrics work on ranges instead of masks.

Binning: n positions go into `m = min(n, max_size)` bins, position i into bin `i * m // n`, so bins
hold floor(n/m) or ceil(n/m) consecutive positions. Pooling averages the query rows of a bin and
sums its keys, so every pooled row still sums to what its rows summed to (1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Spans:
    """First and last position of every entry of one axis (long `[n]` each)."""

    first: torch.Tensor
    last: torch.Tensor

    @classmethod
    def points(cls, positions) -> "Spans":
        positions = torch.as_tensor(positions).long().cpu()
        return cls(positions, positions)

    @classmethod
    def from_edges(cls, edges, positions=None) -> "Spans":
        """Bins `edges[b]:edges[b + 1]` of an axis whose entry i sits at `positions[i]` (default i)."""
        edges = torch.as_tensor(edges).long()
        positions = torch.arange(int(edges[-1])) if positions is None else torch.as_tensor(positions).long().cpu()
        return cls(positions[edges[:-1]], positions[edges[1:] - 1])

    def __len__(self) -> int:
        return len(self.first)


def key_ranges(spec, layer: int, queries: Spans, keys: Spans) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), long `[q]` each: query entry i may attend key entries `lo[i]..hi[i]` (inclusive; none
    when hi < lo) of `layer`, padding aside: causally those with `first(B) <= last(A)`, with a
    window those with `first(A) - last(B) < window` (module doc). Key spans must be in order."""
    if spec.causal:
        hi = torch.searchsorted(keys.first, queries.last, right=True) - 1
    else:
        hi = torch.full((len(queries),), len(keys) - 1, dtype=torch.long)
    window = spec.window(layer)
    if window:
        lo = torch.searchsorted(keys.last, queries.first - window, right=True)
    else:
        lo = torch.zeros(len(queries), dtype=torch.long)
    # a query reaching into a block also sees the block's later keys; the window still bounds what it
    # sees behind it (Gemma 3's sliding layers cut an image block as they cut text)
    for first, last in getattr(spec, "bidirectional_blocks", ()):
        inside = (queries.last >= first) & (queries.first <= last)
        block_hi = torch.searchsorted(keys.first, torch.tensor(last), right=True) - 1
        hi = torch.where(inside, torch.maximum(hi, block_hi), hi)
    bounds = spec.layer_segments(layer) if hasattr(spec, "layer_segments") else ()
    if bounds:  # a packed layer: the keys of the segments the query entry's positions lie in
        bounds = torch.tensor(bounds)
        start = bounds[torch.searchsorted(bounds, queries.first, right=True) - 1]
        stop = bounds[torch.searchsorted(bounds, queries.last, right=True).clamp_max(len(bounds) - 1)]
        lo = torch.maximum(lo, torch.searchsorted(keys.last, start))
        hi = torch.minimum(hi, torch.searchsorted(keys.first, stop) - 1)
    return lo, hi


def kernel_causality(kernel: str, mask: torch.Tensor | None, is_causal: bool, queries: int, keys: int,
                     declared: bool) -> tuple[bool, tuple[tuple[int, int], ...]]:
    """(causal, bidirectional blocks) a kernel call applies, read from its own arguments.

    Without a mask, SDPA and flash kernels apply `is_causal` (the call's, else the module's), eager
    kernels nothing. With a square mask `"b h q k"` (additive or bool; its first head), the call is
    causal when no allowed cell lies above the diagonal; a causal spec (`declared`) whose mask lets runs
    of positions see every later position of the run gets those runs as blocks (Gemma 3's image tokens).
    A rectangular or one-row call keeps `declared`, and so does a mask the blocks do not describe or
    whose sequences differ (a spec holds one sequence's blocks)."""
    if queries != keys or queries < 2:
        return declared, ()
    if mask is None:
        return bool(is_causal) and kernel != "eager", ()
    if mask.ndim != 4:
        return declared, ()
    found = {_mask_causality(mask[b, 0].detach().cpu().expand(queries, keys), declared) for b in range(mask.shape[0])}
    return found.pop() if len(found) == 1 else (declared, ())


def _mask_causality(cells: torch.Tensor, declared: bool) -> tuple[bool, tuple[tuple[int, int], ...]]:
    """`kernel_causality` of one sequence's `"q k"` mask."""
    allowed = cells if cells.dtype == torch.bool else cells > torch.finfo(cells.dtype).min / 2
    upper = torch.ones(allowed.shape, dtype=torch.bool).triu(1)
    above = allowed & upper
    if not above.any():
        return True, ()
    if not declared:
        return False, ()
    rows = torch.arange(len(allowed))
    reach = torch.where(above.any(-1), allowed.shape[-1] - 1 - above.flip(-1).int().argmax(-1), rows)
    blocks, row = [], 0
    while row < len(allowed):
        if reach[row] > row:
            blocks.append((row, int(reach[row])))
            row = int(reach[row]) + 1
        else:
            row += 1
    inside = torch.zeros(allowed.shape, dtype=torch.bool)
    for first, last in blocks:
        inside[first:last + 1, first:last + 1] = True
    # every cell above the diagonal is inside a block, and a block's are all allowed (a padding row the
    # mask lets see everything is no block)
    if (above & ~inside).any() or (inside & upper & ~allowed).any():
        return declared, ()
    return True, tuple(blocks)


def attendable(spec, layers, queries: Spans, keys: Spans, key_real: torch.Tensor,
               query_real: torch.Tensor | None = None) -> torch.Tensor:
    """bool `"l q k"`: which (query entry, key entry) cells of each layer may carry attention (module doc).

    `key_real` / `query_real` (bool per entry) mark entries holding at least one real position.
    """
    key_real = key_real.bool().cpu()
    base = key_real[None, :].expand(len(queries), -1)
    if query_real is not None:
        base = base & query_real.bool().cpu()[:, None]
    index = torch.arange(len(keys))
    masks = []
    for layer in layers:
        lo, hi = key_ranges(spec, layer, queries, keys)
        masks.append(base & (index[None, :] >= lo[:, None]) & (index[None, :] <= hi[:, None]))
    return torch.stack(masks)


def attendable_mask(spec, layers, query_positions, key_mask: torch.Tensor) -> torch.Tensor:
    """`attendable` at full resolution: rows at `query_positions`, one key per position of `key_mask`."""
    return attendable(spec, layers, Spans.points(query_positions), Spans.points(torch.arange(len(key_mask))), key_mask)


def bin_index(n: int, max_size: int) -> torch.Tensor:
    """long `[n]`: the bin of each of `n` positions for at most `max_size` bins (module doc)."""
    bins = min(n, max_size)
    return torch.arange(n) * bins // n


def bin_edges(n: int, max_size: int) -> list[int]:
    """First position of each bin, then `n`: `[0, s1, ..., n]`."""
    index = bin_index(n, max_size)
    return torch.searchsorted(index, torch.arange(int(index[-1]) + 2)).tolist()


def edges_index(edges) -> torch.Tensor:
    """long `[n]`: the bin of each position, from bin edges."""
    edges = torch.as_tensor(edges).long()
    return torch.repeat_interleave(torch.arange(len(edges) - 1), edges.diff())


def bin_width(edges) -> int | None:
    """The width of every bin, where all are equally wide (`n` a multiple of the bin count), else None."""
    widths = {stop - start for start, stop in zip(edges[:-1], edges[1:])}
    return widths.pop() if len(widths) == 1 else None


def pool_sums(values: torch.Tensor, row_bins: torch.Tensor, num_row_bins: int, key_bins: torch.Tensor,
              num_key_bins: int, key_width: int | None = None) -> torch.Tensor:
    """`"... q k -> ... a b"`: the sum of every (row bin, key bin) block; `row_bins`/`key_bins` give
    each row's and key's bin (rows may be a block of the axis, with their bins).

    Whole rows are added into their bins first (contiguous, fast), so the key axis, whose bins are
    gathered column by column, is pooled on the already pooled rows only (`pool_keys`, `key_width`).
    """
    shape = values.shape[:-2]
    rows = values.new_zeros(*shape, num_row_bins, values.shape[-1]).index_add_(-2, row_bins.to(values.device), values)
    return pool_keys(rows, key_bins, num_key_bins, key_width)


def pool_keys(values: torch.Tensor, key_bins: torch.Tensor, num_key_bins: int, width: int | None = None) -> torch.Tensor:
    """`"... k -> ... b"`: the sum over the keys of each key bin (`key_bins`: each key's bin); `width`: the width of
    every bin where all are equal (`bin_width`), which sums the bins as one matrix product (twice as fast as the
    scatter), the last one possibly cut short."""
    if width is None:
        return values.new_zeros(*values.shape[:-1], num_key_bins).index_add_(-1, key_bins.to(values.device), values)
    whole = values.shape[-1] // width
    pooled = values[..., :whole * width].unflatten(-1, (whole, width)) @ values.new_ones(width)  # "... (b w), w -> ... b"
    if whole < num_key_bins:
        pooled = torch.cat([pooled, values[..., whole * width:].sum(-1, keepdim=True)], -1)
    return pooled


def area_pool(values: torch.Tensor, row_edges, key_edges, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """`"... q k -> ... a b"`: mean over the rows of each row bin (weighted by `row_weights`, e.g. how
    many original rows a pooled row stands for) of the sum over the keys of each key bin."""
    row_bins, key_bins = edges_index(row_edges), edges_index(key_edges)
    weights = torch.ones(values.shape[-2]) if row_weights is None else row_weights.float().cpu()
    # unweighted float32 values are pooled as they are: no copy of a cube that may fill most of the memory
    weighted = values if row_weights is None and values.dtype == torch.float32 else \
        values.float() * weights.to(values.device)[:, None]
    sums = pool_sums(weighted, row_bins, len(row_edges) - 1, key_bins, len(key_edges) - 1, bin_width(key_edges))
    totals = torch.zeros(len(row_edges) - 1).index_add_(0, row_bins, weights)
    return sums / totals.clamp(min=1e-30).to(sums.device)[:, None]


def any_in_bins(flags: torch.Tensor, edges) -> torch.Tensor:
    """bool per bin: does any position of the bin have the flag."""
    index = edges_index(edges)
    counts = torch.zeros(len(edges) - 1, dtype=torch.long).index_add_(0, index, flags.cpu().long())
    return counts > 0
