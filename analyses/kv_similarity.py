"""Do heads that share a KV head attend alike? Head-by-head similarities and a permutation test.

Head similarity, for heads a, b of one layer, over the *spread rows* R (real query rows with
at least two attendable keys, as in `metrics`) and the attendable keys M_i of each row:

- `js`: 1 - JS_ab / ln 2, a similarity in [0, 1] (1 = identical rows), where
  JS_ab = mean_{i in R} JS(P_ai, P_bi) and JS(P, Q) = H((P+Q)/2) - (H(P) + H(Q)) / 2 in nats
  (0 <= JS <= ln 2), with P_ai = A_a[i, M_i] (renormalised when the first-token column is dropped).
- `cosine`: cosine of the two heads' weight vectors restricted to the entries {(i, j): i in R,
  j in M_i}; the causal zero triangle and padding are not entries.
- `pearson`: Pearson correlation over the same entries (means taken over those entries only,
  so the zero triangle cannot inflate it).

`first_token="dropped"` removes the first real key from every M_i before all three (rows are
renormalised for `js` only; rows left with fewer than two keys or no mass are left out).

Group statistic of one layer, from its head x head similarity S and a grouping g:
within = mean S_ab over pairs a < b with g_a = g_b; between = mean over pairs with g_a != g_b;
gap = within - between; p_value = (1 + #{perm: gap_perm >= gap}) / (1 + n_permutations), where
each permutation shuffles the head-to-group assignment (seeded), so the group sizes are kept.
For GQA the groups are the KV groups (`grouping="kv"`). For MHA (and MQA, whose one group has
no between pairs) consecutive heads form pseudo-groups of `pseudo_group_size`
(`grouping="pseudo"`), so GQA and MHA models can sit in one table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from llm_heatmap.errors import InputError

from .bounds import MEASURES, check_head_measure, check_pseudo_group_size, check_statistics

from .divergence import bhattacharyya_matrix, js_divergence_matrix
from .sequences import per_sequence

FIRST_TOKEN = ("kept", "dropped")


def _rows_and_weights(pattern: torch.Tensor, mask: torch.Tensor, drop_first: int | None):
    """(weights `"h q k"` zeroed outside attendable entries, entry mask `"q k"`) for one layer."""
    mask = mask.clone()
    if drop_first is not None:
        mask[:, drop_first] = False
    mask &= (mask.sum(-1) >= 2)[:, None]
    return pattern.double() * mask, mask


def layer_similarity(pattern: torch.Tensor, mask: torch.Tensor, measure: str, drop_first: int | None = None) -> torch.Tensor:
    """Head x head similarity `"h h"` of one layer's `"h q k"` pattern (module docstring)."""
    return layer_similarities(pattern, mask, (measure,), drop_first)[measure]


def layer_similarities(pattern: torch.Tensor, mask: torch.Tensor, measures=MEASURES,
                       drop_first: int | None = None) -> dict[str, torch.Tensor]:
    """{measure: head x head similarity} of one layer, sharing the masked weights between measures."""
    weights, entries = _rows_and_weights(pattern, mask, drop_first)
    out = {}
    for measure in measures:
        if measure == "js":
            rows = weights / weights.sum(-1, keepdim=True).clamp(min=1e-300)
            out[measure] = 1 - js_divergence_matrix(rows) / math.log(2)
            continue
        if measure not in ("cosine", "pearson"):
            raise InputError(f"similarity measure {measure!r} is not known; use one of {', '.join(MEASURES)}.")
        vectors = weights[:, entries]  # h e
        if measure == "pearson":
            vectors = vectors - vectors.mean(-1, keepdim=True)
        norms = vectors.norm(dim=-1)
        out[measure] = (vectors @ vectors.T) / (norms[:, None] * norms[None, :]).clamp(min=1e-300)
    return out


def group_means(similarity: torch.Tensor, same_group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(within, between): mean of `similarity` (`"... h h"`) over head pairs a < b in the same group and
    in different groups, `same_group` a bool `"... h h"` (leading axes broadcast: prompts, permutations)."""
    heads = similarity.shape[-1]
    upper = torch.ones(heads, heads, dtype=torch.bool).triu(1)
    inside = (same_group & upper).double()
    outside = (~same_group & upper).double()
    within = (similarity * inside).sum((-1, -2)) / inside.sum((-1, -2))
    between = (similarity * outside).sum((-1, -2)) / outside.sum((-1, -2))
    return within, between


def group_gap(similarity: torch.Tensor, groups, n_permutations: int = 1000, seed: int = 0) -> dict:
    """within, between, gap and permutation p-value of a head x head similarity (module docstring)."""
    check_statistics(n_permutations=n_permutations, seed=seed)
    groups = torch.as_tensor(groups)
    heads = len(groups)
    upper = torch.ones(heads, heads, dtype=torch.bool).triu(1)
    same = groups[:, None] == groups[None, :]
    if not (same & upper).any() or not (~same & upper).any():
        raise InputError("the KV-group statistic needs at least one pair of heads in the same group and one in different groups; "
                         "pass more heads or another pseudo_group_size.")
    within, between = group_means(similarity, same)
    gap = within - between
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(n_permutations, heads, generator=generator).argsort(-1)
    shuffled = groups[order]  # p h
    perm_within, perm_between = group_means(similarity, shuffled[:, :, None] == shuffled[:, None, :])
    exceed = int(((perm_within - perm_between) >= gap - 1e-12).sum())
    return {"within": float(within), "between": float(between), "gap": float(gap),
            "p_value": (1 + exceed) / (1 + n_permutations)}


def spec_head_groups(spec, heads, pseudo_group_size: int = 3) -> tuple[torch.Tensor, str]:
    """(group of each of `heads`, "kv" or "pseudo"): KV groups for GQA, consecutive pseudo-groups otherwise."""
    if 1 < spec.group_size < spec.num_heads:
        return torch.tensor([spec.kv_group(h) for h in heads]), "kv"
    check_pseudo_group_size(pseudo_group_size)
    return torch.tensor(list(heads)) // pseudo_group_size, "pseudo"


def head_groups(cube, pseudo_group_size: int = 3) -> tuple[torch.Tensor, str]:
    """(group of each head on axis h, "kv" or "pseudo"): KV groups for GQA, consecutive pseudo-groups otherwise."""
    return spec_head_groups(cube.spec, cube.heads, pseudo_group_size)


@per_sequence
def kv_group_similarity(cube, *, measures=MEASURES, pseudo_group_size: int = 3, n_permutations: int = 1000,
                        seed: int = 0) -> pd.DataFrame:
    """Within- vs between-group head similarity per layer, measure and first-token handling.

    Columns: layer, measure, first_token ("kept"/"dropped"), grouping ("kv"/"pseudo"),
    group_size, within, between, gap, p_value, n_permutations. `js` rows are similarities
    1 - JS/ln 2 (module docstring).
    """
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise InputError(f"similarity measure {unknown[0]!r} is not known; use one of {', '.join(MEASURES)}.")
    groups, grouping = head_groups(cube, pseudo_group_size)
    size = cube.spec.group_size if grouping == "kv" else pseudo_group_size
    attendable = cube.attendable()
    first = cube.first_key
    records = []
    for index, layer in enumerate(cube.layers):
        for first_token in FIRST_TOKEN:
            drop = first if first_token == "dropped" else None
            similarities = layer_similarities(cube.pattern[index], attendable[index], measures, drop)
            for measure in measures:
                result = group_gap(similarities[measure], groups, n_permutations, seed)
                records.append({"layer": layer, "measure": measure, "first_token": first_token, "grouping": grouping,
                                "group_size": size, **result, "n_permutations": n_permutations})
    return pd.DataFrame.from_records(records)


def head_distributions(cube, *, drop_first_token: bool = False, max_rows: int | None = None) -> torch.Tensor:
    """float32 `"(l h) q k"`: every head's spread rows as distributions over its attendable keys
    (zero rows elsewhere), the input of `divergence.js_divergence_matrix` (module docstring)."""
    cube = cube.one_sequence()
    rows = torch.arange(cube.num_queries)
    if max_rows is not None and max_rows < cube.num_queries:
        rows = torch.linspace(0, cube.num_queries - 1, max_rows).round().long().unique()
    attendable = cube.attendable()[:, rows]
    first = cube.first_key if drop_first_token else None
    distributions = []
    for index in range(cube.num_layers):
        weights, _ = _rows_and_weights(cube.pattern[index][:, rows], attendable[index], first)
        distributions.append((weights / weights.sum(-1, keepdim=True).clamp(min=1e-300)).float())
    return torch.cat(distributions)


def head_divergence(p: torch.Tensor, measure: str = "js") -> tuple[torch.Tensor, torch.Tensor]:
    """(divergence, similarity) `"n n"` of head distributions `"n q k"`: JS in nats and 1 - JS / ln 2,
    or the squared Hellinger distance 1 - BC and the Bhattacharyya coefficient BC."""
    check_head_measure(measure)
    if measure == "js":
        divergence = js_divergence_matrix(p)
    else:
        divergence = 1 - bhattacharyya_matrix(p)
    return divergence, divergence_similarity(divergence, measure)


def divergence_similarity(divergence, measure: str):
    """The similarity in [0, 1] that goes with a `head_divergence`: 1 - JS / ln 2, or BC = 1 - H^2."""
    return 1 - divergence / math.log(2) if measure == "js" else 1 - divergence


def cluster_order(divergence) -> tuple[list[int], np.ndarray]:
    """(leaf order, scipy linkage matrix) of average-linkage clustering on a symmetric divergence matrix."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    divergence = np.asarray(divergence, dtype=float)
    tree = linkage(squareform(divergence, checks=False), method="average")
    return leaves_list(tree).tolist(), tree


@dataclass
class HeadSimilarity:
    """Similarity of every head with every other head of a cube, in hierarchical-clustering order.

    `measure` "js": `divergence` is the mean row-wise JS divergence in nats `[N, N]`,
    `similarity` = 1 - divergence / ln 2. "hellinger": `similarity` is the mean row-wise
    Bhattacharyya coefficient, `divergence` = 1 - similarity (squared Hellinger distance).
    `labels[i]` = (layer, head) of index i; `order` lists the indices in the leaf order of
    average-linkage clustering on `divergence`; `linkage` is scipy's matrix.
    """

    labels: list[tuple[int, int]]
    divergence: torch.Tensor
    similarity: torch.Tensor
    order: list[int]
    linkage: np.ndarray
    measure: str = "js"

    def frame(self, ordered: bool = True) -> pd.DataFrame:
        """The similarity as a DataFrame indexed by `L{layer}.H{head}`, rows/columns in clustering order."""
        index = self.order if ordered else list(range(len(self.labels)))
        names = [f"L{self.labels[i][0]}.H{self.labels[i][1]}" for i in index]
        values = self.similarity[index][:, index].numpy()
        return pd.DataFrame(values, index=names, columns=names)


def head_similarity_matrix(cube, *, measure: str = "js", drop_first_token: bool = False,
                           max_rows: int | None = None) -> HeadSimilarity:
    """Similarity between all heads of all layers plus a clustering order.

    `measure`: "js" (1 - JS / ln 2, exact, as defined in the module docstring; computed by
    `divergence.js_divergence_matrix`, 3-6x the time of the model's forward pass for SmolLM2's 270
    heads at 512 tokens) or "hellinger" (the Bhattacharyya coefficient, one matrix product, about 0.5x).
    Costs heads^2 x rows x keys; `max_rows` keeps that many evenly spaced query rows.
    """
    cube = cube.one_sequence()
    if cube.num_layers * cube.num_heads < 2:
        raise InputError("head_similarity_matrix needs at least two heads in the cube.")
    check_head_measure(measure)
    p = head_distributions(cube, drop_first_token=drop_first_token, max_rows=max_rows)
    divergence, similarity = head_divergence(p, measure)
    order, tree = cluster_order(divergence)
    labels = [(layer, head) for layer in cube.layers for head in cube.heads]
    return HeadSimilarity(labels=labels, divergence=divergence, similarity=similarity, order=order, linkage=tree,
                          measure=measure)
