"""The per-head metrics as the float64 reference: every metric written as a dense mask or feature
matrix over all (row, key) cells of a cube, the way `HeadMetricsReducer` computed them before the
fast path. Tests and benchmarks/bench_metrics.py compare the library's numbers with these.
"""

from __future__ import annotations

import pandas as pd
import torch

from llm_heatmap.analyses.heads.head_detector import DETECTORS, SCORE_COLUMNS, detection_rows, detector_keep
from llm_heatmap.analyses.heads.metrics import HeadMetricsReducer, _ROW_MEANS
from llm_heatmap.analyses.heads.patterns import segment_ids, special_token_mask
from llm_heatmap.errors import InputError
from llm_heatmap.probes.stream import replay


class _LayerSums:
    def __init__(self, heads: int, keys: int):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)
        self.rows = zeros(())
        self.sums = {name: zeros(heads) for name in _ROW_MEANS}
        self.uniform_local = zeros(())
        self.uniform_block = zeros(())
        self.block = zeros(heads)
        self.sink = zeros(2, heads)
        self.sink_rows = zeros(2)
        self.column = zeros(heads, keys)
        self.column_rows = zeros(keys)
        self.column_uniform = zeros(keys)
        self.detector = zeros(heads, len(DETECTORS))
        self.detector_total = zeros(heads)


class ReferenceHeadMetrics(HeadMetricsReducer):
    """The metric definitions as dense masks and feature matrices over every (row, key) cell, in float64;
    the options are `HeadMetricsReducer`'s, everything else is its own."""

    takes_trimmed_parts = False
    takes_entropy_terms = False
    factors = None  # the reference measures every part from its weights alone

    # ---- streaming ---------------------------------------------------------------------
    def consume(self, part) -> None:
        part = part.one_sequence()
        if part.pooling is not None:
            raise InputError("this cube is area-pooled, so per-head metrics would mix tokens; measure the full cube.")
        context = self._prepare(part)
        attendable = part.attendable()
        for index, layer in enumerate(part.layers):
            sums = self._layers.setdefault(layer, _LayerSums(part.num_heads, part.num_keys))
            self._accumulate(sums, part.pattern[index], attendable[index], part, context)

    def finish(self) -> None:
        """Nothing pends: every part is added to the sums as it comes."""

    def _prepare(self, part):
        key_mask = part.key_mask.bool()
        if len(part.tokens) != part.num_keys or len(part.token_ids) != part.num_keys:
            raise InputError(f"the cube has {part.num_keys} keys but {len(part.tokens)} tokens; they must match.")
        signature = (tuple(part.heads), part.num_keys, tuple(key_mask.tolist()), tuple(part.token_ids.tolist()))
        if self._context is not None:
            if self._context["signature"] != signature:
                raise InputError("parts fed to one HeadMetricsReducer must hold the same heads and sequence; use one reducer per prompt.")
            return self._context
        if not key_mask.any():
            raise InputError("the cube has no real (non-padding) key; pass a cube with at least one token.")
        segments = segment_ids(part.tokens)
        self._context = {
            "signature": signature,
            "spec": part.spec,
            "heads": tuple(part.heads),
            "first": part.first_key,
            "special": special_token_mask(part.tokens),
            "segments": segments,
        }
        return self._context

    def _rows(self, attendable: torch.Tensor, part, context) -> dict:
        """Everything about a block of rows that does not depend on the heads; reused across
        layers with the same mask (cache of one: streaming parts come layer by layer)."""
        key = (tuple(part.query_positions.tolist()), tuple(part.query_mask.tolist()), attendable.numpy().tobytes())
        cached = context.get("rows")
        if cached is not None and cached["key"] == key:
            return cached
        mask = attendable  # q k
        n = mask.sum(-1)
        positions = part.query_positions.long()
        distance = (positions[:, None] - torch.arange(part.num_keys)[None, :]).abs()
        segments = context["segments"]
        keep = detector_keep(positions, part.num_keys, part.key_mask, part.query_mask,
                             self.exclude_bos, self.exclude_current_token)
        features = torch.stack([
            distance * mask,
            mask & (distance <= 1),
            mask & (segments[positions][:, None] == segments[None, :]),
            mask & context["special"][None, :],
            *(detection_rows(part.token_ids, positions) * keep),
            keep,
        ], -1).double()
        n_safe = n.clamp(min=2).double()
        spread = (n >= 2).double()
        rows = {
            "key": key, "mask": mask, "positions": positions, "spread": spread, "n_safe": n_safe,
            "features": features, "mask_float": mask.double(),
            "counts": features.double().sum(1).T,  # f q: the same masses under uniform weights x n_i
            "column_rows": mask.double().T @ spread,
            "column_uniform": (mask.double() / n_safe[:, None]).T @ spread,
        }
        context["rows"] = rows
        return rows

    def _accumulate(self, sums: _LayerSums, pattern: torch.Tensor, attendable: torch.Tensor, part, context) -> None:
        block = self._rows(attendable, part, context)
        mask, positions, spread, n_safe, counts = (block[k] for k in ("mask", "positions", "spread", "n_safe", "counts"))
        weights = pattern.double() * block["mask_float"]  # h q k
        # every "mass on a key set" metric is one batched matmul over rows: "h q k, q k f -> q h f"
        masses = torch.bmm(weights.transpose(0, 1), block["features"]).permute(2, 1, 0).double()  # f h q
        # p ln p with 0 ln 0 = 0: the clamp keeps log finite, 0 x finite = 0 (faster than xlogy)
        entropy = -(weights * weights.clamp_min(torch.finfo(weights.dtype).tiny).log()).sum(-1).double()  # h q
        per_row = {
            "entropy": entropy,
            "norm_entropy": entropy / n_safe.log(),
            "effective_keys": entropy.exp(),
            "effective_keys_frac": entropy.exp() / n_safe,
            "max_weight": weights.amax(-1).double(),
        }
        for name, offset in (("prev_token_mass", -1), ("current_token_mass", 0), ("next_token_mass", 1)):
            target = positions + offset
            valid = (target >= 0) & (target < part.num_keys)
            column = target.clamp(0, part.num_keys - 1)
            picked = weights.gather(-1, column[None, :, None].expand(weights.shape[0], -1, 1)).squeeze(-1)
            per_row[name] = picked.double() * valid
        per_row["mean_distance"] = masses[0]
        per_row["distance_ratio"] = masses[0] / (counts[0] / n_safe).clamp(min=1e-12)
        per_row["special_mass"] = masses[3]
        per_row["local_mass"] = masses[1]
        for name, values in per_row.items():
            sums.sums[name] += values @ spread
        sums.rows += spread.sum()
        sums.uniform_local += (counts[1] / n_safe) @ spread
        sums.block += masses[2] @ spread
        sums.uniform_block += (counts[2] / n_safe) @ spread

        first = context["first"]
        sees = mask[:, first]
        for slot, rows in enumerate((sees, sees & (positions != first))):
            sums.sink[slot] += weights[:, :, first].double() @ rows.double()
            sums.sink_rows[slot] += rows.sum()

        sums.column += torch.matmul(spread, weights)  # "q, h q k -> h k"
        sums.column_rows += block["column_rows"]
        sums.column_uniform += block["column_uniform"]

        sums.detector += masses[4:4 + len(DETECTORS)].sum(-1).T
        sums.detector_total += masses[4 + len(DETECTORS)].sum(-1)

    # ---- result ------------------------------------------------------------------------
    def _layer_columns(self, layer: int, s: _LayerSums) -> dict:
        if s.rows == 0:
            raise InputError(f"layer {layer} has no query row with two or more attendable keys.")
        columns = {name: total / s.rows for name, total in s.sums.items()}
        sink = torch.where(s.sink_rows[:, None] > 0, s.sink / s.sink_rows.clamp(min=1)[:, None], torch.zeros_like(s.sink))
        columns["sink_score"], columns["sink_score_no_q0"] = sink[0], sink[1]
        columns["sink_head"] = sink[1] >= self.sink_threshold
        columns["diagonal_score"] = columns["local_mass"] - s.uniform_local / s.rows
        columns["block_score"] = s.block / s.rows - s.uniform_block / s.rows
        seen = s.column_rows >= 0.5 * s.column_rows.max()
        lift = ((s.column - s.column_uniform) / s.column_rows.clamp(min=1)).masked_fill(~seen, float("-inf"))
        columns["vertical_score"], columns["vertical_key"] = lift.max(-1)
        detector = s.detector / s.detector_total[:, None]
        for i, name in enumerate(SCORE_COLUMNS):
            columns[name] = detector[:, i]
        columns["n_rows"] = torch.full((len(sink[0]),), int(s.rows))
        return columns


def reference_head_metrics(cube, **options) -> pd.DataFrame:
    """`head_metrics(cube, **options)` by the reference, one layer per part."""
    reducer = ReferenceHeadMetrics(**options)
    replay(cube.one_sequence(), [reducer], chunk_rows=cube.num_queries)
    return reducer.table()
