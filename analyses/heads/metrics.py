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
  pattern_class: see `llm_heatmap.analyses.heads.patterns`.
- previous_token_score, duplicate_token_score, induction_score: TransformerLens's "mul"
  head-detector scores (see `llm_heatmap.analyses.heads.head_detector`), summed over the real rows
  and, like every metric here, over attendable keys only (a softmax under the model's mask has
  exact zeros elsewhere, so this is TransformerLens's number).
- n_rows: |R|.

With value norms (a cube or parts captured with `value_norms`; `n_j = ||v_j W_O^h||`, what key j's value
writes through the head, Kobayashi et al. 2020), the norm-weighted pattern is W_ij = A_ij n_j and
P'_ij = W_ij / sum_j W_ij, and five more columns follow:

- norm_sink_score, norm_sink_score_no_q0: P'_if, over the same rows as sink_score / sink_score_no_q0:
  the first token's share of what the head writes rather than of its weight.
- noop_sink:            sink_score_no_q0 >= 0.3 and norm_sink_score_no_q0 < 0.3: a sink by weight that
                        writes little from the sink (its weight there is a no-op).
- norm_weighted_entropy: -sum_j P'_ij ln P'_ij, mean over R.
- output_norm:          ||sum_j A_ij v_j W_O^h||, the norm of what the head writes at row i, mean over R.

Every quantity is a sum over rows divided by a count, so feeding a cube in any split of
layers and row blocks gives the same table up to float32 rounding: a block of rows is reduced
in float32, the sums over blocks accumulate in float64.

How (`HeadMetricsReducer.consume`): per layer and block of rows, a few passes over the block's
weights `"h q k"`, restricted to the keys the rows may attend (`row_blocks.RowBlock`; a causal
block never reads the keys after its last row): -sum A ln A, the row maxima, one matmul with a
few key features shared by all rows (mass, distance and segment of the keys before the block's
first row, special tokens), the distance and segment of the keys from the first row on (a
square for a causal block), one gather for the previous / current / next / sink / 0th key, the
duplicate-token and induction pairs, and the column sums (where the capture's softmax pass gave
the entropy terms, row maxima, feature sums and column sums, they are taken from it). The resulting
per-row statistics of all a layer's blocks meet the rows' geometry (which rows count, ln n_i, the
uniform distance, ...) in float64 (`_reduce`), once the stream moves on to another layer
or the table is read, so that a block costs a handful of operations. Everything stays on the device
of the parts until `table()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from llm_heatmap.errors import InputError
from llm_heatmap.probes import native_softmax
from llm_heatmap.probes.entropy_terms import EntropyTerms
from llm_heatmap.probes.reused_memory import ReusedMemory
from llm_heatmap.probes.stream import replay

from llm_heatmap.analyses.bounds import METRIC_NORM_COLUMNS, METRIC_TABLE_COLUMNS
from llm_heatmap.analyses.heads.head_detector import SCORE_COLUMNS
from llm_heatmap.analyses.heads.patterns import classify_heads
from llm_heatmap.analyses.heads.row_blocks import (NEAR, ROW_SUMS, ROW_WEIGHT_PAIRS, STATISTICS, UNIFORM_TOTALS,
                                                   RowBlock, SequenceIndex)
from llm_heatmap.analyses.sequences import per_sequence

SINK_THRESHOLD = 0.3
# the per-head row sums divided by |R| at the end
_ROW_MEANS = ROW_SUMS[:ROW_SUMS.index("local_mass") + 1]
COLUMNS = METRIC_TABLE_COLUMNS
NORM_COLUMNS = METRIC_NORM_COLUMNS
# a row's statistics for the norm columns, after `STATISTICS` but exp_entropy: T = sum_j A_j n_j, sum_j A_j n_j ln n_j,
# sum_j (A ln A)_j n_j and its output norm
NORM_TERMS = ("norm_total", "norm_n_log_n", "norm_plogp", "output_norm")
# the statistic and the row sum of each of `ROW_WEIGHT_PAIRS`, and the pairs themselves, as indices
_PAIR_INDEX = (*(torch.tensor([names.index(pair[side]) for pair in ROW_WEIGHT_PAIRS])
                 for side, names in enumerate((STATISTICS, ROW_SUMS))), torch.arange(len(ROW_WEIGHT_PAIRS)))


def _above_uniform(mass: torch.Tensor, uniform, rows) -> torch.Tensor:
    """(mass - uniform) / rows, exactly 0 where the two sums agree to float32 rounding (softmax rows sum to 1
    only to about 1e-7, so a head whose segment is the whole row printed -9.9e-09 instead of 0)."""
    difference = mass - uniform
    agree = difference.abs() <= 1e-6 * torch.maximum(mass.abs(), torch.as_tensor(uniform, dtype=mass.dtype).abs())
    return torch.where(agree, torch.zeros_like(difference), difference) / rows


class _LayerSums:
    def __init__(self, heads: int, keys: int, device):
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        self.row_sums = zeros(len(ROW_SUMS), heads)
        self.totals = zeros(len(UNIFORM_TOTALS))
        self.column = zeros(heads, keys)
        # the spread rows that may attend each key, and their 1 / n_i, as steps along the key axis
        self.column_steps = zeros(2, keys + 1)
        self.pairs = zeros(2, heads)  # mass on the duplicate-token and the induction pairs
        self.norm_sink = zeros(2, heads)
        self.norm_means = zeros(2, heads)  # row sums of norm_weighted_entropy and output_norm
        self.has_norms = False
        self.pending: list[_BlockRows] = []  # blocks whose rows are not in the sums yet (`_reduce`)


@dataclass
class _BlockRows:
    """What a layer's block of rows leaves once its weights are gone: per-row statistics `"h q c"` (float32,
    columns `STATISTICS` without exp_entropy, then with value norms `NORM_TERMS`) and its pair masses `"h 2"`."""

    block: RowBlock
    statistics: torch.Tensor
    pairs: torch.Tensor
    value_norms: torch.Tensor | None


@dataclass
class _RowsGeometry:
    """The geometry of a run of row blocks, their rows one after another (`_BlockRows` of one layer)."""

    row_weights: torch.Tensor  # float64 "q p"
    spread: torch.Tensor  # float64 [q]
    sink_rows: torch.Tensor  # float64 [2, q]
    totals: torch.Tensor  # float64 [len(UNIFORM_TOTALS)]
    column_index: torch.Tensor
    column_steps: torch.Tensor

    @classmethod
    def of(cls, blocks: list[RowBlock]) -> "_RowsGeometry":
        cat = lambda tensors, dim=0: tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)
        return cls(row_weights=cat([b.row_weights for b in blocks]), spread=cat([b.spread for b in blocks]).double(),
                   sink_rows=cat([b.sink_rows() for b in blocks], 1),
                   totals=torch.stack([b.totals for b in blocks]).sum(0),
                   column_index=cat([b.column_index for b in blocks]), column_steps=cat([b.column_steps for b in blocks], 1))


class HeadMetricsReducer:
    """Streaming consumer: `consume(part)` per layer/row block, then `table()` (module docstring).

    A part is an unbatched `AttentionCube` (usually one layer and a block of query rows, as
    `capture(consumers=[...])` delivers them); all parts must hold the same heads and keys.
    """

    takes_trimmed_parts = True
    takes_entropy_terms = True

    def __init__(self, *, sink_threshold: float = SINK_THRESHOLD, exclude_bos: bool = False,
                 exclude_current_token: bool = False, thresholds: dict | None = None):
        self.sink_threshold = sink_threshold
        self.exclude_bos = exclude_bos
        self.exclude_current_token = exclude_current_token
        self.thresholds = thresholds
        self._layers: dict[int, _LayerSums] = {}
        self._context = None
        self._blocks: dict[tuple, RowBlock] = {}
        self._scratch_memory = ReusedMemory()
        self._norm_columns: tuple | None = None  # (value norms, their key columns): see _key_columns
        self._geometries: dict[tuple, _RowsGeometry] = {}  # by the ids of a layer's row blocks, in order
        self._open_layer: int | None = None  # the layer whose blocks may be pending

    # ---- streaming ---------------------------------------------------------------------
    def consume(self, part) -> None:
        part = part.one_sequence()
        if part.pooling is not None:
            raise InputError("this cube is area-pooled, so per-head metrics would mix tokens; measure the full cube.")
        context = self._prepare(part)
        real = part.query_mask.bool().cpu()
        rows = None if bool(real.all()) else real.nonzero().squeeze(-1)
        positions = part.query_positions.long().cpu()
        positions = positions if rows is None else positions[rows]
        info = part.stream
        width = _computed_keys(part)
        device = part.pattern.device
        for index, layer in enumerate(part.layers):
            sums = self._layers.get(layer)
            if sums is None:
                sums = self._layers[layer] = _LayerSums(part.num_heads, part.num_keys, device)
            if self._open_layer not in (None, layer):  # a capture streams layer by layer: one layer pends at a time
                self._reduce(self._layers[self._open_layer])
            self._open_layer = layer
            if not len(positions):
                continue
            weights = part.pattern[index] if rows is None else part.pattern[index].index_select(1, rows.to(device))
            norms = None
            if part.value_norms is not None and part.output_norms is not None:
                outputs = part.output_norms[index]
                norms = (part.value_norms[index], outputs if rows is None else outputs.index_select(1, rows.to(device)))
            terms = info.entropy_terms if info is not None and len(part.layers) == 1 else None
            if terms is not None:  # the capture's, "1 h q c"
                terms = EntropyTerms(terms.sums[0], terms.peak[0])
                terms = terms if rows is None else terms.select(1, rows.to(device))
            products = (info.products or {}).get(self) if info is not None and rows is None else None
            self._collect(sums, weights, self._block(part, layer, positions, width, context), norms, terms,
                             None if products is None else native_softmax.Products(
                                 *[tuple(layers[index] for layers in group) for group in products]))

    def factors(self, part) -> native_softmax.Factors | None:
        """What `_accumulate` multiplies a part's weights by, for the capture to do it in the softmax's pass
        (`stream.CubeConsumer`): the key columns `FEATURES` (then with value norms n: n and n ln n) and the
        rows' weights of the column sums. None for a part with padding rows."""
        part = part.one_sequence()
        if part.pooling is not None or len(part.layers) != 1 or not bool(part.query_mask.bool().all()):
            return None
        width = _computed_keys(part)
        block = self._block(part, part.layers[0], part.query_positions.long().cpu(), width, self._prepare(part))
        columns = [block.key_columns(width).expand(part.num_heads, -1, -1)]  # "h f k", one for every head
        if part.value_norms is not None:
            by_weight, _ = self._key_columns(part.value_norms[0], block.features.device)
            columns.append(by_weight.transpose(-1, -2))  # "h 2 k"
        return native_softmax.Factors(key_columns=tuple(columns), row_weights=(block.spread[None],))

    def finish(self) -> None:
        """Add every layer's pending blocks to its sums."""
        for sums in self._layers.values():
            self._reduce(sums)

    def _prepare(self, part) -> dict:
        context = self._context
        if context is not None:
            if not (context["heads"] == tuple(part.heads) and _same(context["token_ids"], part.token_ids)
                    and _same(context["key_mask"], part.key_mask)):
                raise InputError("parts fed to one HeadMetricsReducer must hold the same heads and sequence; use one reducer per prompt.")
            return context
        key_mask = part.key_mask.cpu().bool()
        if len(part.tokens) != part.num_keys or len(part.token_ids) != part.num_keys:
            raise InputError(f"the cube has {part.num_keys} keys but {len(part.tokens)} tokens; they must match.")
        if not key_mask.any():
            raise InputError("the cube has no real (non-padding) key; pass a cube with at least one token.")
        self._context = {
            "token_ids": part.token_ids,
            "key_mask": part.key_mask,
            "spec": part.spec,
            "heads": tuple(part.heads),
            "sequence": SequenceIndex.build(part.tokens, part.token_ids, key_mask),
        }
        return self._context

    def _block(self, part, layer: int, positions: torch.Tensor, width: int, context: dict) -> RowBlock:
        """The `RowBlock` of these rows, shared by every layer with the same window and segments (cached per
        prompt)."""
        key = (part.spec.window(layer), part.spec.layer_segments(layer), width, positions.numpy().tobytes())
        block = self._blocks.get(key)
        if block is None:
            block = self._blocks[key] = RowBlock.build(
                part.spec, layer, positions, context["sequence"], width, part.pattern.device,
                exclude_bos=self.exclude_bos, exclude_current_token=self.exclude_current_token)
        return block

    def _collect(self, sums: _LayerSums, weights: torch.Tensor, block: RowBlock, norms=None,
                 terms: EntropyTerms | None = None, products: native_softmax.Products | None = None) -> None:
        """Reduce one layer's block of rows, `weights` `"h q k"`, to its per-row statistics (`_BlockRows`), which
        `_reduce` adds to the layer's sums with its other blocks; `norms` is (value norms `"h k"`, output norms
        `"h q"`) where the capture recorded them, `terms` the weights' entropy terms and `products` (key sums
        `"h q f"`, row sums `"h g k"`) those of `factors` where it computed them."""
        weights = weights[..., block.key_start:block.key_stop].float()
        near = self._near_sums(weights, block)
        # with products, the weights are the capture's softmax: not negative
        if not block.outside_is_zero(weights, near if products is not None else None):
            weights = weights * block.inside(weights.device)
            terms = products = None  # they are those of the weights before masking
            near = self._near_sums(weights, block)
        heads = weights.shape[0]
        if norms is not None:  # the norm-weighted sums ride on the same two passes over the block (h k f+2)
            value_norms, output_norms = norms
            by_weight, by_plogp_columns = (c[:, block.key_start:block.key_stop] for c in
                                           self._key_columns(value_norms, weights.device))
        if products is not None and len(products.key_sums) == (1 if norms is None else 2):
            by_features, *by_norm = products.key_sums  # the capture's, in the softmax's pass
        else:
            key_features = block.features if norms is None else \
                torch.cat([block.features.expand(heads, -1, -1), by_weight], -1)
            by_features = torch.matmul(weights, key_features)  # "h q k, (h) k f -> h q f"
            by_features, by_norm = (by_features, []) if norms is None else (by_features[..., :-2], [by_features[..., -2:]])
        mass = by_features[..., :1]  # sum_j A_ij (FEATURES' "all")
        columns = [
            by_features,
            weights.gather(-1, block.picks.expand(heads, -1, -1)),
            near[..., :NEAR.index("outside")],
            weights.amax(-1, keepdim=True) if terms is None else terms.peak[..., None],
        ]
        if norms is None:
            columns.append(self._plogp_sums(weights, terms, None, mass).neg_())
        else:
            by_norm = by_norm[0]  # sum_j A_j [n_j, n_j ln n_j]
            # sum_j (A ln A)_j [1, n_j], beside sum_j A_j [1, n_j]
            by_plogp = self._plogp_sums(weights, terms, by_plogp_columns, torch.cat([mass, by_norm[..., :1]], -1))
            columns += [by_plogp[..., :1].neg(), by_norm, by_plogp[..., 1:],
                        output_norms.to(weights.device, torch.float32)[..., None]]  # NORM_TERMS
        if products is not None:
            column = products.row_sums[0][:, 0, block.key_start:block.key_stop]
        else:
            column = torch.matmul(block.spread, weights)  # "q, h q k -> h k"
        sums.column[:, block.key_start:block.key_stop].add_(column)  # float32 added into float64
        rows = _BlockRows(block, torch.cat(columns, -1), weights[:, block.pair_rows, block.pair_keys] @ block.pair_kinds,
                          None if norms is None else value_norms)
        if sums.pending and sums.pending[-1].statistics.shape[-1] != rows.statistics.shape[-1]:
            self._reduce(sums)  # blocks with and without value norms are reduced apart
        sums.pending.append(rows)

    @staticmethod
    def _near_sums(weights: torch.Tensor, block: RowBlock) -> torch.Tensor:
        """`"h q n"`: the weights of the keys from the block's first row on times `block.near_features`."""
        near = weights[..., block.near_start - block.key_start:].transpose(0, 1)  # q h k
        return torch.matmul(near, block.near_features).transpose(0, 1)  # "q h k, q k n -> h q n"

    def _reduce(self, sums: _LayerSums) -> None:
        """Add the layer's pending blocks to its sums: their per-row statistics, in float64, meet the rows' geometry."""
        pending, sums.pending = sums.pending, []
        if not pending:
            return
        key = tuple(id(rows.block) for rows in pending)
        geometry = self._geometries.get(key)
        if geometry is None:
            geometry = self._geometries[key] = _RowsGeometry.of([rows.block for rows in pending])
        statistics = torch.cat([rows.statistics for rows in pending], 1).double()  # "h q c"
        count = len(STATISTICS) - 1
        weighted = torch.cat([statistics[..., :count], statistics[..., count - 1:count].exp()], -1)  # STATISTICS
        pair_statistics, pair_sums, pairs = (index.to(statistics.device) for index in _PAIR_INDEX)
        by_statistic = torch.matmul(weighted.transpose(1, 2), geometry.row_weights)  # "h s q, q p -> h s p"
        sums.row_sums.index_add_(0, pair_sums, by_statistic[:, pair_statistics, pairs].T)
        sums.totals += geometry.totals
        sums.column_steps.index_add_(1, geometry.column_index, geometry.column_steps)
        sums.pairs += torch.stack([rows.pairs for rows in pending]).double().sum(0).T
        if statistics.shape[-1] > count:
            self._reduce_norms(sums, statistics, geometry, pending[-1].value_norms)

    def _plogp_sums(self, weights: torch.Tensor, terms: EntropyTerms | None, columns: torch.Tensor | None,
                    masses: torch.Tensor) -> torch.Tensor:
        """`"h q c"`: sum_j A_ij ln A_ij c_j for each key column c of `columns` (`"h k c"`: [1, value norms]; None: the
        one column c = 1), given `masses` = sum_j A_ij c_j. From the entropy terms where the capture gave them (no
        log per entry) and they are finite; else with the log of every weight."""
        if terms is not None and terms.sums.shape[-1] >= masses.shape[-1]:
            sums = terms.plogp_sums(masses)
            if bool(torch.isfinite(sums).all()):
                return sums
        # p ln p with 0 ln 0 = 0: the clamp keeps log finite, 0 x finite = 0
        plogp = torch.clamp_min(weights, torch.finfo(weights.dtype).tiny, out=self._scratch(weights))
        plogp = plogp.log_().mul_(weights)
        return plogp.sum(-1, keepdim=True) if columns is None else torch.matmul(plogp, columns)

    def _reduce_norms(self, sums: _LayerSums, statistics: torch.Tensor, geometry: _RowsGeometry,
                      value_norms: torch.Tensor) -> None:
        """The norm-weighted columns (module docstring) from the rows' statistics (float64 `"h q c"`, `NORM_TERMS`
        last); with W = A n, -sum P' ln P' = ln T - (sum_j (A ln A)_j n_j + sum_j A_j n_j ln n_j) / T. The weight on
        the sink column is its pick, which counts only in the rows that see it (`RowBlock.sink_rows`)."""
        total, n_log_n, plogp_n, output_norms = statistics[..., -len(NORM_TERMS):].unbind(-1)
        first_weight = statistics[..., STATISTICS.index("first")]
        safe = total.clamp_min(1e-30)
        sums.norm_means[0] += (safe.log() - (plogp_n + n_log_n) / safe) @ geometry.spread
        sums.norm_means[1] += output_norms @ geometry.spread
        first_norm = value_norms[:, self._context["sequence"].first].double().to(statistics.device)
        sums.norm_sink += geometry.sink_rows @ (first_weight * first_norm[:, None] / safe).T
        sums.has_norms = True

    def _key_columns(self, value_norms: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, n ln n] and [1, n] over every key (`"h k 2"` each) for one layer's value norms n, built once for
        all its row blocks. The cache holds the norms it was built from, so their memory cannot be reused by
        another tensor while it stands: the same address means the same norms."""
        cached = self._norm_columns
        if cached is None or cached[0].data_ptr() != value_norms.data_ptr() or cached[0].shape != value_norms.shape \
                or cached[1].device != torch.device(device):
            n = value_norms.float().to(device)
            # [n, n ln n] key-contiguous ("h 2 k" in memory), as the native softmax reads key columns
            cached = self._norm_columns = (value_norms, torch.stack([n, torch.xlogy(n, n)], -2).transpose(-1, -2),
                                           torch.stack([torch.ones_like(n), n], -1))
        return cached[1], cached[2]

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor shaped like `like` over memory every block reuses (`ReusedMemory`)."""
        return self._scratch_memory.view(like.shape, like.dtype, like.device, reserve=2 * like.numel())

    # ---- result ------------------------------------------------------------------------
    def table(self) -> pd.DataFrame:
        """One row per layer x head, columns `COLUMNS` (definitions in the module docstring)."""
        if not self._layers:
            raise InputError("no attention was fed to the metrics reducer; run a capture with it as consumer first.")
        self.finish()
        spec, heads = self._context["spec"], self._context["heads"]
        frames = []
        for layer in sorted(self._layers):
            columns = {"layer": [layer] * len(heads), "head": list(heads), "kv_group": [spec.kv_group(h) for h in heads],
                       **self._layer_columns(layer, self._layers[layer])}
            frames.append(pd.DataFrame({k: (v.cpu().numpy() if torch.is_tensor(v) else v) for k, v in columns.items()}))
        table = pd.concat(frames, ignore_index=True)
        table["pattern_class"] = classify_heads(table, self.thresholds)
        return table[list(COLUMNS) + [c for c in NORM_COLUMNS if c in table.columns]]

    def _layer_columns(self, layer: int, s: _LayerSums) -> dict:
        """The metric columns of one layer's heads, from its sums."""
        totals, row_sums = dict(zip(UNIFORM_TOTALS, s.totals)), dict(zip(ROW_SUMS, s.row_sums))
        rows = totals["rows"]
        if rows == 0:
            raise InputError(f"layer {layer} has no query row with two or more attendable keys; metrics need at least two tokens.")
        columns = {name: row_sums[name] / rows for name in _ROW_MEANS}
        for column, name, count in (("sink_score", "sink", "sink_rows"), ("sink_score_no_q0", "sink_no_first",
                                                                           "sink_rows_no_first")):
            columns[column] = row_sums[name] / totals[count] if totals[count] > 0 else torch.zeros_like(row_sums[name])
        columns["sink_head"] = columns["sink_score_no_q0"] >= self.sink_threshold
        columns["diagonal_score"] = _above_uniform(row_sums["local_mass"], totals["uniform_local"], rows)
        columns["block_score"] = _above_uniform(row_sums["segment_mass"], totals["uniform_block"], rows)
        column_rows, column_uniform = s.column_steps.cumsum(1)[:, :-1] * self._context["sequence"].real.to(s.column.device)
        seen = column_rows >= 0.5 * column_rows.max()
        lift = ((s.column - column_uniform) / column_rows.clamp(min=1)).masked_fill(~seen, float("-inf"))
        columns["vertical_score"], columns["vertical_key"] = lift.max(-1)
        for column, mass in zip(SCORE_COLUMNS, (row_sums["previous_token"], *s.pairs)):
            columns[column] = mass / row_sums["detector_total"]
        columns["n_rows"] = torch.full_like(columns["entropy"], rows, dtype=torch.long)
        if s.has_norms:
            sink_rows = s.totals[-2:, None]
            norm_sink = torch.where(sink_rows > 0, s.norm_sink / sink_rows.clamp(min=1), torch.zeros_like(s.norm_sink))
            columns["norm_sink_score"], columns["norm_sink_score_no_q0"] = norm_sink
            columns["noop_sink"] = columns["sink_head"] & (norm_sink[1] < self.sink_threshold)
            columns["norm_weighted_entropy"], columns["output_norm"] = s.norm_means / rows
        return columns


def _computed_keys(part) -> int:
    """How many keys of the part the capture computed (the rest have weight 0)."""
    info, width = part.stream, part.pattern.shape[-1]
    return width if info is None or info.key_stop is None else min(width, info.key_stop)


def _same(kept: torch.Tensor, new: torch.Tensor) -> bool:
    """Parts of one capture share these tensors, so identity answers without comparing every key."""
    return kept is new or (kept.shape == new.shape and torch.equal(kept.cpu().long(), new.cpu().long()))


@per_sequence
def head_metrics(cube, *, row_block: int | None = None, **options) -> pd.DataFrame:
    """Per-head metrics of a cube: its layers, in row blocks, through `HeadMetricsReducer`.

    `row_block` rows per part (default: the streaming capture's row blocks, `stream.auto_chunk_rows`);
    `options` go to `HeadMetricsReducer` (sink_threshold, exclude_bos, exclude_current_token,
    thresholds).
    """
    reducer = HeadMetricsReducer(**options)
    replay(cube, [reducer], chunk_rows=row_block)
    return reducer.table()
