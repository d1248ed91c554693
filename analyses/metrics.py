"""Per-head attention metrics as a streaming reducer: one table row per layer x head.

Notation, for one head of one layer: A_ij is the weight query row i (at absolute position
q_i) gives key position j; M_i is the set of keys row i may attend to (`cube.attendable()`:
real, not in the future of a causal query, inside the sliding window) and n_i = |M_i|.
Weights outside M_i and padded query rows never count. The *spread rows* R are the real rows
with n_i >= 2; every "mean" below is over R (a row with one attendable key has nothing to
spread over, so it is left out instead of giving NaN), unless said otherwise. f is the first
real key position (position 0 without left padding).

- entropy:              H_i = -sum_{j in M_i} A_ij ln A_ij (nats), mean over R.
- norm_entropy:         H_i / ln n_i, mean over R (0 = one key, 1 = uniform).
- effective_keys:       exp(H_i), mean over R; effective_keys_frac: exp(H_i) / n_i, mean over R.
- max_weight:           max_j A_ij, mean over R.
- sink_score:           A_if, mean over the real rows that can attend to f, query f included.
- sink_score_no_q0:     the same without the row at position f; sink_head = sink_score_no_q0 >= 0.3.
  (0 when no such row exists, which only happens with sliding windows and last-N rows.)
- prev_token_mass:      A_i,q_i-1; current_token_mass: A_i,q_i; next_token_mass: A_i,q_i+1
  (0 where that key is not attendable, so next_token_mass is 0 for causal models), means over R.
- mean_distance:        D_i = sum_j A_ij |q_i - j|, mean over R.
- distance_ratio:       D_i / U_i with U_i = (1/n_i) sum_{j in M_i} |q_i - j| (the uniform-attention
                        distance), mean over R (1 = as far as uniform, < 1 = local).
- special_mass:         sum_{j in M_i, j special} A_ij, mean over R (special: `patterns.is_special_token`).
- local_mass:           sum_{j in M_i, |q_i - j| <= 1} A_ij, mean over R.
- diagonal_score, block_score, vertical_score (+ vertical_key, the column achieving it),
  pattern_class: see `llm_heatmap.analyses.patterns`.
- previous_token_score, duplicate_token_score, induction_score: TransformerLens's "mul"
  head-detector scores (see `llm_heatmap.analyses.head_detector`), summed over the real rows
  and, like every metric here, over attendable keys only (a softmax under the model's mask has
  exact zeros elsewhere, so this is TransformerLens's number).
- n_rows: |R|.

Every quantity is a sum over rows divided by a count, so feeding a cube in any split of
layers and row blocks gives the same table (up to float64 summation order): each row is
computed in float32 on its own, sums over rows accumulate in float64.
"""

from __future__ import annotations

import pandas as pd
import torch

from llm_heatmap.errors import InputError
from llm_heatmap.probes.stream import replay

from .head_detector import DETECTORS, SCORE_COLUMNS, detection_rows, detector_keep
from .patterns import classify_heads, segment_ids, special_token_mask
from .sequences import per_sequence

SINK_THRESHOLD = 0.3
# per-head row sums, each divided by |R| at the end
_ROW_MEANS = ("entropy", "norm_entropy", "effective_keys", "effective_keys_frac", "max_weight",
              "prev_token_mass", "current_token_mass", "next_token_mass", "mean_distance",
              "distance_ratio", "special_mass", "local_mass")
COLUMNS = ("layer", "head", "kv_group", *_ROW_MEANS[:5], "sink_score", "sink_score_no_q0", "sink_head",
           *_ROW_MEANS[5:], "diagonal_score", "block_score", "vertical_score", "vertical_key",
           *SCORE_COLUMNS, "pattern_class", "n_rows")


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


class HeadMetricsReducer:
    """Streaming consumer: `consume(part)` per layer/row block, then `table()` (module docstring).

    A part is an unbatched `AttentionCube` (usually one layer and a block of query rows, as
    `capture(consumers=[...])` delivers them); all parts must hold the same heads and keys.
    """

    def __init__(self, *, sink_threshold: float = SINK_THRESHOLD, exclude_bos: bool = False,
                 exclude_current_token: bool = False, thresholds: dict | None = None):
        self.sink_threshold = sink_threshold
        self.exclude_bos = exclude_bos
        self.exclude_current_token = exclude_current_token
        self.thresholds = thresholds
        self._layers: dict[int, _LayerSums] = {}
        self._context = None

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
        """Nothing to flush; present so the reducer fits the consumer protocol."""

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
        ], -1).float()
        n_safe = n.clamp(min=2).double()
        spread = (n >= 2).double()
        rows = {
            "key": key, "mask": mask, "positions": positions, "spread": spread, "n_safe": n_safe,
            "features": features, "mask_float": mask.float(),
            "counts": features.double().sum(1).T,  # f q: the same masses under uniform weights x n_i
            "column_rows": mask.double().T @ spread,
            "column_uniform": (mask.double() / n_safe[:, None]).T @ spread,
        }
        context["rows"] = rows
        return rows

    def _accumulate(self, sums: _LayerSums, pattern: torch.Tensor, attendable: torch.Tensor, part, context) -> None:
        block = self._rows(attendable, part, context)
        mask, positions, spread, n_safe, counts = (block[k] for k in ("mask", "positions", "spread", "n_safe", "counts"))
        # float32 per row (each row's numbers do not depend on the block it came in);
        # everything summed over rows in float64
        weights = pattern.float() * block["mask_float"]  # h q k
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

        sums.column += torch.matmul(spread, weights.double())  # "q, h q k -> h k"
        sums.column_rows += block["column_rows"]
        sums.column_uniform += block["column_uniform"]

        sums.detector += masses[4:4 + len(DETECTORS)].sum(-1).T
        sums.detector_total += masses[4 + len(DETECTORS)].sum(-1)

    # ---- result ------------------------------------------------------------------------
    def table(self) -> pd.DataFrame:
        """One row per layer x head, columns `COLUMNS` (definitions in the module docstring)."""
        if not self._layers:
            raise InputError("no attention was fed to the metrics reducer; run a capture with it as consumer first.")
        spec, heads = self._context["spec"], self._context["heads"]
        frames = []
        for layer in sorted(self._layers):
            s = self._layers[layer]
            if s.rows == 0:
                raise InputError(f"layer {layer} has no query row with two or more attendable keys; metrics need at least two tokens.")
            columns = {"layer": [layer] * len(heads), "head": list(heads),
                       "kv_group": [spec.kv_group(h) for h in heads]}
            means = {name: (total / s.rows) for name, total in s.sums.items()}
            for name in _ROW_MEANS[:5]:
                columns[name] = means[name]
            sink = torch.where(s.sink_rows[:, None] > 0, s.sink / s.sink_rows.clamp(min=1)[:, None], torch.zeros_like(s.sink))
            columns["sink_score"], columns["sink_score_no_q0"] = sink[0], sink[1]
            columns["sink_head"] = (sink[1] >= self.sink_threshold).numpy()
            for name in _ROW_MEANS[5:]:
                columns[name] = means[name]
            columns["diagonal_score"] = means["local_mass"] - s.uniform_local / s.rows
            columns["block_score"] = s.block / s.rows - s.uniform_block / s.rows
            seen = s.column_rows >= 0.5 * s.column_rows.max()
            lift = (s.column - s.column_uniform) / s.column_rows.clamp(min=1)
            lift = lift.masked_fill(~seen, float("-inf"))
            best = lift.max(-1)
            columns["vertical_score"], columns["vertical_key"] = best.values, best.indices.numpy()
            detector = s.detector / s.detector_total[:, None]
            for i, name in enumerate(SCORE_COLUMNS):
                columns[name] = detector[:, i]
            columns["n_rows"] = [int(s.rows)] * len(heads)
            frames.append(pd.DataFrame({k: (v.numpy() if torch.is_tensor(v) else v) for k, v in columns.items()}))
        table = pd.concat(frames, ignore_index=True)
        table["pattern_class"] = classify_heads(table, self.thresholds)
        return table[list(COLUMNS)]


@per_sequence
def head_metrics(cube, *, row_block: int | None = None, **options) -> pd.DataFrame:
    """Per-head metrics of a cube: its layers, in row blocks, through `HeadMetricsReducer`.

    `row_block` rows per part (default: as many as keep a part near 64 MiB of float32);
    `options` go to `HeadMetricsReducer` (sink_threshold, exclude_bos, exclude_current_token,
    thresholds).
    """
    if row_block is None:
        row_block = max(1, (64 << 20) // (4 * max(1, cube.num_heads * cube.num_keys)))
    reducer = HeadMetricsReducer(**options)
    replay(cube, [reducer], chunk_rows=row_block)
    return reducer.table()
