"""The query-key map of a head or of a KV group (AttentionViz, Yeh et al. 2023): its queries and keys
as points in one 2-D map, where nearness tracks the dot product that makes attention.

Two steps before projecting, neither of which changes the attention pattern:

- translation: every key is moved by the same vector c so that the keys' centroid lands on the
  queries' centroid. `q . (k + c) = q . k + q . c` adds the same number to every score of a query
  row, which the softmax removes.
- scaling: queries are multiplied by s and keys divided by s, with s chosen so that queries and
  keys have the same mean norm afterwards; every dot product `(s q) . (k / s)` is unchanged.

Without them queries and keys sit in two separate clouds and a projection shows only that. A KV
group (the query heads sharing one key head under GQA/MQA) gets one map: all its query heads with
their one set of keys, one translation and one scale for the whole group.

Projection: PCA (default, exact and fast), or t-SNE (scikit-learn) / UMAP (umap-learn) where those
optional libraries are installed (`pip install 'llm-heatmap[maps]'`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_heatmap.choices import PROJECTIONS
from llm_heatmap.errors import InputError

from llm_heatmap.analyses.bounds import check_projection


@dataclass
class QKMap:
    """Points of one map: `points` `[n, 2]`, then per point whether it is a key (`is_key`), the query
    head it belongs to (`head`, -1 for keys), its token position and token string. Queries come
    first, head by head, then the keys. `explained` is PCA's share of variance of the two axes."""

    layer: int
    heads: tuple[int, ...]
    group: int
    method: str
    points: torch.Tensor
    is_key: torch.Tensor
    head: torch.Tensor
    position: torch.Tensor
    tokens: list[str]
    explained: tuple[float, float] | None = None


def align_queries_and_keys(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`"h q d"` queries, `"k d"` keys) translated and scaled as the module docstring says; every
    query row's softmax over the keys is unchanged."""
    queries, keys = queries.double(), keys.double()
    keys = keys - keys.mean(0) + queries.reshape(-1, queries.shape[-1]).mean(0)
    query_norm = queries.norm(dim=-1).mean()
    key_norm = keys.norm(dim=-1).mean()
    scale = (key_norm / query_norm).sqrt() if query_norm > 0 and key_norm > 0 else torch.ones((), dtype=torch.float64)
    return queries * scale, keys / scale


def project(points: torch.Tensor, method: str = "pca", seed: int = 0) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """`[n, d]` -> (`[n, 2]` float32, PCA's explained variance ratio of the two axes or None)."""
    if method not in PROJECTIONS:
        raise InputError(f"method={method!r} is not a projection this knows; use one of {', '.join(PROJECTIONS)}.")
    points = points.double()
    if method == "pca":
        centred = points - points.mean(0)
        _, singular, right = torch.linalg.svd(centred, full_matrices=False)
        variance = singular**2
        ratio = (variance[:2] / variance.sum().clamp(min=1e-300)).tolist()
        coords = centred @ right[:2].T
        if coords.shape[1] < 2:
            coords = torch.nn.functional.pad(coords, (0, 2 - coords.shape[1]))
        return coords.float(), (tuple(ratio) + (0.0,) * (2 - len(ratio)))[:2]
    check_projection(method)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(points) - 1) // 3)))
        coords = TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(points.numpy())
    else:
        import umap

        coords = umap.UMAP(n_components=2, random_state=seed).fit_transform(points.numpy())
    return torch.as_tensor(coords, dtype=torch.float32), None


def qk_map(cube, layer: int, *, head: int | None = None, group: int | None = None, method: str = "pca",
           seed: int = 0) -> QKMap:
    """The map of one query head (`head`) or of one KV group (`group`, all its query heads) of `layer`,
    from the queries and keys captured with the cube (`capture(..., queries_and_keys=True)`)."""
    cube = cube.one_sequence()
    if cube.queries is None or cube.keys is None:
        raise InputError("this cube holds no queries and keys; capture with queries_and_keys=True.")
    if (head is None) == (group is None):
        raise InputError("pass exactly one of head=... (one query head) or group=... (a KV group's heads).")
    if layer not in cube.layers:
        raise InputError(f"layer {layer} is not in this cube (it holds layers {list(cube.layers)}).")
    if head is not None:
        if head not in cube.heads:
            raise InputError(f"head {head} is not in this cube (it holds heads {list(cube.heads)}).")
        heads, group = (head,), cube.spec.kv_group(head)
    else:
        heads = tuple(h for h in cube.heads if cube.spec.kv_group(h) == group)
        if not heads:
            raise InputError(f"KV group {group} has no heads in this cube (groups 0..{cube.spec.num_kv_heads - 1}).")
    li = cube.layers.index(layer)
    rows = cube.query_mask.bool()
    real_keys = cube.key_mask.bool()
    queries = cube.queries[li, [cube.heads.index(h) for h in heads]][:, rows]  # h q d
    keys = cube.keys[li, group][real_keys]  # k d
    queries, keys = align_queries_and_keys(queries, keys)
    points, explained = project(torch.cat([queries.reshape(-1, queries.shape[-1]), keys]), method, seed)
    query_positions = cube.query_positions[rows].long()
    key_positions = torch.arange(cube.num_keys)[real_keys]
    position = torch.cat([query_positions.repeat(len(heads)), key_positions])
    n_queries = len(heads) * len(query_positions)
    # a query's own token (a cross-attention cube's rows are another sequence than its keys)
    query_tokens = [str(t) for t, real in zip(cube.query_labels(), rows.tolist()) if real]
    tokens = query_tokens * len(heads) + [str(cube.tokens[int(p)]) for p in key_positions]
    return QKMap(
        layer=layer, heads=heads, group=group, method=method, points=points,
        is_key=torch.arange(len(points)) >= n_queries,
        head=torch.cat([torch.tensor(heads).repeat_interleave(len(query_positions)), torch.full((len(keys),), -1)]),
        position=position, tokens=tokens, explained=explained,
    )


def layer_maps(cube, *, layers=None, method: str = "pca", seed: int = 0) -> list[QKMap]:
    """The map of every KV group of every layer of the cube, or of `layers` (of every head, for MHA, where
    each head is its own group), for the HTML view and per-layer figures."""
    cube = cube.one_sequence()
    groups = sorted({cube.spec.kv_group(h) for h in cube.heads})
    return [qk_map(cube, layer, group=group, method=method, seed=seed)
            for layer in (cube.layers if layers is None else layers) for group in groups]
