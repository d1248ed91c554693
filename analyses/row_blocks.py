"""What the per-head metrics need to know about a block of query rows of one layer, before any weight.

The keys row i may attend form one range `lo_i..hi_i` of key indices minus padding
(`geometry.key_ranges`), so no `"q k"` mask is needed: counts under uniform attention come from
prefix sums over the keys, the columns a block touches are one slice `key_start:key_stop`, and
the sparse structures are index lists: the previous / current / next key and the sink column
are one gather per row, duplicate-token and induction pairs a few (row, key) pairs per repeated
token. Only keys from the block's first row position on (`near_start`, a square for a causal
block) need a per-row `"q k"` matrix (distance and segment); every key before it lies before
every row of the block, so a `"k f"` matrix shared by all rows carries it (`features`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_heatmap.probes.geometry import Spans, key_ranges

from .patterns import segment_ids, special_token_mask

# columns of `RowBlock.features`
ALL, FAR, FAR_DISTANCE, FAR_SEGMENT, SPECIAL = range(5)
# columns of `RowBlock.picks`
PREVIOUS, CURRENT, NEXT, FIRST, KEY_ZERO = range(5)
# entries of `RowBlock.totals`
UNIFORM_TOTALS = ("rows", "uniform_local", "uniform_block", "sink_rows", "sink_rows_no_first")


def _on(values, device) -> torch.Tensor:
    return torch.as_tensor(values).to(device)


@dataclass
class SequenceIndex:
    """Lookups over the keys of one sequence, built once per prompt (on the CPU; small)."""

    real: torch.Tensor  # bool [k]
    real_before: torch.Tensor  # long [k + 1]: real keys with index < j
    real_index_before: torch.Tensor  # long [k + 1]: sum of those indices
    special: torch.Tensor  # bool [k]
    segment_first: torch.Tensor  # long [k]: first key of each key's segment
    segment_last: torch.Tensor  # long [k]: last key of each key's segment
    first: int  # first real key: the sink column
    same_token_order: torch.Tensor  # long [k]: key indices sorted by token id, in order within a token
    same_token_start: torch.Tensor  # long [k]: where each key's token starts in that order
    same_token_rank: torch.Tensor  # long [k]: how many earlier keys hold the same token

    @classmethod
    def build(cls, tokens, token_ids: torch.Tensor, key_mask: torch.Tensor) -> "SequenceIndex":
        real = key_mask.bool().cpu()
        index = torch.arange(len(real))
        zero = torch.zeros(1, dtype=torch.long)
        segments = segment_ids(tokens)
        starts = torch.searchsorted(segments, segments)
        lasts = torch.searchsorted(segments, segments, right=True) - 1
        order = torch.sort(token_ids.cpu().long(), stable=True)
        new_token = torch.ones(len(order.values), dtype=torch.bool)
        new_token[1:] = order.values[1:] != order.values[:-1]
        group_start = torch.cummax(torch.where(new_token, index, 0), 0).values  # in sorted order
        start = torch.empty_like(index).scatter_(0, order.indices, group_start)
        rank = torch.empty_like(index).scatter_(0, order.indices, index - group_start)
        return cls(real=real, real_before=torch.cat([zero, real.long().cumsum(0)]),
                   real_index_before=torch.cat([zero, (index * real).cumsum(0)]),
                   special=special_token_mask(tokens), segment_first=starts, segment_last=lasts,
                   first=int(real.nonzero()[0]), same_token_order=order.indices, same_token_start=start,
                   same_token_rank=rank)

    def count(self, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Real keys in `first..last` (0 where last < first)."""
        first, last = first.clamp(0, len(self.real)), (last + 1).clamp(0, len(self.real))
        return (self.real_before[last] - self.real_before[first]).clamp(min=0)

    def index_sum(self, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Sum of the real key indices in `first..last` (0 where last < first)."""
        first, last = first.clamp(0, len(self.real)), (last + 1).clamp(0, len(self.real))
        return (self.real_index_before[last] - self.real_index_before[first]).clamp(min=0)

    def earlier_same_token(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, key) pairs: for every row at `positions`, each earlier key holding the row's token."""
        counts = self.same_token_rank[positions]
        rows = torch.repeat_interleave(torch.arange(len(positions)), counts)
        offsets = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        keys = self.same_token_order[self.same_token_start[positions][rows] + offsets]
        return rows, keys


@dataclass
class RowBlock:
    """One block of real query rows of one layer: its key ranges, the uniform-attention counts and the
    indices the metrics read; tensors on the device of the block's pattern. Keys are key indices."""

    lo: torch.Tensor  # long [q]
    hi: torch.Tensor  # long [q]
    key_start: int  # the slice key_start:key_stop holds every key any row may attend and has weight on
    key_stop: int
    near_start: int  # the first row's position; every key before it is before every row
    left_corner: torch.Tensor  # bool "q k" on the slice's first keys: cells before the row's range
    right_corner: torch.Tensor  # bool "q k" on the slice's last keys: cells after the row's range
    padding: torch.Tensor  # long: slice index of each padding key in the slice
    spread: torch.Tensor  # float32 [q]: rows with two or more keys (R), 1 or 0
    spread64: torch.Tensor  # float64 [q]: the same
    keys: torch.Tensor  # float64 [q]: n_i, at least 2
    log_keys: torch.Tensor  # float64 [q]: ln n_i
    uniform_distance: torch.Tensor  # float64 [q]: mean |q_i - j| over the row's keys (at least 1e-12)
    offset: torch.Tensor  # float64 [q]: q_i - near_start
    in_first_segment: torch.Tensor  # float64 [q]: the row's segment starts before near_start
    sink_rows: torch.Tensor  # float64 [2, q]: the sink column is among the row's keys; also the row is not it
    totals: torch.Tensor  # float64 [5]: the sums over R that need no weight (`UNIFORM_TOTALS`)
    column_index: torch.Tensor  # long: lo and hi + 1 of the rows of R, where they start and stop seeing keys
    column_steps: torch.Tensor  # float64 [2, len(column_index)]: +-1 and +-1/n_i at those keys
    features: torch.Tensor  # float32 "k f" over the slice (columns ALL ... SPECIAL)
    near_distance: torch.Tensor  # float32 "q k": |q_i - j| on keys near_start:key_stop (0 off the row's keys)
    near_segment: torch.Tensor  # float32 "q k": j is one of the row's keys and in its segment, same keys
    picks: torch.Tensor  # long [q, 5]: slice index of the keys PREVIOUS ... KEY_ZERO
    pick_valid: torch.Tensor  # float32 [q, 5]: 1 where that key is one of the row's keys (and in the slice)
    previous_kept: torch.Tensor  # float32 [q]: the previous key counts for the head detector
    detector_dropped: torch.Tensor  # float32 [q, 5]: picked keys the detector leaves out of its total
    duplicate: tuple[torch.Tensor, torch.Tensor]  # (row, slice index) pairs of the duplicate-token pattern
    induction: tuple[torch.Tensor, torch.Tensor]  # the same for the induction pattern

    @classmethod
    def build(cls, spec, layer: int, positions: torch.Tensor, sequence: SequenceIndex, width: int, device, *,
              exclude_bos: bool = False, exclude_current_token: bool = False) -> "RowBlock":
        """`positions`: the rows' query positions (CPU, in order, real rows only); `width`: keys held by
        the block's pattern (the rest have weight 0)."""
        num_keys = len(sequence.real)
        lo, hi = key_ranges(spec, layer, Spans.points(positions), Spans.points(torch.arange(num_keys)))
        key_start = int(lo.min())
        key_stop = max(key_start + 1, min(int(hi.max()) + 1, width))
        near_start = max(key_start, int(positions.min()))
        n = sequence.count(lo, hi)
        n_safe = n.clamp(min=2).double()
        below, above = torch.minimum(hi, positions), torch.maximum(lo, positions + 1)
        distance_sum = (positions * sequence.count(lo, below) - sequence.index_sum(lo, below)
                        + sequence.index_sum(above, hi) - positions * sequence.count(above, hi))
        local = sequence.count(torch.maximum(lo, positions - 1), torch.minimum(hi, positions + 1))
        segment_first, segment_last = sequence.segment_first[positions], sequence.segment_last[positions]
        in_segment = sequence.count(torch.maximum(lo, segment_first), torch.minimum(hi, segment_last))

        keys = torch.arange(key_start, key_stop)
        far = keys < near_start
        far_segment = far & (keys >= sequence.segment_first[near_start])
        features = torch.stack([torch.ones(len(keys)), far.float(), ((near_start - keys) * far).float(),
                                far_segment.float(), sequence.special[keys].float()], -1)

        near = keys[near_start - key_start:]
        inside = (near[None, :] >= lo[:, None]) & (near[None, :] <= hi[:, None]) & sequence.real[near][None, :]
        near_distance = (positions[:, None] - near[None, :]).abs() * inside
        near_segment = inside & (near[None, :] >= segment_first[:, None]) & (near[None, :] <= segment_last[:, None])

        targets = torch.stack([positions - 1, positions, positions + 1, torch.full_like(positions, sequence.first),
                               torch.zeros_like(positions)], -1)
        attendable = (targets >= lo[:, None]) & (targets <= hi[:, None]) & (targets >= 0) & (targets < num_keys)
        attendable &= sequence.real[targets.clamp(0, num_keys - 1)]
        readable = attendable & (targets < key_stop)
        dropped = torch.zeros_like(readable)  # A' of the head detector: key 0 / the diagonal left out
        if exclude_current_token:
            dropped[:, CURRENT] = readable[:, CURRENT]
        if exclude_bos:
            dropped[:, KEY_ZERO] = readable[:, KEY_ZERO] & ~(dropped[:, CURRENT] & (positions == 0))
        previous_kept = readable[:, PREVIOUS] & ~(torch.tensor(exclude_bos) & (targets[:, PREVIOUS] == 0))

        rows, duplicate = sequence.earlier_same_token(positions)
        inductive = duplicate + 1
        no_key = torch.zeros_like(rows, dtype=torch.bool)

        def pairs(pair_keys: torch.Tensor, excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            keep = (pair_keys >= lo[rows]) & (pair_keys <= hi[rows]) & (pair_keys < key_stop) & ~excluded
            keep &= sequence.real[pair_keys.clamp(max=num_keys - 1)]
            return _on(rows[keep], device), _on(pair_keys[keep] - key_start, device)

        padding = (~sequence.real[key_start:key_stop]).nonzero().squeeze(-1)
        spread = n >= 2
        sees_first = attendable[:, FIRST].double()
        sink_rows = torch.stack([sees_first, sees_first * (positions != sequence.first)])
        totals = torch.cat([torch.stack([spread.sum(), local / n_safe @ spread.double(),
                                         in_segment / n_safe @ spread.double()]).double(), sink_rows.sum(-1)])
        column_steps = torch.cat([torch.stack([torch.ones(len(lo)), 1 / n_safe]),
                                  -torch.stack([torch.ones(len(lo)), 1 / n_safe])], -1)[:, torch.cat([spread, spread])]
        left, right = int(lo.max()), max(int(lo.max()), int(hi.min()) + 1)  # all rows' ranges hold left..right-1
        left_corner = keys[None, :left - key_start] < lo[:, None]
        right_corner = keys[None, right - key_start:] > hi[:, None]
        return cls(
            lo=_on(lo, device), hi=_on(hi, device), key_start=key_start, key_stop=key_stop, near_start=near_start,
            left_corner=_on(left_corner, device), right_corner=_on(right_corner, device), padding=_on(padding, device),
            spread=_on(spread.float(), device), spread64=_on(spread.double(), device), keys=_on(n_safe, device),
            log_keys=_on(n_safe.log(), device), uniform_distance=_on((distance_sum / n_safe).clamp(min=1e-12), device),
            offset=_on((positions - near_start).double(), device),
            in_first_segment=_on((segment_first < near_start).double(), device),
            sink_rows=_on(sink_rows, device), totals=_on(totals, device),
            column_index=_on(torch.cat([lo[spread], hi[spread] + 1]), device), column_steps=_on(column_steps, device),
            features=_on(features, device), near_distance=_on(near_distance.float(), device),
            near_segment=_on(near_segment.float(), device),
            picks=_on((targets - key_start).clamp(0, key_stop - key_start - 1), device),
            pick_valid=_on(readable.float(), device), previous_kept=_on(previous_kept.float(), device),
            detector_dropped=_on(dropped.float(), device),
            duplicate=pairs(duplicate, (duplicate == 0) if exclude_bos else no_key),
            induction=pairs(inductive, (inductive == positions[rows]) if exclude_current_token else no_key),
        )

    def inside(self, device) -> torch.Tensor:
        """bool `"q k"` over the slice: the keys each row may attend (a dense mask, for the rare cube
        whose weights are not already 0 everywhere else)."""
        keys = torch.arange(self.key_start, self.key_stop, device=device)
        inside = (keys[None, :] >= self.lo[:, None]) & (keys[None, :] <= self.hi[:, None])
        return inside.index_fill_(1, self.padding, False)

    def outside_is_zero(self, weights: torch.Tensor) -> bool:
        """Whether `weights` (`"h q k"` over the slice) are 0 on every cell no row may attend, checked
        only where such cells can be: the corners the ranges leave out and the padding keys."""
        left, right = self.left_corner.shape[1], self.right_corner.shape[1]
        found = []
        if left:
            found.append(weights[..., :left].ne(0).logical_and_(self.left_corner).any())
        if right:
            found.append(weights[..., weights.shape[-1] - right:].ne(0).logical_and_(self.right_corner).any())
        if len(self.padding):
            found.append(weights.index_select(-1, self.padding).ne(0).any())
        return not (found and bool(torch.stack(found).any()))
