"""TransformerLens `head_detector` scores for every head at once, plus a repeated-random-token probe.

Definitions are exactly those of `transformer_lens.head_detector` (4.3):

- detection patterns D (lower-triangular 0/1 `[q, k]` over token positions):
  previous-token  D_ij = [j = i - 1];
  duplicate-token D_ij = [t_j = t_i and j < i];
  induction       D_ij = [j >= 1 and t_{j-1} = t_i and j - 1 < i]  (the duplicate pattern shifted right).
- A' = the head's pattern with column 0 zeroed if `exclude_bos` and the diagonal zeroed if
  `exclude_current_token`.
- "mul": score = sum_ij A'_ij D_ij / sum_ij A'_ij.
- "abs": score = 1 - round(sum_ij |A_ij - D_ij| (excluded entries set to 0) / T, 3).

Rows of a cube holding only the last query rows are scored over those rows ("mul"); with all
rows this is TransformerLens's number. Padded rows and keys are left out.
"""

from __future__ import annotations

import pandas as pd
import torch

from llm_heatmap.errors import InputError

from llm_heatmap.analyses.sequences import per_sequence

DETECTORS = ("previous_token", "duplicate_token", "induction")
SCORE_COLUMNS = tuple(f"{name}_score" for name in DETECTORS)


def detection_patterns(token_ids: torch.Tensor) -> torch.Tensor:
    """float `"d q k"`, d in `DETECTORS` order: TransformerLens's detection patterns for `token_ids`."""
    ids = torch.as_tensor(token_ids).reshape(-1)
    return detection_rows(ids, torch.arange(len(ids)))


def detection_rows(token_ids: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """float `"d q k"`: the rows of `detection_patterns` at `query_positions`, without building all T x T."""
    ids = torch.as_tensor(token_ids).reshape(-1)
    q = query_positions.long()[:, None]
    k = torch.arange(len(ids))[None, :]
    previous = k == q - 1
    duplicate = (ids[q] == ids[k]) & (k < q)
    before = torch.cat([ids[:1], ids[:-1]])  # token at k - 1 (k = 0 is masked out below)
    induction = (before[k] == ids[q]) & (k >= 1) & (k <= q)
    return torch.stack([previous, duplicate, induction]).float()


def detector_sums(pattern: torch.Tensor, token_ids: torch.Tensor, query_positions: torch.Tensor,
                  key_mask: torch.Tensor | None = None, query_mask: torch.Tensor | None = None, *,
                  exclude_bos: bool = False, exclude_current_token: bool = False,
                  patterns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """("mul" numerators `"l h d"`, denominators `"l h"`) summed over the given rows of `"l h q k"`.

    `patterns`: the detection rows `"d q k"` at `query_positions`, if already built.

    Sums add across row blocks, which is what the streaming reducer relies on.
    """
    rows = detection_rows(token_ids, query_positions) if patterns is None else patterns  # d q k
    masked = _excluded(pattern.float(), query_positions, key_mask, query_mask, exclude_bos, exclude_current_token)
    numerators = torch.einsum("lhqk,dqk->lhd", masked.double(), rows.double())
    denominators = masked.double().sum((-1, -2))
    return numerators, denominators


def detector_keep(query_positions, num_keys, key_mask=None, query_mask=None, exclude_bos=False,
                  exclude_current_token=False) -> torch.Tensor:
    """bool `"q k"`: entries of A' that count (real rows and keys, minus column 0 / the diagonal if excluded)."""
    keep = torch.ones(len(query_positions), num_keys, dtype=torch.bool)
    if key_mask is not None:
        keep &= key_mask.bool()[None, :]
    if query_mask is not None:
        keep &= query_mask.bool()[:, None]
    if exclude_bos:
        keep[:, 0] = False
    if exclude_current_token:
        keep &= torch.arange(num_keys)[None, :] != query_positions.long()[:, None]
    return keep


def _excluded(pattern, query_positions, key_mask, query_mask, exclude_bos, exclude_current_token):
    return pattern * detector_keep(query_positions, pattern.shape[-1], key_mask, query_mask, exclude_bos,
                                   exclude_current_token)


@per_sequence
def head_detector_scores(cube, *, exclude_bos: bool = False, exclude_current_token: bool = False,
                         error_measure: str = "mul") -> pd.DataFrame:
    """Previous-token, duplicate-token and induction scores of every head (module docstring).

    Columns: layer, head, kv_group, previous_token_score, duplicate_token_score, induction_score.
    """
    if error_measure not in ("mul", "abs"):
        raise InputError(f"error_measure {error_measure!r} is not known; use 'mul' or 'abs'.")
    if len(cube.token_ids) != cube.num_keys:
        raise InputError(f"the cube has {cube.num_keys} keys but {len(cube.token_ids)} token ids; they must match.")
    full = cube.num_queries == cube.num_keys and torch.equal(cube.query_positions.long(), torch.arange(cube.num_keys))
    if error_measure == "abs" and not full:
        raise InputError("the 'abs' head-detector measure needs every query row; capture without last_queries.")
    rows = detection_rows(cube.token_ids, cube.query_positions)
    scores = []
    for index in range(cube.num_layers):  # one layer at a time keeps memory at one layer's pattern
        layer = cube.pattern[index:index + 1]
        if error_measure == "mul":
            numerators, denominators = detector_sums(
                layer, cube.token_ids, cube.query_positions, cube.key_mask, cube.query_mask,
                exclude_bos=exclude_bos, exclude_current_token=exclude_current_token, patterns=rows)
            scores.append(numerators / denominators[..., None])
        else:
            # "1 1 h q k" against "1 d 1 q k" -> "1 d h q k"
            diff = (layer.double()[:, None] - rows.double()[None, :, None]).abs()
            diff = _excluded(diff, cube.query_positions, None, None, exclude_bos, exclude_current_token)
            raw = diff.sum((-1, -2)) / cube.num_keys
            scores.append((1 - torch.round(raw, decimals=3)).transpose(1, 2))
    scores = torch.cat(scores)
    return _frame(cube, scores)


def _frame(cube, scores: torch.Tensor) -> pd.DataFrame:
    layers = torch.tensor(cube.layers).repeat_interleave(cube.num_heads)
    heads = torch.tensor(cube.heads).repeat(cube.num_layers)
    frame = pd.DataFrame({"layer": layers.numpy(), "head": heads.numpy(),
                          "kv_group": cube.kv_groups.repeat(cube.num_layers).numpy()})
    flat = scores.reshape(-1, len(DETECTORS)).numpy()
    for i, column in enumerate(SCORE_COLUMNS):
        frame[column] = flat[:, i]
    return frame


def repeated_random_tokens(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    """long `[1, 1 + 2 * length]`: BOS, then `length` random vocabulary tokens, then the same again.

    Tokens are drawn without replacement from the tokenizer's own vocabulary, skipping its
    special tokens, so every duplicate in the sequence is a planned repeat and the induction
    pattern is defined on the whole second half. BOS is the tokenizer's `bos_token_id`, else
    its `cls_token_id`; with neither, there is no prefix.
    """
    if length < 1:
        raise InputError(f"repeated_random_tokens needs length >= 1, got {length}.")
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    if length > len(vocab):
        raise InputError(f"length {length} exceeds the {len(vocab)} non-special tokens of this vocabulary; pick a shorter length.")
    generator = torch.Generator().manual_seed(seed)
    half = vocab[torch.randperm(len(vocab), generator=generator)[:length]]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    prefix = torch.tensor([bos]) if bos is not None else torch.tensor([], dtype=torch.long)
    return torch.cat([prefix, half, half]).long()[None, :]
