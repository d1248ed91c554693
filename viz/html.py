"""`write_html`: one self-contained interactive HTML page of every attention head of a cube.

The page needs no server and makes no network request: styles, script (`viz/assets/`), colour
tables and the pattern itself are all inside the file. It shows every head as a thumbnail in a layers x heads
grid (KV group under each head label); clicking a thumbnail zooms into that head with token
labels on both axes, the weight under the cursor and the head's row of the metrics table.

Embedded format (what `tests/test_html.py` decodes independently):

- `<script id="hm-meta" type="application/json">`: JSON with `layers`, `heads`, `kv` (KV group
  of each head), `rows`/`cols` (query / key axis labels), `bits` (8 or 16), `scales`
  (`"l h"`, row-major: the largest attendable weight of each head), `ranges` (per head, the
  extremes that set colour ranges with the first-token column kept or left out), `sinkColumn`
  and `style` (the `GridStyle` the page opens with; the page colours cells by the grid's rules).
- `<script id="hm-mask">`: base64 of the attendable mask, `"l q k"` bool, each layer packed on
  its own with `numpy.packbits` (big bit order) to `ceil(q * k / 8)` bytes. False cells (causal
  future, padding, outside a sliding window) are drawn empty.
- `<script id="hm-data">`: base64 of unsigned integers (`uint8`, or little-endian `uint16`):
  for each layer, for each head, that layer's attendable cells in row-major `q k` order, each
  `round(weight / scale * (2**bits - 1))`. Decoding is `value * scale / (2**bits - 1)`, so
  the error of any weight is at most `scale / (2 * (2**bits - 1))`.
- A difference cube (`cube.difference`, B - A) sets `signed` in the metadata: `scales` are then
  each head's largest |B - A|, each cell is `round((x / scale + 1) / 2 * (2**bits - 1))`, decoded
  as `(2 * value / (2**bits - 1) - 1) * scale`, and the page draws a symmetric range around 0 on a
  diverging colour table.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from importlib import resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llm_heatmap.errors import InputError
from llm_heatmap.models.files import atomic_output

from llm_heatmap.probes.stream import downsample

from .labels import model_name, token_text
from .raster import LOG_FLOOR, colormap_bytes, range_and_grey
from .style import DIFFERENCE_CMAP, GridStyle, style_of

__all__ = ["HtmlView", "html_view", "write_html"]

#: Colour tables offered in the page (the `cmap` argument is added when not listed).
PAGE_CMAPS = ("viridis", "magma", "cividis", "inferno")
#: ... and for a difference cube (diverging, white at 0).
DIFFERENCE_CMAPS = (DIFFERENCE_CMAP, "coolwarm", "PuOr_r", "PiYG")


@dataclass(frozen=True)
class HtmlView:
    """The interactive view as one self-contained page; it displays itself inline in notebooks
    (an iframe holding the page, so its script and styles stay apart from the notebook's)."""

    page: str
    height: int = 720
    note: str | None = None  # said above the inline view (e.g. that it was downsampled to fit a notebook)

    def __repr__(self) -> str:
        note = f"; {self.note}" if self.note else ""
        return f"HtmlView(self-contained page of {len(self.page.encode()) / 2**20:,.1f} MiB; .save(path){note})"

    def save(self, path) -> Path:
        """Write the page to `path` (complete or not at all: `models.files.atomic_output`)."""
        path = Path(path)
        with atomic_output(path, force=True) as temp:
            temp.write_text(self.page, encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        note = f'<div style="font-size:12px;color:#555;margin:2px 0">{html.escape(self.note)}</div>' if self.note else ""
        return note + (f'<iframe srcdoc="{html.escape(self.page, quote=True)}" sandbox="allow-scripts" '
                f'style="width:100%; height:{self.height}px; border:1px solid #ddd; border-radius:4px"></iframe>')


def write_html(cube, path, **options) -> Path:
    """Write `html_view(cube, **options)` to `path` and return the path."""
    return html_view(cube, **options).save(path)


def html_view(
    cube,
    *,
    metrics=None,
    title: str | None = None,
    style: GridStyle | None = None,
    bits: int | None = None,
    qk_maps=None,
    **style_options,
) -> HtmlView:
    """`cube` as one self-contained interactive HTML page (`HtmlView`: `.save(path)`, inline in notebooks).

    `metrics` is an optional pandas DataFrame with one row per head and columns `layer`,
    `head` (model indices, as in `cube.layers` / `cube.heads`) plus any metric columns; the
    zoomed view lists the selected head's row. `style` (a `GridStyle`; keyword `style_options`
    override its fields) is shared with the grid: the page opens with its scale, range, gamma,
    first-token handling and colormap, and axes longer than its `max_tokens` are area-pooled
    (`probes.stream.downsample`). `bits` (8 or 16) is the precision of the embedded weights;
    by default 16 where the page opens on a log scale (small weights matter there), else 8.
    A cube with value norms gets a weights / norm-weighted switch (opening on `style.weighting`);
    `qk_maps` (`analyses.qk_map` results, one per layer and KV group) adds each head's query-key map
    to its zoomed view.
    """
    signed = bool(cube.difference)
    style = style_of(style, style_options).signed(signed)
    cube = downsample(cube.one_sequence(), style.max_tokens)
    scale = "linear" if signed else style.resolved_scale(cube.pooling is not None)
    bits = (16 if scale == "log" else 8) if bits is None else bits
    if bits not in (8, 16):
        raise InputError(f"bits={bits!r} is not supported; pass bits=8 (smaller file) or bits=16 (finer readout).")

    pattern = cube.pattern.detach().float().cpu()
    norms = None if cube.value_norms is None else cube.value_norms.detach().float().cpu()
    if style.weighting == "norms" and norms is None and cube.weighting != "norms":
        cube.norm_weighted()  # raises: this cube holds no value norms
    mask = cube.attendable()
    data, scales = _quantize(pattern, mask, bits, signed)
    packed = np.packbits(mask.numpy().reshape(mask.shape[0], -1), axis=1)
    rows, cols = _axis_labels(cube)
    what = "attention B − A" if signed else "attention heads"
    meta = {
        "title": title or f"{model_name(cube.source) or cube.spec.model_type}: {what}",
        "summary": cube.spec.summary,
        "prompt": _difference_prompts(cube) if signed else cube.prompt if isinstance(cube.prompt, str) else None,
        "signed": signed,
        "tokens": cube.num_tokens,
        "downsampled": cube.pooling is not None,
        "layers": [int(x) for x in cube.layers],
        "heads": [int(x) for x in cube.heads],
        "kv": cube.kv_groups.tolist(),
        "numKv": int(cube.spec.num_kv_heads),
        "rows": rows,
        "cols": cols,
        "bits": bits,
        "scales": [float(s) for s in scales.reshape(-1)],
        "sinkColumn": cube.first_key,
        "weighting": cube.weighting,
        "valueNorms": None if norms is None else base64.b64encode(norms.numpy().astype("<f4").tobytes()).decode("ascii"),
        "ranges": _all_ranges(pattern.abs() if signed else pattern, norms, mask, cube.first_key),
        "style": {"scale": scale, "gamma": style.gamma, "sink": style.sink, "perHead": style.per_head_range,
                  "vmin": style.vmin, "vmax": style.vmax, "cmap": style.cmap, "logFloor": LOG_FLOOR,
                  "weighting": "norms" if norms is not None and style.weighting == "norms" else "weights"},
        "qk": _qk_payload(qk_maps, cube),
        "cmaps": _colour_tables(style.cmap, DIFFERENCE_CMAPS if signed else PAGE_CMAPS),
        "metrics": _metrics_payload(metrics, cube.layers, cube.heads),
    }
    page = _page(meta["title"], "view", META=_script_json(meta),
                 MASK=base64.b64encode(packed.tobytes()).decode("ascii"),
                 DATA=base64.b64encode(data.tobytes()).decode("ascii"))
    return HtmlView(page)


def _asset(name: str) -> str:
    """A file of the page (viz/assets/), inlined so the page stays one offline file."""
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


_SLOT = re.compile(r"__([A-Z]+)__")


def _fill(template: str, values: dict[str, str]) -> str:
    """`template` with each `__NAME__` slot replaced by `values[NAME]`, in one pass: text put in a slot is
    never read again, so data that spells a slot's name stays as written."""
    return _SLOT.sub(lambda slot: values.get(slot.group(1), slot.group(0)), template)


def sites_view(cubes, *, image=None, metrics=None, title: str | None = None, **options) -> HtmlView:
    """The cubes of one capture's sites (`probes.SiteCubes`, or any mapping site -> cube) as one page: a
    selector switching between each site's interactive view (`html_view`, hover naming the query and key
    tokens or patches), with `image` (a PIL image, or a list: the images of one pass) shown above a vision site. `metrics` maps site -> table;
    `options` go to every site's `html_view`."""
    if not len(cubes):
        raise InputError("cubes holds no site; capture at least one (capture_sites).")
    metrics = metrics or {}
    frames, choices, summaries, vision = [], [], {}, []
    for site, cube in cubes.items():
        page = html_view(cube, metrics=metrics.get(site), **options).page
        frames.append(f'<iframe data-site="{html.escape(site)}" title="{html.escape(site)}" sandbox="allow-scripts" '
                      f'srcdoc="{html.escape(page, quote=True)}"></iframe>')
        choices.append(f'<option value="{html.escape(site)}">{html.escape(site)}</option>')
        summaries[site] = f"{cube.spec.summary}; " + " x ".join(map(str, cube.pattern.shape[-2:])) + " per head"
        if site == "vision" or (cube.key_axis is not None and cube.key_axis.kind == "patches"):
            vision.append(site)
    picture = ""
    for number, one in enumerate([] if image is None else image if isinstance(image, list) else [image]):
        import io

        buffer = io.BytesIO()
        one.convert("RGB").save(buffer, format="PNG")
        alt = "the input image" if not isinstance(image, list) else f"input image {number}"
        picture += f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
    first = next(iter(cubes.values()))
    heading = title or f"{model_name(first.source)} · {len(cubes)} attention site" + ("s" if len(cubes) > 1 else "")
    page = _page(heading, "sites", HEADING=html.escape(heading), OPTIONS="".join(choices), FRAMES="".join(frames),
                 IMAGE=picture, META=_script_json({"sites": list(cubes), "summaries": summaries, "vision": vision}))
    return HtmlView(page, height=900)


def _page(title: str, name: str, **data: str) -> str:
    """Page `name` of viz/assets/ (`name`.html, .css, .js) inside the shared shell (page.html, theme.css),
    with the title and the `data` slots of its body filled."""
    template = _fill(_asset("page.html"), {"STYLE": _asset("theme.css") + _asset(f"{name}.css"),
                                           "BODY": _asset(f"{name}.html"), "SCRIPT": _asset(f"{name}.js")})
    return _fill(template, {"TITLE": html.escape(title).replace("/", "&#47;"), **data})


# ---- data ------------------------------------------------------------------------------
def _axis_labels(cube) -> tuple[list[dict], list[dict]]:
    """Label of every query row and key column: `{"t": token as shown (`labels.token_text`), "r": raw token,
    "p": [first, last position], "g": generated}`; a pooled entry shows the token of its first position
    followed by "…"."""
    keys, queries = cube.key_spans(), cube.query_spans()
    generated = cube.generated.tolist() if cube.generated is not None else [False] * cube.num_keys

    def label(first: int, last: int, key: int) -> dict:
        raw = str(cube.tokens[key]) if key < len(cube.tokens) else f"#{first}"
        return {"t": token_text(raw) + ("…" if last > first else ""), "r": raw, "p": [first, last],
                "g": bool(generated[key])}

    cols = [label(a, b, k) for k, (a, b) in enumerate(zip(keys.first.tolist(), keys.last.tolist()))]
    home = (torch.searchsorted(keys.first, queries.first, right=True) - 1).clamp(0, cube.num_keys - 1).tolist()
    if cube.query_tokens is not None:  # cross-attention: the rows are the target's own tokens
        rows = [{"t": token_text(str(t)), "r": str(t), "p": [q, q], "g": False} for q, t in enumerate(cube.query_tokens)]
    else:
        rows = [label(a, b, k) for k, a, b in zip(home, queries.first.tolist(), queries.last.tolist())]
    return rows, cols


def _all_ranges(pattern: torch.Tensor, norms: torch.Tensor | None, mask: torch.Tensor, sink_column: int) -> dict:
    """`_ranges` for each first-token handling, of the weights and (with value norms) of the norm-weighted pattern."""
    patterns = {"weights": pattern.numpy()}
    if norms is not None:
        patterns["norms"] = (pattern * norms[:, :, None, :]).numpy()
    return {weighting: {sink: _ranges(values, mask.numpy(), sink_column, sink) for sink in ("keep", "exclude")}
            for weighting, values in patterns.items()}


def _qk_payload(maps, cube) -> dict | None:
    """Points of each (layer, KV group) map as base64 float32 `"n 2"`, queries head by head (the cube's
    query rows in order), then the keys."""
    if not maps:
        return None
    payload = {}
    for qk in maps:
        if qk.layer not in cube.layers:
            continue
        payload[f"{qk.layer},{qk.group}"] = {
            "heads": [int(h) for h in qk.heads], "method": qk.method,
            "explained": None if qk.explained is None else [float(x) for x in qk.explained],
            "positions": [int(p) for p in qk.position.tolist()], "keys": int(qk.is_key.sum()),
            "points": base64.b64encode(qk.points.float().numpy().astype("<f4").tobytes()).decode("ascii"),
        }
    return payload


def _ranges(pattern: np.ndarray, mask: np.ndarray, sink_column: int, sink: str) -> dict:
    """Per head (row-major `"l h"`): the largest and the smallest positive weight of the cells that set
    an automatic colour range under `sink` (None where a head has none)."""
    in_range, _ = range_and_grey(np.broadcast_to(mask[:, None], pattern.shape), sink_column, sink)
    high = np.where(in_range, pattern, -np.inf).max(axis=(-2, -1)).reshape(-1)
    low = np.where(in_range & (pattern > 0), pattern, np.inf).min(axis=(-2, -1)).reshape(-1)
    as_list = lambda values: [float(v) if np.isfinite(v) else None for v in values]  # noqa: E731
    return {"high": as_list(high), "low": as_list(low)}


def _quantize(pattern: torch.Tensor, mask: torch.Tensor, bits: int, signed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Attendable cells of every head as unsigned ints scaled to the head's maximum (`signed`: to its
    largest |value|, with 0 in the middle of the levels)."""
    full = mask[:, None].expand_as(pattern)
    kept = (pattern if signed else pattern.clamp(min=0)).where(full, torch.zeros(()))
    scales = kept.abs().amax(dim=(-2, -1))
    scales = torch.where(scales > 0, scales, torch.ones(()))
    top = 2**bits - 1
    unit = kept / scales[..., None, None]
    levels = torch.round(((unit + 1) / 2 if signed else unit) * top).masked_select(full)
    dtype = np.uint8 if bits == 8 else np.dtype("<u2")
    return levels.numpy().astype(dtype), scales.numpy()


def _difference_prompts(cube) -> str:
    """The prompt line of a difference cube: which prompt is B and which is A."""
    meta = cube.metadata or {}
    return f'B − A · B: "{meta.get("prompt_b") or "?"}" · A: "{meta.get("prompt_a") or "?"}"'


def _colour_tables(cmap: str, offered=PAGE_CMAPS) -> dict[str, str]:
    """base64 of 256 RGB triples per colormap: `cmap`, then the others `offered`."""
    names = [cmap, *(name for name in offered if name != cmap)]
    tables = {}
    for name in names:
        rgb = np.ascontiguousarray(colormap_bytes(name)[:, :3])
        tables[name] = base64.b64encode(rgb.tobytes()).decode("ascii")
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
