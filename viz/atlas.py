"""`atlas_view`: the head atlas as one self-contained offline HTML page, built from its tables.

The page (script and styles from `viz/assets/atlas.*`, inlined; no network request) shows each
model side by side: its heads as a 2-D map (the `map_x`, `map_y` columns of the heads table), as a
similarity matrix in clustering order (`cluster_rank`), and as a layers x heads strip whose
height is the model's relative depth, so layers at the same depth line up across models; a
depth profile draws each model's layer means over relative depth in one chart. Everything is
coloured by the chosen metric (one colour range across models) or by pattern class. Clicking a
head shows its metrics with their intervals and the distribution over prompts, its pattern-class
frequencies and its top prompts with their pooled patterns.

Inputs are the atlas's tables and small arrays (what `AtlasResult.page_inputs()` returns):
`heads`, `layers`, `models` (one row per model x head / layer / model; metric columns `m_mean`,
`m_low`, `m_high` and flag columns `f_rate`, `f_low`, `f_high`; a `notes` column of `models`, the
probes skipped for the site, is shown after the model's summary), `prompt_heads` (one row per
model x prompt x head, for the distributions), `top_prompts` (model, layer, head, metric, rank,
prompt_id, value), `similarity` ({model: `"n n"` head similarity, heads in the heads table's
order}), `thumbnails` ({model: {(prompt_id, layer, head): uint8 `"q k"`}}, 0 = not attendable,
1 + 254 w / w_max otherwise) and `prompts` ({prompt id: text}).

Embedded format (`<script id="atlas-data" type="application/json">`, decoded by tests/test_atlas_page.py):
per model, `heads` holds column arrays (layer, head, kv, depth, x, y, rank, class) and `values`
{column: [value per head]} for every `*_mean/_low/_high/_rate` and `probe_*` column; `similarity`
is base64 uint8 of the matrix in clustering order, `round(255 (s - lo) / (hi - lo))` with
`simRange` = [lo, hi]; `hist` is base64 little-endian uint16 counts `"metric head bin"` over
`histEdges[metric]` = [lo, hi] split into `bins` equal bins; `top` {metric: [per head: [[prompt
index, value, thumbnail index], ...]]}; `thumbs` [[rows, cols, base64 uint8]].
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pandas as pd

from llm_heatmap.errors import InputError

from .html import HtmlView, _page, _script_json  # the shell, inlining and escaping every page of viz/ shares
from .raster import colormap_bytes

HEAD_KEYS = ["layer", "head"]
STAT_SUFFIXES = ("_mean", "_rate")


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _finite(values) -> list:
    return [float(v) if v is not None and np.isfinite(v) else None for v in np.asarray(values, dtype=float)]


def summary_columns(heads: pd.DataFrame) -> list[str]:
    """The heads table's summarised columns (`m_mean`, `f_rate`) that come with `_low` and `_high`."""
    return [c for c in heads.columns if c.endswith(STAT_SUFFIXES) and f"{c[:-5]}_low" in heads and f"{c[:-5]}_high" in heads]


def _require(table, name: str, columns) -> None:
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{name} must be a pandas DataFrame (a table of the atlas), got {type(table).__name__}.")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{name} has no column '{missing[0]}'; pass the {name} table the atlas wrote.")


def _histograms(prompt_heads: pd.DataFrame | None, model: str, units: list[tuple[int, int]], metrics: list[str],
                edges: dict, bins: int) -> str | None:
    """base64 uint16 `"metric head bin"` counts of each head's values over prompts."""
    if prompt_heads is None or not metrics:
        return None
    rows = prompt_heads[prompt_heads["model"] == model]
    index = {unit: i for i, unit in enumerate(units)}
    unit = np.array([index.get((int(l), int(h)), -1) for l, h in zip(rows["layer"], rows["head"])])
    counts = np.zeros((len(metrics), len(units), bins), dtype=np.int64)
    for m, metric in enumerate(metrics):
        values = rows[metric].to_numpy(dtype=float)
        low, high = edges[metric]
        keep = np.isfinite(values) & (unit >= 0)
        position = np.zeros(len(values), dtype=int) if high <= low else ((values - low) / (high - low) * bins).astype(int)
        position = position.clip(0, bins - 1)
        np.add.at(counts[m], (unit[keep], position[keep]), 1)
    return _b64(counts.clip(max=65535).astype("<u2"))


def _metric_edges(prompt_heads: pd.DataFrame | None, metrics: list[str]) -> dict:
    edges = {}
    for metric in metrics:
        values = prompt_heads[metric].to_numpy(dtype=float) if prompt_heads is not None else np.array([])
        values = values[np.isfinite(values)]
        edges[metric] = [float(values.min()), float(values.max())] if len(values) else [0.0, 1.0]
    return edges


def _model_payload(name: str, heads: pd.DataFrame, layers: pd.DataFrame, info: dict, columns: list[str],
                   similarity, thumbnails: dict, top: pd.DataFrame | None, prompt_index: dict, hist: str | None) -> dict:
    heads = heads.sort_values(HEAD_KEYS).reset_index(drop=True)
    units = list(zip(heads["layer"].astype(int), heads["head"].astype(int)))
    order = np.argsort(heads["cluster_rank"].to_numpy()) if "cluster_rank" in heads else np.arange(len(heads))
    payload = {
        # the summary shows a site's note (probes skipped for the site) after the spec
        "name": name, "summary": "; ".join(str(part) for part in (info.get("summary"), info.get("notes")) if part),
        "numLayers": int(info.get("num_layers", heads["layer"].max() + 1)),
        "nPrompts": int(info.get("n_prompts", 0)), "meanTokens": _finite([info.get("mean_tokens", np.nan)])[0],
        "gap": _finite([info.get(k, np.nan) for k in ("gap_mean", "gap_low", "gap_high")]),
        "grouping": info.get("grouping"), "groupSize": info.get("group_size"),
        "heads": {"layer": heads["layer"].astype(int).tolist(), "head": heads["head"].astype(int).tolist(),
                  "kv": heads["kv_group"].astype(int).tolist() if "kv_group" in heads else None,
                  "depth": _finite(heads["depth"]), "x": _finite(heads.get("map_x", np.zeros(len(heads)))),
                  "y": _finite(heads.get("map_y", np.zeros(len(heads)))), "order": order.tolist(),
                  "class": heads["pattern_class"].astype(str).tolist() if "pattern_class" in heads else None},
        "values": {c: _finite(heads[c]) for c in columns if c in heads},
        "layers": {"layer": layers["layer"].astype(int).tolist(), "depth": _finite(layers["depth"]),
                   "values": {c: _finite(layers[c]) for c in layers.columns if c in columns or c.startswith(
                       ("within_", "between_", "gap_"))}},
        "hist": hist,
    }
    if similarity is not None:
        matrix = np.asarray(similarity, dtype=float)
        if matrix.shape != (len(units), len(units)):
            raise InputError(f"the similarity of model '{name}' is {matrix.shape}, not one row and column per head "
                             f"({len(units)}).")
        matrix = matrix[np.ix_(order, order)]
        off = matrix[~np.eye(len(matrix), dtype=bool)]
        low, high = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
        scaled = np.zeros_like(matrix) if high <= low else (matrix - low) / (high - low)
        payload["similarity"] = _b64(np.round(scaled.clip(0, 1) * 255).astype(np.uint8))
        payload["simRange"] = [low, high]
    thumbs, thumb_index = [], {}
    for key, picture in (thumbnails or {}).items():
        picture = np.asarray(picture, dtype=np.uint8)
        thumb_index[key] = len(thumbs)
        thumbs.append([int(picture.shape[0]), int(picture.shape[1]), _b64(picture)])
    payload["thumbs"] = thumbs
    payload["top"] = {}
    if top is not None and len(top):
        unit_index = {unit: i for i, unit in enumerate(units)}
        for metric, group in top.sort_values(["metric", "rank"]).groupby("metric", sort=True):
            per_head = [[] for _ in units]
            for row in group.itertuples(index=False):
                key = (str(row.prompt_id), int(row.layer), int(row.head))
                per_head[unit_index[key[1:]]].append(
                    [prompt_index[key[0]], _finite([row.value])[0], thumb_index.get(key, -1)])
            payload["top"][str(metric)] = per_head
    return payload


def atlas_view(*, heads: pd.DataFrame, layers: pd.DataFrame, models: pd.DataFrame, prompt_heads: pd.DataFrame | None = None,
               top_prompts: pd.DataFrame | None = None, similarity: dict | None = None, thumbnails: dict | None = None,
               prompts: dict | None = None, measure: str = "js", title: str | None = None, cmap: str = "viridis",
               bins: int = 16) -> HtmlView:
    """The atlas page (module docstring) as an `HtmlView` (`.save(path)`, inline in notebooks)."""
    _require(heads, "heads", ["model", "layer", "head", "depth"])
    _require(layers, "layers", ["model", "layer", "depth"])
    _require(models, "models", ["model"])
    if prompt_heads is not None:
        _require(prompt_heads, "prompt_heads", ["model", "prompt_id", "layer", "head"])
    if top_prompts is not None:
        _require(top_prompts, "top_prompts", ["model", "layer", "head", "metric", "rank", "prompt_id", "value"])
    shown = summary_columns(heads) + [c for c in heads.columns if c.startswith("probe_")]
    columns = [f"{c[:-5]}{part}" for c in summary_columns(heads) for part in (c[-5:], "_low", "_high")]
    columns += [c for c in shown if c.startswith("probe_")]
    numeric = [c[: -len("_mean")] for c in summary_columns(heads) if c.endswith("_mean")]
    numeric = [m for m in numeric if prompt_heads is not None and m in prompt_heads.columns]
    edges = _metric_edges(prompt_heads, numeric)
    prompt_ids = list((prompts or {}).keys())
    if top_prompts is not None:
        prompt_ids += [str(p) for p in pd.unique(top_prompts["prompt_id"]) if str(p) not in (prompts or {})]
    prompt_index = {p: i for i, p in enumerate(prompt_ids)}
    payload_models = []
    for info in models.to_dict("records"):
        name = info["model"]
        units = heads[heads["model"] == name].sort_values(HEAD_KEYS)
        if units.empty:
            raise InputError(f"model '{name}' of the models table has no rows in the heads table; pass tables of one atlas.")
        keys = list(zip(units["layer"].astype(int), units["head"].astype(int)))
        top = None if top_prompts is None else top_prompts[top_prompts["model"] == name]
        payload_models.append(_model_payload(
            name, units, layers[layers["model"] == name].sort_values("layer"), info, columns,
            (similarity or {}).get(name), (thumbnails or {}).get(name), top, prompt_index,
            _histograms(prompt_heads, name, keys, numeric, edges, bins)))
    data = {
        "title": title or "Head atlas: " + ", ".join(str(m) for m in models["model"]),
        "measure": measure,
        "metrics": shown,
        "histMetrics": numeric, "histEdges": edges, "bins": bins,
        "rankBy": sorted(pd.unique(top_prompts["metric"]).tolist()) if top_prompts is not None and len(top_prompts) else [],
        "prompts": [{"id": p, "text": (prompts or {}).get(p, "")} for p in prompt_ids],
        "cmap": _b64(colormap_bytes(cmap)[:, :3]),
        "models": payload_models,
    }
    page = _page(data["title"], "atlas", DATA=_script_json(data))
    return HtmlView(page, height=900)


def write_atlas(path, **inputs) -> Path:
    """Write `atlas_view(**inputs)` to `path` and return the path."""
    return atlas_view(**inputs).save(path)
