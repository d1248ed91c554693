"""What the per-head metrics need to know about a block of query rows of one layer, before any weight.

The keys row i may attend form one range `lo_i..hi_i` of key indices minus padding
(`geometry.key_ranges`), so no `"q k"` mask is needed: counts under uniform attention come from
prefix sums over the keys, the columns a block touches are one slice `key_start:key_stop`, and
the sparse structures are index lists: the previous / current / next key and the sink column
are one gather per row, duplicate-token and induction pairs a few (row, key) pairs per repeated
token. Only keys from the block's first row position on (`near_start`, a square for a causal
block) need a per-row `"q k"` matrix (distance and segment); every key before it lies before
every row of the block, so a `"k f"` matrix shared by all rows carries it (`features`).

What the weights give per row and head is a few statistics (`"h q s"`, columns `STATISTICS`); every
per-head sum over rows the metrics need (`ROW_SUMS`) is then a sum over rows of some of them, each times a
weight per row that holds the row's geometry (`RowBlock.row_weights`, `"q p"` for the pairs of statistic and
sum `ROW_WEIGHT_PAIRS`): which rows count, 1 / ln n_i, the uniform distance, the detector's exclusions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_heatmap.probes.geometry import Spans, key_ranges

from llm_heatmap.analyses.heads.patterns import segment_ids, special_token_mask

# columns of `RowBlock.features`: every key, the keys before the block's first row, their distance to it,
# those of them in its segment, special tokens
FEATURES = ("all", "far", "far_distance", "far_segment", "special")
# columns of `RowBlock.near_features`, over the keys from the block's first row on: |q_i - j| on the row's keys,
# 1 on its keys in its segment, 1 on the cells it may not attend
NEAR = ("distance", "segment", "outside")
# columns of `RowBlock.picks`: the keys at q_i - 1, q_i, q_i + 1, the sink column, key 0
PICKED = ("previous", "current", "next", "first", "key_zero")
# per-row statistics of a block, `"h q s"`: the mass on each feature, the weight of each picked key, the
# mass-weighted distance and the segment mass of the keys from the first row on, the largest weight, the
# entropy and its exponential
STATISTICS = (*FEATURES, *PICKED, "near_distance", "near_segment", "peak", "entropy", "exp_entropy")
# the per-head sums over rows a block adds: the row sums of the mean metrics, then the segment mass, the
# sink column's weight (rows that see it; without its own row), the previous-token and total mass of the
# head detector
ROW_SUMS = ("entropy", "norm_entropy", "effective_keys", "effective_keys_frac", "max_weight", "prev_token_mass",
            "current_token_mass", "next_token_mass", "mean_distance", "distance_ratio", "special_mass", "local_mass",
            "segment_mass", "sink", "sink_no_first", "previous_token", "detector_total")
# the sums over rows that need no weight (`RowBlock.totals`)
UNIFORM_TOTALS = ("rows", "uniform_local", "uniform_block", "sink_rows", "sink_rows_no_first")
# which statistic counts in which row sum, each with a weight per row (`RowBlock.row_weights`, `_row_weights`)
ROW_WEIGHT_PAIRS = (
    ("entropy", "entropy"), ("entropy", "norm_entropy"), ("exp_entropy", "effective_keys"),
    ("exp_entropy", "effective_keys_frac"), ("peak", "max_weight"),
    ("previous", "prev_token_mass"), ("previous", "local_mass"), ("current", "current_token_mass"),
    ("current", "local_mass"), ("next", "next_token_mass"), ("next", "local_mass"),
    ("far", "mean_distance"), ("far_distance", "mean_distance"), ("near_distance", "mean_distance"),
    ("far", "distance_ratio"), ("far_distance", "distance_ratio"), ("near_distance", "distance_ratio"),
    ("special", "special_mass"), ("far_segment", "segment_mass"), ("near_segment", "segment_mass"),
    ("first", "sink"), ("first", "sink_no_first"),
    ("previous", "previous_token"), ("all", "detector_total"), ("current", "detector_total"),
    ("key_zero", "detector_total"),
)


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
    left_corner: torch.Tensor  # float32 "q k" on the slice's first keys: 1 on cells before the row's range, else 0
    right_corner: torch.Tensor  # float32 "q k" on the slice's last keys: 1 on cells after the row's range, else 0
    padding: torch.Tensor  # long: slice index of each padding key in the slice
    spread: torch.Tensor  # float32 [q]: rows with two or more keys (R), 1 or 0
    row_weights: torch.Tensor  # float64 "q p": statistic s of row i counts this much in sum o, (s, o) = ROW_WEIGHT_PAIRS[p]
    totals: torch.Tensor  # float64 [5]: the sums over R that need no weight (`UNIFORM_TOTALS`)
    column_index: torch.Tensor  # long: lo and hi + 1 of the rows of R, where they start and stop seeing keys
    column_steps: torch.Tensor  # float64 [2, len(column_index)]: +-1 and +-1/n_i at those keys
    features: torch.Tensor  # float32 "k f" over the slice, columns `FEATURES`; each column contiguous ("f k" in memory)
    near_features: torch.Tensor  # float32 "q k n" on keys near_start:key_stop, columns `NEAR`
    near_holds_outside: bool  # every cell no row may attend is a near key (no left corner, no padding before them)
    picks: torch.Tensor  # long "q p": slice index of the keys `PICKED` (weighted 0 where not attendable)
    pair_rows: torch.Tensor  # long: the (row, slice index) cells of the duplicate-token pattern, then those
    pair_keys: torch.Tensor  # of the induction pattern, all attendable and counted by the head detector
    pair_kinds: torch.Tensor  # float32 "n 2": which sum each pair adds to, [1, 0] duplicate-token, [0, 1] induction

    def sink_rows(self) -> torch.Tensor:
        """float64 `[2, q]`: the rows that see the sink column, and of those the ones that are not it (the
        row weights of the sink sums)."""
        return self.row_weights[:, [ROW_WEIGHT_PAIRS.index(("first", "sink")),
                                    ROW_WEIGHT_PAIRS.index(("first", "sink_no_first"))]].T

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
        keys = torch.arange(key_start, key_stop)
        n, uniform = _uniform_counts(sequence, lo, hi, positions)  # n_i, and per key set of UNIFORM_TOTALS
        n_safe = n.clamp(min=2).double()
        spread = n >= 2

        far = keys < near_start
        far_segment = far & (keys >= sequence.segment_first[near_start])
        features = torch.stack([torch.ones(len(keys)), far.float(), ((near_start - keys) * far).float(),
                                far_segment.float(), sequence.special[keys].float()], -1)
        near = keys[near_start - key_start:]
        segment_first, segment_last = sequence.segment_first[positions], sequence.segment_last[positions]
        inside = (near[None, :] >= lo[:, None]) & (near[None, :] <= hi[:, None]) & sequence.real[near][None, :]
        near_segment = inside & (near[None, :] >= segment_first[:, None]) & (near[None, :] <= segment_last[:, None])
        near_features = torch.stack([(positions[:, None] - near[None, :]).abs() * inside, near_segment, ~inside],
                                    -1).float()

        targets = torch.stack([positions - 1, positions, positions + 1, torch.full_like(positions, sequence.first),
                               torch.zeros_like(positions)], -1)  # "q p", columns PICKED
        attendable = (targets >= lo[:, None]) & (targets <= hi[:, None]) & (targets >= 0) & (targets < num_keys)
        attendable &= sequence.real[targets.clamp(0, num_keys - 1)]
        readable = dict(zip(PICKED, (attendable & (targets < key_stop)).double().unbind(-1)))
        sees_first = attendable[:, PICKED.index("first")].double()
        not_first = (positions != sequence.first).double()

        rows, duplicate = sequence.earlier_same_token(positions)
        inductive = duplicate + 1
        duplicate_kept = _counted(rows, duplicate, lo, hi, key_stop, sequence.real, (duplicate == 0) & exclude_bos)
        induction_kept = _counted(rows, inductive, lo, hi, key_stop, sequence.real,
                                  (inductive == positions[rows]) & exclude_current_token)

        row_weights = _row_weights(spread.double(), n_safe, (uniform["distance"] / n_safe).clamp(min=1e-12),
                                   (positions - near_start).double(), (segment_first < near_start).double(), readable,
                                   not_first, positions, exclude_bos, exclude_current_token)
        totals = torch.stack([spread.sum(), uniform["local"] / n_safe @ spread.double(),
                              uniform["segment"] / n_safe @ spread.double(), sees_first.sum(),
                              (sees_first * not_first).sum()]).double()
        steps = torch.stack([torch.ones(len(lo)), 1 / n_safe])[:, spread]
        left, right = int(lo.max()), max(int(lo.max()), int(hi.min()) + 1)  # every row's range holds left..right-1
        near_holds_outside = left <= key_start and right >= near_start and bool(sequence.real[key_start:near_start].all())
        return cls(
            lo=_on(lo, device), hi=_on(hi, device), key_start=key_start, key_stop=key_stop, near_start=near_start,
            left_corner=_on((keys[None, :left - key_start] < lo[:, None]).float(), device),
            right_corner=_on((keys[None, right - key_start:] > hi[:, None]).float(), device),
            padding=_on((~sequence.real[key_start:key_stop]).nonzero().squeeze(-1), device),
            spread=_on(spread.float(), device), row_weights=_on(row_weights, device), totals=_on(totals, device),
            column_index=_on(torch.cat([lo[spread], hi[spread] + 1]), device),
            column_steps=_on(torch.cat([steps, -steps], -1), device),
            features=_on(features.T.contiguous(), device).T, near_features=_on(near_features, device),
            near_holds_outside=near_holds_outside,
            picks=_on((targets - key_start).clamp(0, key_stop - key_start - 1), device),
            pair_rows=_on(torch.cat([rows[duplicate_kept], rows[induction_kept]]), device),
            pair_keys=_on(torch.cat([duplicate[duplicate_kept], inductive[induction_kept]]) - key_start, device),
            pair_kinds=_on(torch.eye(2)[torch.cat([torch.zeros(int(duplicate_kept.sum()), dtype=torch.long),
                                                    torch.ones(int(induction_kept.sum()), dtype=torch.long)])], device),
        )

    def key_columns(self, width: int) -> torch.Tensor:
        """`"f k"` over keys 0..width-1: `features` with 0 on the keys outside the slice."""
        if self.key_start == 0 and self.key_stop == width:
            return self.features.T
        columns = self.features.new_zeros(len(FEATURES), width)
        columns[:, self.key_start:self.key_stop] = self.features.T
        return columns

    def inside(self, device) -> torch.Tensor:
        """bool `"q k"` over the slice: the keys each row may attend (a dense mask, for the rare cube
        whose weights are not already 0 everywhere else)."""
        keys = torch.arange(self.key_start, self.key_stop, device=device)
        inside = (keys[None, :] >= self.lo[:, None]) & (keys[None, :] <= self.hi[:, None])
        return inside.index_fill_(1, self.padding, False)

    def outside_is_zero(self, weights: torch.Tensor, near_sums: torch.Tensor | None = None) -> bool:
        """Whether `weights` (`"h q k"` over the slice) are 0 on every cell no row may attend, checked
        only where such cells can be: the corners the ranges leave out and the padding keys.

        A corner is multiplied by its 0/1 mask, one pass instead of compare, and, any (the corner of a
        causal block is the square's upper triangle, a tenth of its cells). A NaN or infinite weight on a
        row's own keys also reads as not zero there (x 0 = NaN); the caller then masks, which leaves such
        weights as they are. `near_sums`, the weights times `near_features` (`"h q n"`), may be given for
        weights that cannot be negative (a softmax's): where every such cell is a near key, a row's mass on
        them is then 0 only if each of them is."""
        if near_sums is not None and self.near_holds_outside:
            return not bool(near_sums[..., NEAR.index("outside")].any())
        left, right = self.left_corner.shape[1], self.right_corner.shape[1]
        found = []
        if left:
            found.append(torch.mul(weights[..., :left], self.left_corner).any())
        if right:
            found.append(torch.mul(weights[..., weights.shape[-1] - right:], self.right_corner).any())
        if len(self.padding):
            found.append(weights.index_select(-1, self.padding).ne(0).any())
        return not (found and bool(torch.stack(found).any()))



def _uniform_counts(sequence: SequenceIndex, lo, hi, positions) -> tuple[torch.Tensor, dict]:
    """n_i, and over each row's keys: the summed distance |q_i - j|, the keys with |q_i - j| <= 1, those
    in the row's segment (long [q] each; the keys are real keys in lo_i..hi_i)."""
    below, above = torch.minimum(hi, positions), torch.maximum(lo, positions + 1)
    distance = (positions * sequence.count(lo, below) - sequence.index_sum(lo, below)
                + sequence.index_sum(above, hi) - positions * sequence.count(above, hi))
    local = sequence.count(torch.maximum(lo, positions - 1), torch.minimum(hi, positions + 1))
    segment = sequence.count(torch.maximum(lo, sequence.segment_first[positions]),
                             torch.minimum(hi, sequence.segment_last[positions]))
    return sequence.count(lo, hi), {"distance": distance, "local": local, "segment": segment}


def _counted(rows, keys, lo, hi, key_stop: int, real, excluded) -> torch.Tensor:
    """bool per (row, key) pair of a detection pattern: the head detector counts it (an attendable, held,
    real key the options do not exclude)."""
    kept = (keys >= lo[rows]) & (keys <= hi[rows]) & (keys < key_stop) & ~excluded
    return kept & real[keys.clamp(max=len(real) - 1)]


def _row_weights(spread, keys, uniform_distance, offset, in_first_segment, readable: dict, not_first, positions,
                 exclude_bos: bool, exclude_current_token: bool) -> torch.Tensor:
    """float64 `"q p"`: how much statistic s of each row counts in sum o, (s, o) = `ROW_WEIGHT_PAIRS[p]` (vectors over
    the rows in; `readable`: by name, 1 where a picked key is one of the row's keys and held)."""
    weights = torch.zeros(len(spread), len(ROW_WEIGHT_PAIRS), dtype=torch.float64)

    def add(statistic: str, row_sum: str, weight: torch.Tensor) -> None:
        weights[:, ROW_WEIGHT_PAIRS.index((statistic, row_sum))] += weight

    add("entropy", "entropy", spread)
    add("entropy", "norm_entropy", spread / keys.log())
    add("exp_entropy", "effective_keys", spread)
    add("exp_entropy", "effective_keys_frac", spread / keys)
    add("peak", "max_weight", spread)
    for key, row_sum in (("previous", "prev_token_mass"), ("current", "current_token_mass"), ("next", "next_token_mass")):
        add(key, row_sum, spread * readable[key])
        add(key, "local_mass", spread * readable[key])  # |q_i - j| <= 1: the previous, current and next key
    for row_sum, weight in (("mean_distance", spread), ("distance_ratio", spread / uniform_distance)):
        add("far", row_sum, weight * offset)  # a key before the first row is offset further from row i
        add("far_distance", row_sum, weight)
        add("near_distance", row_sum, weight)
    add("special", "special_mass", spread)
    add("far_segment", "segment_mass", spread * in_first_segment)
    add("near_segment", "segment_mass", spread)
    add("first", "sink", readable["first"])
    add("first", "sink_no_first", readable["first"] * not_first)
    # the head detector's A' leaves key 0 (exclude_bos) and the diagonal (exclude_current_token) out, once each
    drop_current = readable["current"] * exclude_current_token
    add("previous", "previous_token", readable["previous"] * ~((positions == 1) & exclude_bos))
    add("all", "detector_total", torch.ones_like(spread))
    add("current", "detector_total", -drop_current)
    add("key_zero", "detector_total", -readable["key_zero"] * exclude_bos * (1 - drop_current * (positions == 0)))
    return weights
