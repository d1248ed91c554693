"""`write_html`: one self-contained interactive HTML page of every attention head of a cube.

The page needs no server and makes no network request: styles, script, colour tables and the
pattern itself are all inside the file. It shows every head as a thumbnail in a layers x heads
grid (KV group under each head label); clicking a thumbnail zooms into that head with token
labels on both axes, the weight under the cursor and the head's row of the metrics table.

Embedded format (what `tests/test_html.py` decodes independently):

- `<script id="hm-meta" type="application/json">`: JSON with `layers`, `heads`, `kv` (KV group
  of each head), `rows`/`cols` (query / key axis labels), `bits` (8 or 16) and `scales`
  (`"l h"`, row-major: the largest attendable weight of each head).
- `<script id="hm-mask">`: base64 of the attendable mask, `"l q k"` bool, each layer packed on
  its own with `numpy.packbits` (big bit order) to `ceil(q * k / 8)` bytes. False cells (causal
  future, padding, outside a sliding window) are drawn empty.
- `<script id="hm-data">`: base64 of unsigned integers (`uint8`, or little-endian `uint16`):
  for each layer, for each head, that layer's attendable cells in row-major `q k` order, each
  `round(weight / scale * (2**bits - 1))`. Decoding is `value * scale / (2**bits - 1)`, so
  the error of any weight is at most `scale / (2 * (2**bits - 1))`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import torch

from llm_heatmap.errors import InputError

from .style import GridStyle, style_of

__all__ = ["write_html"]

#: Colour tables offered in the page (the `cmap` argument is added when not listed).
PAGE_CMAPS = ("viridis", "magma", "cividis", "inferno")


def write_html(
    cube,
    path,
    *,
    metrics=None,
    title: str | None = None,
    style: GridStyle | None = None,
    bits: int = 8,
    **style_options,
) -> Path:
    """Write `cube` as one self-contained interactive HTML file and return its path.

    `metrics` is an optional pandas DataFrame with one row per head and columns `layer`,
    `head` (model indices, as in `cube.layers` / `cube.heads`) plus any metric columns; the
    zoomed view lists the selected head's row. `style` (a `GridStyle`; keyword `style_options`
    override its fields) is shared with the grid: the page opens with its colormap, and axes
    longer than its `max_tokens` are area-downsampled into that many bins (queries averaged, keys
    summed, so every row still sums to 1). `bits` (8 or 16) is the precision of the embedded weights.
    """
    cube = cube.one_sequence()
    style = style_of(style, style_options)
    cmap, max_tokens = style.cmap, style.max_tokens
    if bits not in (8, 16):
        raise InputError(f"bits={bits!r} is not supported; pass bits=8 (smaller file) or bits=16 (finer readout).")

    pattern = cube.pattern.detach().float().cpu()
    pooled = cube.metadata.get("downsample")
    if pooled:
        rows, cols, mask = _pooled_geometry(cube, pooled)
    else:
        rows, cols = _axis_labels(cube)
        mask = cube.attendable().cpu()
        if cube.query_mask.shape[-1] == cube.num_queries:
            mask &= cube.query_mask.bool().cpu()[None, :, None]
    limit = max_tokens
    downsampled = pattern.shape[-2] > limit or pattern.shape[-1] > limit
    if downsampled:
        pattern, mask, rows, cols = _downsample(pattern, mask, rows, cols, cube.query_mask.bool().cpu(), limit)

    data, scales = _quantize(pattern, mask, bits)
    packed = np.packbits(mask.numpy().reshape(mask.shape[0], -1), axis=1)
    meta = {
        "title": title or f"{cube.source or cube.spec.model_type}: attention heads",
        "summary": cube.spec.summary,
        "prompt": cube.prompt if isinstance(cube.prompt, str) else None,
        "tokens": pooled["num_keys"] if pooled else cube.num_keys,
        "downsampled": downsampled or bool(pooled),
        "layers": [int(x) for x in cube.layers],
        "heads": [int(x) for x in cube.heads],
        "kv": cube.kv_groups.tolist(),
        "numKv": int(cube.spec.num_kv_heads),
        "rows": rows,
        "cols": cols,
        "bits": bits,
        "scales": [float(s) for s in scales.reshape(-1)],
        "cmaps": _colour_tables(cmap),
        "cmap": cmap,
        "metrics": _metrics_payload(metrics, cube.layers, cube.heads),
    }
    page = (
        _TEMPLATE.replace("__TITLE__", html.escape(meta["title"]).replace("/", "&#47;"))
        .replace("__STYLE__", _STYLE)
        .replace("__SCRIPT__", _SCRIPT)
        .replace("__META__", _script_json(meta))
        .replace("__MASK__", base64.b64encode(packed.tobytes()).decode("ascii"))
        .replace("__DATA__", base64.b64encode(data.tobytes()).decode("ascii"))
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# ---- data ------------------------------------------------------------------------------
def _axis_labels(cube) -> tuple[list[dict], list[dict]]:
    """Label of every query row and key column: `{"t": token, "p": [first, last position]}`."""
    generated = cube.generated.tolist() if cube.generated is not None else [False] * cube.num_keys

    def label(position):
        return {"t": _token(cube, position), "p": [position, position], "g": bool(generated[position])}

    rows = [label(int(p)) for p in cube.query_positions.tolist()]
    cols = [label(k) for k in range(cube.num_keys)]
    return rows, cols


def _token(cube, index: int) -> str:
    return str(cube.tokens[index]) if index < len(cube.tokens) else f"#{index}"


def _pooled_geometry(cube, info: dict) -> tuple[list[dict], list[dict], torch.Tensor]:
    """Labels and `"l q k"` mask of a cube that probes' `Downsampler` pooled.

    Its `metadata["downsample"]` holds the bin edges; the cube keeps each key bin's first token
    and each query bin's middle position. A bin is empty only when no (row, key) pair inside
    it may attend: the causal and sliding-window rules of `attendable_mask`, applied to the
    bins' first and last positions.
    """
    q_edges, k_edges = torch.tensor(info["query_bins"]), torch.tensor(info["key_bins"])
    shift = cube.query_positions.cpu() - (q_edges[:-1] + q_edges[1:] - 1) // 2  # row index -> position
    p0, p1 = q_edges[:-1] + shift, q_edges[1:] - 1 + shift
    k0, k1 = k_edges[:-1], k_edges[1:] - 1
    generated = cube.generated.tolist() if cube.generated is not None else [False] * len(k0)
    cols = [
        {"t": _token(cube, i) + ("…" if b > a else ""), "p": [a, b], "g": bool(generated[i])}
        for i, (a, b) in enumerate(zip(k0.tolist(), k1.tolist()))
    ]
    home = (torch.searchsorted(k_edges, p0, right=True) - 1).clamp(0, len(k0) - 1).tolist()
    rows = [
        {"t": _token(cube, i) + ("…" if b > a else ""), "p": [a, b], "g": bool(generated[i])}
        for i, a, b in zip(home, p0.tolist(), p1.tolist())
    ]
    base = cube.query_mask.bool().cpu()[:, None] & cube.key_mask.bool().cpu()[None, :]
    if cube.spec.causal:
        base = base & (k0[None, :] <= p1[:, None])
    masks = []
    for layer in cube.layers:
        window = cube.spec.window(layer)
        masks.append(base & (p0[:, None] - k1[None, :] < window) if window else base)
    return rows, cols, torch.stack(masks)


def _pooling(n: int, bins: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """One-hot `"bin n"` matrix assigning position i to bin `i * bins // n` (times `weight`)."""
    assign = torch.arange(n) * bins // n
    matrix = torch.zeros(bins, n)
    matrix[assign, torch.arange(n)] = 1.0 if weight is None else weight.float()
    return matrix


def _merge_labels(labels: list[dict], pool: torch.Tensor) -> list[dict]:
    merged = []
    for members in (pool > 0).tolist():
        chosen = [label for label, inside in zip(labels, members) if inside]
        first, last = chosen[0], chosen[-1]
        text = first["t"] if len(chosen) == 1 else f"{first['t']}…{last['t']}"
        merged.append({"t": text, "p": [first["p"][0], last["p"][1]], "g": any(c["g"] for c in chosen)})
    return merged


def _downsample(pattern, mask, rows, cols, query_mask, limit):
    """Area-downsample every head: mean over the query rows of a bin, sum over its keys."""
    queries, keys = pattern.shape[-2:]
    row_bins, col_bins = min(queries, limit), min(keys, limit)
    real = query_mask if query_mask.shape[0] == queries else torch.ones(queries, dtype=torch.bool)
    rows_pool = _pooling(queries, row_bins, real)
    rows_mean = rows_pool / rows_pool.sum(1, keepdim=True).clamp(min=1)
    cols_pool = _pooling(keys, col_bins)
    pooled = torch.einsum("a q, l h q k, b k -> l h a b", rows_mean, pattern * mask[:, None], cols_pool)
    reach = torch.einsum("a q, l q k, b k -> l a b", (rows_pool > 0).float(), mask.float(), cols_pool) > 0
    return pooled, reach, _merge_labels(rows, _pooling(queries, row_bins)), _merge_labels(cols, cols_pool)


def _quantize(pattern: torch.Tensor, mask: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Attendable cells of every head as unsigned ints scaled to the head's maximum."""
    full = mask[:, None].expand_as(pattern)
    kept = pattern.clamp(min=0).where(full, torch.zeros(()))
    scales = kept.amax(dim=(-2, -1))
    scales = torch.where(scales > 0, scales, torch.ones(()))
    top = 2**bits - 1
    levels = torch.round(kept / scales[..., None, None] * top).masked_select(full)
    dtype = np.uint8 if bits == 8 else np.dtype("<u2")
    return levels.numpy().astype(dtype), scales.numpy()


def _colour_tables(cmap: str) -> dict[str, str]:
    """base64 of 256 RGB triples per colormap."""
    names = list(PAGE_CMAPS) if cmap in PAGE_CMAPS else [cmap, *PAGE_CMAPS]
    tables = {}
    for name in names:
        rgb = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
        tables[name] = base64.b64encode(np.round(rgb * 255).astype(np.uint8).tobytes()).decode("ascii")
    return tables


def _metrics_payload(metrics, layers, heads) -> dict | None:
    """Metric columns and one value list per `"layer,head"`, plus each numeric column's range."""
    if metrics is None:
        return None
    columns = getattr(metrics, "columns", None)
    if columns is None or "layer" not in columns or "head" not in columns:
        raise InputError("metrics must be a pandas DataFrame with columns 'layer' and 'head' (one row per head), e.g. head_metrics(cube).")
    shown = [c for c in columns if c not in ("layer", "head", "kv_group")]
    wanted = {(int(l), int(h)) for l in layers for h in heads}
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    numeric = [is_numeric_dtype(metrics[c]) and not is_bool_dtype(metrics[c]) for c in shown]
    table = {}
    for record in metrics.to_dict("records"):
        key = (int(record["layer"]), int(record["head"]))
        if key in wanted:
            table[f"{key[0]},{key[1]}"] = [_json_value(record[c]) for c in shown]
    ranges = []
    for column, is_number in zip(shown, numeric):
        values = metrics[column].to_numpy(dtype=float) if is_number else np.array([])
        values = values[np.isfinite(values)]
        ranges.append([float(values.min()), float(values.max())] if len(values) else None)
    return {"columns": [str(c) for c in shown], "rows": table, "ranges": ranges}


def _json_value(value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return None if value is None else str(value)


def _script_json(value) -> str:
    # "<" and "/" escaped so no token text can close the script tag or read as a URL
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c").replace("/", "\\/")


# ---- page ------------------------------------------------------------------------------
_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__STYLE__</style>
</head>
<body>
<header class="top">
  <div class="titles">
    <h1 id="title"></h1>
    <div id="summary" class="muted"></div>
    <div id="prompt" class="prompt"></div>
  </div>
  <button id="o-theme" class="ghost theme-toggle" title="Switch light / dark">Theme</button>
</header>
<nav class="toolbar">
  <div class="group">
    <label>Layers <input id="f-layer" placeholder="all (e.g. 0-3, 9)" spellcheck="false"></label>
    <label>Heads <input id="f-head" placeholder="all (e.g. 0-7)" spellcheck="false"></label>
    <label>KV group <select id="f-kv"><option value="">all</option></select></label>
    <button id="f-reset" class="ghost">Reset</button>
    <span id="count" class="muted"></span>
  </div>
  <div class="group">
    <label>Colours <select id="o-cmap"></select></label>
    <label>Scale <select id="o-scale"><option value="head">per head</option><option value="shared">shared</option></select></label>
    <label>Gamma <select id="o-gamma"><option value="1">1 (linear)</option><option value="0.5">0.5</option><option value="0.25">0.25</option></select></label>
    <label>Size <input id="o-size" type="range" min="24" max="160" step="4"></label>
    <canvas id="colorbar" width="256" height="1"></canvas>
  </div>
</nav>
<main id="grid-wrap"><table id="grid"></table></main>
<section id="zoom" hidden>
  <div class="zoom-bar">
    <button id="z-close" class="ghost" title="Back to the grid (Esc)">&larr; Grid</button>
    <h2 id="z-title"></h2>
    <span class="zoom-tools"><button id="z-out" class="ghost" title="Smaller cells (-)">&minus;</button><button id="z-fit" class="ghost" title="Fit the window">Fit</button><button id="z-in" class="ghost" title="Larger cells (+)">+</button></span>
    <span class="muted">&larr; &rarr; head &middot; &uarr; &darr; layer &middot; Esc grid</span>
    <button class="ghost theme-toggle" title="Switch light / dark">Theme</button>
  </div>
  <div class="zoom-body">
    <div id="z-scroll">
      <div id="z-plot">
        <div class="corner"><span>key &rarr;</span><span>query &darr;</span></div>
        <div id="z-cols" class="cols"></div>
        <div id="z-rows" class="rows"></div>
        <canvas id="z-canvas"></canvas>
      </div>
    </div>
    <aside>
      <div id="z-readout" class="readout"><span class="muted">Hover a cell to read its weight.</span></div>
      <canvas id="z-colorbar" class="bar-wide" width="256" height="1"></canvas>
      <div class="ticks muted"><span>0</span><span id="z-max"></span></div>
      <div class="scale-note muted" id="z-scale"></div>
      <h3>Metrics</h3>
      <table id="z-metrics"></table>
    </aside>
  </div>
</section>
<script id="hm-meta" type="application/json">__META__</script>
<script id="hm-mask" type="application/octet-stream">__MASK__</script>
<script id="hm-data" type="application/octet-stream">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""

_STYLE = """
:root { --bg:#f7f7f8; --panel:#ffffff; --fg:#1d1f23; --muted:#6b7079; --line:#dfe1e5; --accent:#2563eb;
  --empty:#eceef1; --hot:#f59e0b; font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
:root[data-theme=dark] { --bg:#16181c; --panel:#1e2126; --fg:#e6e7ea; --muted:#989ca5; --line:#30343b;
  --accent:#60a5fa; --empty:#26292f; --hot:#fbbf24; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg); font-size:13px; }
.muted { color:var(--muted); }
header.top { display:flex; justify-content:space-between; align-items:flex-start; gap:16px; padding:14px 20px 8px; }
h1 { font-size:18px; font-weight:600; margin:0 0 4px; }
h2 { font-size:15px; font-weight:600; margin:0; }
h3 { font-size:12px; font-weight:600; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); margin:18px 0 6px; }
.prompt { margin-top:6px; max-width:1100px; color:var(--fg); opacity:.85; display:-webkit-box; -webkit-line-clamp:2;
  -webkit-box-orient:vertical; overflow:hidden; white-space:pre-wrap; }
.toolbar { position:sticky; top:0; z-index:5; display:flex; flex-wrap:wrap; justify-content:space-between; gap:8px 24px;
  padding:8px 20px; background:var(--bg); border-bottom:1px solid var(--line); }
.toolbar .group { display:flex; flex-wrap:wrap; align-items:center; gap:6px 14px; }
label { display:inline-flex; align-items:center; gap:6px; color:var(--muted); }
input, select, button { font:inherit; color:var(--fg); background:var(--panel); border:1px solid var(--line);
  border-radius:6px; padding:4px 8px; }
input:not([type=range]) { width:130px; }
input.invalid { border-color:#dc2626; }
button { cursor:pointer; }
button.ghost:hover { border-color:var(--accent); }
#colorbar { width:140px; height:12px; border:1px solid var(--line); border-radius:3px; }
#grid-wrap { padding:12px 20px 40px; overflow:auto; }
#grid { border-collapse:separate; border-spacing:3px; }
#grid th { font-weight:500; color:var(--muted); font-size:11px; white-space:nowrap; }
#grid thead th { text-align:center; vertical-align:bottom; padding-bottom:2px; }
#grid thead th .kv { display:block; font-size:10px; opacity:.8; }
#grid tbody th { text-align:right; padding-right:6px; }
#grid .kvstart { padding-left:8px; }
#grid td { padding:0; }
#grid td canvas { display:block; background:var(--empty); border-radius:2px; cursor:zoom-in; outline:1px solid transparent; }
#grid td canvas:hover { outline:2px solid var(--accent); }
#grid td.selected canvas { outline:2px solid var(--hot); }
canvas.pixelated { image-rendering:pixelated; }
#zoom { position:fixed; inset:0; z-index:10; background:var(--bg); display:flex; flex-direction:column; }
#zoom[hidden] { display:none; }
.zoom-bar { display:flex; align-items:center; gap:16px; padding:10px 20px; border-bottom:1px solid var(--line); }
.zoom-bar > .muted { margin-left:auto; font-size:12px; }
.zoom-body { flex:1; display:flex; min-height:0; }
#z-scroll { flex:1; overflow:auto; padding:16px 20px; }
#z-plot { display:grid; grid-template-columns:auto auto; grid-template-rows:auto auto; width:max-content; }
.corner { display:flex; flex-direction:column; justify-content:flex-end; align-items:flex-end; padding:0 6px 6px 0;
  font-size:11px; color:var(--muted); }
.cols, .rows { position:relative; }
.cols div, .rows div { position:absolute; white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
.cols div { bottom:0; writing-mode:vertical-rl; transform:rotate(180deg); max-height:130px; text-align:left; padding-top:6px; }
.rows div { right:0; max-width:170px; text-align:right; padding-right:6px; }
.cols div, .rows div { color:var(--fg); font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.cols div.gen, .rows div.gen { color:var(--accent); }
.cols div.hot, .rows div.hot { color:var(--hot); font-weight:700; }
.cols div.skip, .rows div.skip { visibility:hidden; }
.cols div.skip.hot, .rows div.skip.hot { visibility:visible; background:var(--bg); z-index:1; }
#z-canvas { display:block; background:var(--empty); image-rendering:pixelated; cursor:crosshair; }
aside { width:380px; flex:none; border-left:1px solid var(--line); padding:16px 20px; overflow-y:auto; overflow-x:hidden; background:var(--panel); }
.readout { min-height:64px; line-height:1.6; }
.readout b { font-size:20px; font-weight:600; font-variant-numeric:tabular-nums; }
.readout code { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background:var(--bg);
  padding:0 4px; border-radius:4px; }
.scale-note { font-size:12px; margin-top:4px; }
.bar-wide { display:block; width:100%; height:12px; margin-top:14px; border:1px solid var(--line); border-radius:3px; }
.ticks { display:flex; justify-content:space-between; font-size:11px; font-variant-numeric:tabular-nums; }
.zoom-tools { display:inline-flex; gap:4px; }
.zoom-tools button { min-width:34px; }
#z-metrics { width:100%; table-layout:fixed; border-collapse:collapse; font-variant-numeric:tabular-nums; }
#z-metrics td { padding:5px 4px; border-bottom:1px solid var(--line); }
#z-metrics td:first-child { width:56%; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
#z-metrics td:last-child { width:70px; }
#z-metrics td:nth-child(2) { text-align:right; font-weight:600; white-space:nowrap; }
#z-metrics .bar { width:60px; height:6px; background:var(--empty); border-radius:3px; position:relative; }
#z-metrics .bar i { position:absolute; top:-2px; width:3px; height:10px; border-radius:1px; background:var(--accent); }
"""

_SCRIPT = r"""
"use strict";
(() => {
const t0 = performance.now();
const $ = (id) => document.getElementById(id);
const meta = JSON.parse($("hm-meta").textContent);

function fromBase64(text) {
  text = text.trim();
  if (Uint8Array.fromBase64) return Uint8Array.fromBase64(text);
  const bin = atob(text), out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}
const raw = fromBase64($("hm-data").textContent);
const values = meta.bits === 8 ? raw : new Uint16Array(raw.buffer, raw.byteOffset, raw.byteLength / 2);
const maskBytes = fromBase64($("hm-mask").textContent);

const L = meta.layers.length, H = meta.heads.length, Q = meta.rows.length, K = meta.cols.length;
const topLevel = (1 << meta.bits) - 1;
const maxScale = Math.max(...meta.scales);
// attendable cells of each layer, as flat q*K+k indices in row-major order
const stride = Math.ceil(Q * K / 8);
const cells = [], offsets = [];
let offset = 0;
for (let l = 0; l < L; l++) {
  const list = [];
  for (let i = 0; i < Q * K; i++) if ((maskBytes[l * stride + (i >> 3)] >> (7 - (i & 7))) & 1) list.push(i);
  cells.push(Int32Array.from(list));
  offsets.push(offset);
  offset += H * list.length;
}
const decodeMs = performance.now() - t0;

function cellValue(l, h, q, k) {
  const list = cells[l], flat = q * K + k;
  let lo = 0, hi = list.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (list[mid] === flat) return values[offsets[l] + h * list.length + mid] * meta.scales[l * H + h] / topLevel;
    if (list[mid] < flat) lo = mid + 1; else hi = mid - 1;
  }
  return null;
}

// ---- colours ----
const tables = {};
for (const [name, b64] of Object.entries(meta.cmaps)) {
  const rgb = fromBase64(b64), lut = new Uint32Array(256);
  for (let i = 0; i < 256; i++) lut[i] = (255 << 24) | (rgb[3 * i + 2] << 16) | (rgb[3 * i + 1] << 8) | rgb[3 * i];
  tables[name] = lut;
}
const opts = { cmap: meta.cmap, scale: "head", gamma: 1 };
const levels = Math.min(topLevel + 1, 4096), shift = meta.bits - Math.log2(levels);
function palette(l, h) {
  const lut = tables[opts.cmap], factor = opts.scale === "shared" ? meta.scales[l * H + h] / maxScale : 1;
  const pal = new Uint32Array(levels);
  for (let i = 0; i < levels; i++) pal[i] = lut[Math.min(255, Math.round(255 * Math.pow(i / (levels - 1) * factor, opts.gamma)))];
  return pal;
}
function headImage(l, h) {
  const image = new ImageData(K, Q), px = new Uint32Array(image.data.buffer);
  const pal = palette(l, h), list = cells[l], base = offsets[l] + h * list.length;
  for (let c = 0; c < list.length; c++) px[list[c]] = pal[values[base + c] >> shift];
  return image;
}
function drawColorbar() {
  for (const canvas of [$("colorbar"), $("z-colorbar")]) {
    const ctx = canvas.getContext("2d"), image = ctx.createImageData(256, 1);
    const px = new Uint32Array(image.data.buffer), lut = tables[opts.cmap];
    for (let i = 0; i < 256; i++) px[i] = lut[Math.min(255, Math.round(255 * Math.pow(i / 255, opts.gamma)))];
    ctx.putImageData(image, 0, 0);
  }
  $("colorbar").title = opts.scale === "shared" ? `0 … ${fmt(maxScale)} (shared)` : "0 … each head's maximum";
}

// ---- text ----
function fmt(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toFixed(a < 1 ? 4 : 3);
}
function showToken(t) {
  const s = t.replace(/\n/g, "↵").replace(/\r/g, "␍").replace(/\t/g, "⇥");
  return s.trim() === "" ? s.replace(/ /g, "␣") || "∅" : s;
}
function span(label) { return label.p[0] === label.p[1] ? `#${label.p[0]}` : `#${label.p[0]}–${label.p[1]}`; }
$("title").textContent = meta.title;
$("summary").textContent = `${meta.summary} · ${meta.tokens} tokens · ${L} layers × ${H} heads`
  + (meta.downsampled ? ` · downsampled to ${Q} × ${K} bins` : "");
$("prompt").textContent = meta.prompt || "";
document.title = meta.title;

// ---- grid ----
const grid = $("grid"), thumbs = [];
function buildGrid() {
  const head = grid.createTHead().insertRow();
  head.appendChild(document.createElement("th"));
  meta.heads.forEach((h, j) => {
    const th = document.createElement("th");
    th.innerHTML = `H${h}<span class="kv">KV${meta.kv[j]}</span>`;
    if (j > 0 && meta.kv[j] !== meta.kv[j - 1]) th.className = "kvstart";
    th.dataset.col = j;
    head.appendChild(th);
  });
  const body = grid.createTBody();
  meta.layers.forEach((layer, i) => {
    const tr = body.insertRow();
    tr.dataset.row = i;
    const th = document.createElement("th");
    th.textContent = `L${layer}`;
    tr.appendChild(th);
    thumbs.push([]);
    meta.heads.forEach((h, j) => {
      const td = tr.insertCell();
      td.dataset.col = j;
      td.dataset.layer = layer; td.dataset.head = h;
      if (j > 0 && meta.kv[j] !== meta.kv[j - 1]) td.className = "kvstart";
      const canvas = document.createElement("canvas");
      canvas.width = K; canvas.height = Q;
      canvas.className = "thumb";
      canvas.title = `Layer ${layer} · Head ${h} · KV group ${meta.kv[j]}`;
      canvas.addEventListener("click", () => openZoom(i, j));
      td.appendChild(canvas);
      thumbs[i].push(canvas);
    });
  });
}
function sizeThumbs(size) {
  const w = Math.max(1, Math.round(size * Math.min(1, K / Q))), hgt = Math.max(1, Math.round(size * Math.min(1, Q / K)));
  const crisp = size >= Math.max(K, Q);
  for (const row of thumbs) for (const c of row) {
    c.style.width = w + "px"; c.style.height = hgt + "px";
    c.classList.toggle("pixelated", crisp);
  }
}
let renderToken = 0;
function renderThumbs(done) {
  const token = ++renderToken, start = performance.now();
  let n = 0;
  function chunk() {
    if (token !== renderToken) return;
    const until = performance.now() + 24;
    while (n < L * H && performance.now() < until) {
      const l = Math.floor(n / H), h = n % H;
      thumbs[l][h].getContext("2d").putImageData(headImage(l, h), 0, 0);
      n++;
    }
    if (n < L * H) setTimeout(chunk, 0);
    else if (done) done(performance.now() - start);
  }
  chunk();
}

// ---- filters ----
function parseSet(text, allowed) {
  text = text.trim();
  if (!text) return null;
  const out = new Set();
  for (const part of text.split(/[\s,;]+/).filter(Boolean)) {
    const m = part.match(/^(\d+)(?:[-:](\d+))?$/);
    if (!m) return undefined;
    const a = +m[1], b = m[2] === undefined ? a : +m[2];
    for (let v = Math.min(a, b); v <= Math.max(a, b); v++) if (allowed.includes(v)) out.add(v);
  }
  return out;
}
const visible = { rows: meta.layers.map(() => true), cols: meta.heads.map(() => true) };
function applyFilters() {
  const layers = parseSet($("f-layer").value, meta.layers), heads = parseSet($("f-head").value, meta.heads);
  $("f-layer").classList.toggle("invalid", layers === undefined);
  $("f-head").classList.toggle("invalid", heads === undefined);
  const kv = $("f-kv").value === "" ? null : +$("f-kv").value;
  visible.rows = meta.layers.map((l) => !layers || layers.has(l));
  visible.cols = meta.heads.map((h, j) => (!heads || heads.has(h)) && (kv === null || meta.kv[j] === kv));
  for (const tr of grid.tBodies[0].rows) tr.style.display = visible.rows[+tr.dataset.row] ? "" : "none";
  for (const cell of grid.querySelectorAll("[data-col]")) cell.style.display = visible.cols[+cell.dataset.col] ? "" : "none";
  const shown = visible.rows.filter(Boolean).length * visible.cols.filter(Boolean).length;
  $("count").textContent = `${shown} of ${L * H} heads`;
  $("count").dataset.shown = shown;
}
for (let g = 0; g < meta.numKv; g++) $("f-kv").add(new Option(`KV${g}`, String(g)));
for (const id of ["f-layer", "f-head"]) $(id).addEventListener("input", applyFilters);
$("f-kv").addEventListener("change", applyFilters);
$("f-reset").addEventListener("click", () => { $("f-layer").value = ""; $("f-head").value = ""; $("f-kv").value = ""; applyFilters(); });

// ---- zoom ----
const zoom = { l: -1, h: -1, cell: 0, image: null, offscreen: document.createElement("canvas") };
function fitCell() {
  const area = $("z-scroll");
  const w = area.clientWidth - 220, hgt = area.clientHeight - 170;
  return Math.max(3, Math.min(40, Math.floor(Math.min(w / K, hgt / Q))));
}
// labels sit centred on their cell; when cells are smaller than the text, only every n-th shows
function labelAxis(box, labels, cell, vertical) {
  box.textContent = "";
  const font = Math.max(8, Math.min(13, cell - 2)), line = font + 3, every = Math.max(1, Math.ceil(line / cell));
  const divs = labels.map((label, i) => {
    const div = document.createElement("div");
    div.textContent = showToken(label.t);
    div.title = `${label.t} (${span(label)})`;
    div.style.fontSize = font + "px";
    div.style.lineHeight = line + "px";
    div.style[vertical ? "left" : "top"] = (i + 0.5) * cell - line / 2 + "px";
    div.style[vertical ? "width" : "height"] = line + "px";
    if (label.g) div.classList.add("gen");
    if (i % every) div.classList.add("skip");
    box.appendChild(div);
    return div;
  });
  box.style[vertical ? "width" : "height"] = labels.length * cell + "px";
  const extent = Math.max(0, ...divs.map((d) => (vertical ? d.offsetHeight : d.offsetWidth)));
  box.style[vertical ? "height" : "width"] = extent + "px";
}
function drawZoom(hot) {
  const canvas = $("z-canvas"), ctx = canvas.getContext("2d"), c = zoom.cell, dpr = window.devicePixelRatio || 1;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, K * c, Q * c);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(zoom.offscreen, 0, 0, K * c, Q * c);
  if (hot) {
    ctx.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--hot");
    ctx.lineWidth = Math.max(1, Math.min(2, c / 6));
    ctx.strokeRect(hot.k * c + 0.5, hot.q * c + 0.5, c - 1, c - 1);
  }
}
function layoutZoom() {
  const c = zoom.cell, canvas = $("z-canvas"), dpr = window.devicePixelRatio || 1;
  canvas.width = K * c * dpr; canvas.height = Q * c * dpr;
  canvas.style.width = K * c + "px"; canvas.style.height = Q * c + "px";
  canvas.dataset.cell = c;
  labelAxis($("z-cols"), meta.cols, c, true);
  labelAxis($("z-rows"), meta.rows, c, false);
  drawZoom(null);
}
function openZoom(l, h) {
  document.querySelectorAll("#grid td.selected").forEach((td) => td.classList.remove("selected"));
  thumbs[l][h].parentElement.classList.add("selected");
  zoom.l = l; zoom.h = h;
  const layer = meta.layers[l], head = meta.heads[h];
  $("zoom").hidden = false;
  $("zoom").dataset.layer = layer; $("zoom").dataset.head = head;
  $("z-title").textContent = `Layer ${layer} · Head ${head} · KV group ${meta.kv[h]}`;
  zoom.offscreen.width = K; zoom.offscreen.height = Q;
  zoom.offscreen.getContext("2d").putImageData(headImage(l, h), 0, 0);
  if (!zoom.cell) zoom.cell = fitCell();
  layoutZoom();
  const scale = meta.scales[l * H + h];
  $("z-max").textContent = fmt(opts.scale === "shared" ? maxScale : scale);
  $("z-scale").textContent = `${opts.scale === "shared" ? "shared" : "this head's"} colour range`
    + (opts.gamma !== 1 ? `, gamma ${opts.gamma}` : "") + ` · weights embedded as ${meta.bits}-bit (±${fmt(scale / topLevel / 2)})`;
  $("z-readout").innerHTML = '<span class="muted">Hover a cell to read its weight.</span>';
  showMetrics(layer, head);
}
function closeZoom() { $("zoom").hidden = true; }
function showMetrics(layer, head) {
  const table = $("z-metrics");
  table.textContent = "";
  const m = meta.metrics;
  const row = m && m.rows[`${layer},${head}`];
  if (!row) {
    table.insertRow().insertCell().textContent = m ? "No metrics for this head." : "No metrics table was given.";
    return;
  }
  m.columns.forEach((name, i) => {
    const tr = table.insertRow();
    tr.dataset.metric = name;
    const label = tr.insertCell();
    label.textContent = name;
    label.title = name;
    tr.insertCell().textContent = fmt(row[i]);
    const bar = tr.insertCell(), range = m.ranges[i];
    if (range && typeof row[i] === "number") {
      const div = document.createElement("div"), mark = document.createElement("i");
      div.className = "bar";
      const f = range[1] > range[0] ? (row[i] - range[0]) / (range[1] - range[0]) : 0.5;
      mark.style.left = `calc(${(100 * f).toFixed(1)}% - 1px)`;
      div.title = `range over heads: ${fmt(range[0])} … ${fmt(range[1])}`;
      div.appendChild(mark);
      bar.appendChild(div);
    }
  });
}
let lastHot = null;
function hover(event) {
  const rect = $("z-canvas").getBoundingClientRect(), c = zoom.cell;
  const k = Math.floor((event.clientX - rect.left) / c), q = Math.floor((event.clientY - rect.top) / c);
  if (q < 0 || k < 0 || q >= Q || k >= K) return;
  if (lastHot) { lastHot.forEach((d) => d && d.classList.remove("hot")); }
  lastHot = [$("z-rows").children[q], $("z-cols").children[k]];
  lastHot.forEach((d) => d.classList.add("hot"));
  drawZoom({ q, k });
  const v = cellValue(zoom.l, zoom.h, q, k), out = $("z-readout"), row = meta.rows[q], col = meta.cols[k];
  out.dataset.query = q; out.dataset.key = k; out.dataset.value = v === null ? "" : v;
  const tok = (label) => `<code></code> <span class="muted">${span(label)}</span>`;
  out.innerHTML = `<div>query ${tok(row)}</div><div>key&nbsp;&nbsp;&nbsp;${tok(col)}</div><div class="value"></div>`;
  const codes = out.querySelectorAll("code");
  codes[0].textContent = showToken(row.t); codes[1].textContent = showToken(col.t);
  out.querySelector(".value").innerHTML = v === null ? '<span class="muted">empty (masked: future, padding or outside the window)</span>' : `<b></b>`;
  if (v !== null) out.querySelector("b").textContent = fmt(v);
}
$("z-canvas").addEventListener("mousemove", hover);
$("z-close").addEventListener("click", closeZoom);
function setCell(cell) { zoom.cell = Math.max(2, Math.min(48, cell)); layoutZoom(); }
$("z-in").addEventListener("click", () => setCell(zoom.cell + 2));
$("z-out").addEventListener("click", () => setCell(zoom.cell - 2));
$("z-fit").addEventListener("click", () => setCell(fitCell()));
function step(dl, dh) {
  let l = zoom.l, h = zoom.h;
  do { l += dl; h += dh; } while (l >= 0 && l < L && h >= 0 && h < H && !(visible.rows[l] && visible.cols[h]));
  if (l >= 0 && l < L && h >= 0 && h < H) openZoom(l, h);
}
document.addEventListener("keydown", (e) => {
  if ($("zoom").hidden || e.target.tagName === "INPUT") return;
  const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
  if (e.key === "Escape") closeZoom();
  else if (moves[e.key]) { step(...moves[e.key]); e.preventDefault(); }
  else if (e.key === "+" || e.key === "=") setCell(zoom.cell + 2);
  else if (e.key === "-") setCell(zoom.cell - 2);
});

// ---- options ----
for (const name of Object.keys(tables)) $("o-cmap").add(new Option(name, name));
$("o-cmap").value = opts.cmap;
function rerender() {
  drawColorbar();
  renderThumbs();
  if (!$("zoom").hidden) openZoom(zoom.l, zoom.h);
}
$("o-cmap").addEventListener("change", (e) => { opts.cmap = e.target.value; rerender(); });
$("o-scale").addEventListener("change", (e) => { opts.scale = e.target.value; rerender(); });
$("o-gamma").addEventListener("change", (e) => { opts.gamma = +e.target.value; rerender(); });
$("o-size").addEventListener("input", (e) => sizeThumbs(+e.target.value));
const dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
document.documentElement.dataset.theme = dark ? "dark" : "light";
document.querySelectorAll(".theme-toggle").forEach((button) => button.addEventListener("click", () => {
  const root = document.documentElement;
  root.dataset.theme = root.dataset.theme === "dark" ? "light" : "dark";
  if (!$("zoom").hidden) drawZoom(null);
}));

buildGrid();
const fit = Math.floor((document.documentElement.clientWidth - 120) / (H + 0.3 * meta.numKv) - 3);
$("o-size").value = Math.max(40, Math.min(96, fit));
sizeThumbs(+$("o-size").value);
applyFilters();
drawColorbar();
renderThumbs((ms) => {
  window.heatmapStats = { decodeMs, renderMs: ms, readyAt: performance.now(), thumbs: L * H };
  document.body.dataset.ready = "1";
});
})();
"""
