"""The all-heads grid: every layer x head panel composed as ONE raster, labelled around it.

`plot_grid` lays `"l h q k -> (l q) (h k)"` out with gutters (wider, with a rule, between KV
groups), colours it through a 256-entry lookup table, repeats each token cell `cell_px` times
(nearest, so cells stay crisp squares) and places it on a matplotlib Figure with `figimage` at
exact pixel size. Matplotlib draws only the text: title, layer and head labels, key-token labels
and the colorbar. `save_grid` writes PNG by pasting that raster into the rendered label canvas and
encoding once; SVG/PDF get one embedded image per panel for grids small enough to stay editable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from llm_heatmap.errors import InputError

from .labels import block_size, fit_text, text_size, token_label
from .png import encode_png
from .style import GridStyle, style_of
from .raster import (BACKGROUND, MASKED, area_downsample, check_scale, ColorScale, compose, lookup_table,
                     lut_index, normalise, normalise_difference)

DPI = 100
DEFAULT_LONG_SIDE = 2400  # default canvas: cells sized so the grid's long side is about this many pixels
MIN_PANEL_PX = 40
VECTOR_MAX_CELLS = 1_000_000  # SVG/PDF embed every token cell; above this the file stops being editable
MIN_LABEL_PX = 8
PAD_FRACTION = 0.6  # margins, in label heights


@dataclass
class GridLayout:
    """Where everything landed, in pixels of the saved PNG (origin top-left, boxes `(x0, y0, x1, y1)`, end exclusive).

    `panels[(layer, head)]` is the box of that head's panel (model layer and head indices);
    `panel_shape` the `(rows, keys)` cells per panel after any downsampling, each `cell_px` square.
    """

    width: int
    height: int
    cell_px: int
    gutter: int
    grid_box: tuple[int, int, int, int]
    panels: dict = field(default_factory=dict)
    panel_shape: tuple[int, int] = (0, 0)
    layers: tuple[int, ...] = ()
    heads: tuple[int, ...] = ()
    downsampled: bool = False
    token_labels: bool = False
    kv_separators: bool = False
    color: ColorScale | None = None
    label_px: float = 0.0
    title_px: float = 0.0
    colorbar_box: tuple[int, int, int, int] | None = None
    path: Path | None = None

    def panel(self, layer: int, head: int) -> tuple[int, int, int, int]:
        return self.panels[(layer, head)]


# ---- data -----------------------------------------------------------------------------------

def _pooled(cube) -> dict | None:
    """The bin record of a cube area-pooled by probes' `Downsampler` (None for a full-resolution cube)."""
    return (cube.metadata or {}).get("downsample")


def _attendable(cube) -> np.ndarray:
    """bool `"l q k"`. For a pooled cube a cell counts when any of its rows may attend any of its keys:
    its keys are real and, causally, the key bin starts at or before the query bin's last row."""
    pooled = _pooled(cube)
    if pooled is None:
        return cube.attendable().cpu().numpy()
    key_start = np.asarray(pooled["key_bins"][:-1])
    row_end = np.asarray(pooled["query_bins"][1:]) - 1
    # query bins are rows of the kept queries; their positions run from query_positions' offset
    offset = int(cube.query_positions[0]) - (int(pooled["query_bins"][0]) + int(pooled["query_bins"][1]) - 1) // 2
    keep = np.broadcast_to(cube.key_mask.cpu().numpy().astype(bool), (len(row_end), len(key_start)))
    if cube.spec.causal:
        keep = keep & (key_start[None, :] <= (row_end + offset)[:, None])
    return np.broadcast_to(keep, (cube.num_layers,) + keep.shape)


def _prepare(cube, *, scale, gamma, vmin, vmax, per_head_range, sink, max_tokens, hide_unattendable,
             subtract=None):
    """Cube (minus `subtract`, for a difference grid) -> (LUT index `"l h q k"`, ColorScale, downsampled?)."""
    if cube.num_layers == 0 or cube.num_heads == 0 or cube.num_keys == 0:
        raise InputError("the cube has no layers, heads or tokens to draw; capture a non-empty prompt.")
    values = cube.pattern.detach().float().cpu().numpy()
    drawn = _attendable(cube)[:, None] if hide_unattendable else np.ones((1, 1) + values.shape[-2:], bool)
    if subtract is not None:
        values = values - subtract.pattern.detach().float().cpu().numpy()
        if hide_unattendable:
            drawn = drawn & _attendable(subtract)[:, None]
    drawn = np.broadcast_to(drawn, values.shape)
    first_key = int(np.argmax(cube.key_mask.cpu().numpy())) if cube.key_mask.any() else 0
    sink_column = np.zeros(values.shape[-1], dtype=bool)
    if sink != "keep":
        sink_column[first_key] = True
    masked = np.broadcast_to(sink_column, values.shape) if sink == "mask" else np.zeros(values.shape, bool)
    in_range = drawn & ~np.broadcast_to(sink_column, values.shape)
    downsampled = max(values.shape[-2:]) > max_tokens or _pooled(cube) is not None
    if downsampled:
        stack = np.stack([drawn, in_range, masked])
        values, kept = area_downsample(values, np.broadcast_to(stack, (3,) + values.shape), max_tokens)
        drawn, in_range, masked = kept
        masked = masked & ~in_range  # a bin that mixes the sink with other keys stays coloured
    if subtract is not None:
        normalised, color = normalise_difference(values, in_range, vmax=vmax, per_head=per_head_range)
    else:
        if scale == "auto":  # long prompts: a few near-1 cells and ~1/T elsewhere, which only a log scale shows
            scale = "log" if downsampled else "linear"
        normalised, color = normalise(values, in_range, scale=scale, gamma=gamma, vmin=vmin, vmax=vmax,
                                      per_head=per_head_range)
    index = lut_index(normalised)
    index[~drawn] = BACKGROUND
    index[masked & drawn] = MASKED
    return index, color, downsampled


# ---- geometry -------------------------------------------------------------------------------

def _groups(cube) -> list[int]:
    return cube.kv_groups.tolist()


def _has_groups(groups) -> bool:
    return any(a == b for a, b in zip(groups, groups[1:]))


def _axis_map(n_panels, cells, c, gutter, boundaries, sep_width):
    """Pixel -> source index along one axis: panel cells repeated `c` times, gutters -1, separators -2.

    Returns (map, panel start offsets).
    """
    pieces, starts, pos = [], [], 0
    wide = 3 * gutter
    for p in range(n_panels):
        if p:
            if boundaries[p - 1]:
                before = (wide - sep_width) // 2
                gap = np.r_[np.full(before, -1), np.full(sep_width, -2), np.full(wide - before - sep_width, -1)]
            else:
                gap = np.full(gutter, -1)
            pieces.append(gap)
            pos += len(gap)
        starts.append(pos)
        pieces.append(np.repeat(np.arange(p * cells, (p + 1) * cells), c))
        pos += cells * c
    return np.concatenate(pieces).astype(np.int64), starts


@dataclass
class _Plan:
    c: int
    gutter: int
    sep_width: int
    cols: np.ndarray
    rows: np.ndarray
    col_starts: list
    row_starts: list
    label_px: float
    title_px: float
    head_labels: list  # (panel index, text)
    layer_labels: list
    head_block: tuple
    layer_width: float
    token_px: float
    token_width: float
    cbar_width: float
    grid_w: int
    grid_h: int
    natural_w: int
    natural_h: int
    pad: int
    title_h: float


def _label_px(pitch, grid_w):
    return float(np.clip(round(max(0.14 * pitch, grid_w / 140)), 10, 44))


def _thin(count, needed, pitch):
    step = 1
    while step < count and needed > step * pitch:
        step += 1
    return step


def _plan(cube, nq, nk, c, *, show_tokens, n_title_lines, colorbar_label, extra_width=0) -> _Plan:
    L, H = cube.num_layers, cube.num_heads
    groups = _groups(cube)
    separators = _has_groups(groups)
    boundaries = [separators and a != b for a, b in zip(groups, groups[1:])]
    gutter = int(np.clip(round(0.06 * min(nq, nk) * c), 2, 16))
    sep_width = max(1, round(gutter * 0.4))
    cols, col_starts = _axis_map(H, nk, c, gutter, boundaries, sep_width)
    rows, row_starts = _axis_map(L, nq, c, gutter, [False] * (L - 1), sep_width)
    grid_w, grid_h = len(cols), len(rows)
    pitch_x, pitch_y = nk * c + gutter, nq * c + gutter
    label_px = _label_px(min(pitch_x, pitch_y), grid_w)

    # head labels: one line, else two, else smaller, else every n-th head
    texts = [f"H{h} / KV{g}" if separators else f"H{h}" for h, g in zip(cube.heads, groups)]
    px = label_px
    while True:
        one = max(text_size(t, px)[0] for t in texts)
        two = max(block_size(t.replace(" / ", "\n"), px)[0] for t in texts)
        if one <= 0.9 * pitch_x:
            break
        if two <= 0.9 * pitch_x:
            texts = [t.replace(" / ", "\n") for t in texts]
            break
        if px <= MIN_LABEL_PX:
            texts = [t.replace(" / ", "\n") for t in texts]
            break
        px = max(MIN_LABEL_PX, px - 1)
    head_px = px
    widest = max(block_size(t, head_px)[0] for t in texts)
    step = _thin(H, widest * 1.15, pitch_x)
    head_labels = [(i, t) for i, t in enumerate(texts) if i % step == 0]
    head_block = (head_px, max(block_size(t, head_px)[1] for t in texts))

    layer_px = min(label_px, max(MIN_LABEL_PX, 0.8 * pitch_y / 1.2))
    step = _thin(L, layer_px * 1.3, pitch_y)
    layer_labels = [(i, f"L{layer}") for i, layer in enumerate(cube.layers) if i % step == 0]
    layer_width = max(text_size(t, layer_px)[0] for _, t in layer_labels)

    token_px, token_width = 0.0, 0.0
    if show_tokens:
        token_px = min(label_px, 0.7 * c)
        if token_px >= MIN_LABEL_PX:
            token_width = max(text_size(token_label(t), token_px)[0] for t in cube.tokens)
        else:
            token_px = 0.0

    pad = int(round(label_px * PAD_FRACTION)) + 2
    title_px = round(label_px * 1.3)
    title_h = n_title_lines * title_px * 1.35
    tick_px = label_px * 0.9
    cbar_width = (label_px + max(10, label_px) + 0.5 * label_px + text_size("0.0000", tick_px)[0]
                  + 0.6 * label_px + label_px * 1.3)
    natural_w = int(np.ceil(pad + layer_width + pad + grid_w + cbar_width + pad)) + extra_width
    natural_w = max(natural_w, 480)
    natural_h = int(np.ceil(pad + title_h + pad + head_block[1] + 0.4 * label_px + grid_h
                            + (0.4 * label_px + token_width if token_px else 0) + pad))
    return _Plan(c, gutter, sep_width, cols, rows, col_starts, row_starts, label_px, title_px, head_labels,
                 layer_labels, head_block, layer_width, token_px, token_width, cbar_width, grid_w, grid_h,
                 natural_w, natural_h, pad, title_h)


def _fit_cells(cube, nq, nk, cell_px, size, **plan_options) -> tuple[_Plan, int, int]:
    """Choose cell size (and panel downsampling) for `cell_px` or a target `size`; returns (plan, nq, nk)."""
    L, H = cube.num_layers, cube.num_heads
    if cell_px is not None:
        if int(cell_px) != cell_px or cell_px < 1:
            raise InputError(f"cell_px {cell_px} must be a positive integer (pixels per token cell).")
        return _plan(cube, nq, nk, int(cell_px), **plan_options), nq, nk
    if size is None:
        c = max(1, DEFAULT_LONG_SIDE // max(L * nq, H * nk))
        if c * max(nq, nk) < MIN_PANEL_PX:
            c = int(np.ceil(MIN_PANEL_PX / max(nq, nk)))
        return _plan(cube, nq, nk, min(c, 32), **plan_options), nq, nk
    width, height = (size, None) if np.isscalar(size) else size
    c = max(1, int(width) // (H * nk))
    while True:
        plan = _plan(cube, nq, nk, c, **plan_options)
        if plan.natural_w <= width and (height is None or plan.natural_h <= height):
            return plan, nq, nk
        if c > 1:
            c -= 1
            continue
        # one pixel per cell is still too big: shrink the panels by the overflow
        over_x = plan.natural_w / width
        over_y = plan.natural_h / height if height else 1.0
        shrink = max(over_x, over_y) * 1.02
        new_nq, new_nk = max(1, int(nq / shrink)), max(1, int(nk / shrink))
        if (new_nq, new_nk) == (nq, nk) or min(new_nq, new_nk) < 2:
            raise InputError(f"size {size} is too small for {L} x {H} heads with their labels; "
                             "ask for a larger size or fewer layers/heads.")
        nq, nk = new_nq, new_nk


# ---- figure ---------------------------------------------------------------------------------

def _prompt_text(cube) -> str:
    prompt = cube.prompt if isinstance(cube.prompt, str) else None
    if prompt is None and cube.tokens:
        prompt = " ".join(str(t) for t in cube.tokens)
    return " ".join((prompt or "").split())


def _title_lines(cube, title, scale_text, width, px, subtract=None):
    spec = cube.spec
    head = title if title is not None else " · ".join(x for x in (cube.source, spec.summary) if x)
    suffix = f" · {(_pooled(cube) or {}).get('num_keys', cube.num_keys)} tokens · {scale_text}"
    if subtract is None:
        room = width - text_size(suffix, px)[0] - text_size('""', px)[0]
        prompt_line = f'"{fit_text(_prompt_text(cube), px, max(room, 40))}"{suffix}'
    else:
        room = (width - text_size(suffix, px)[0] - text_size('A: "" − B: ""', px)[0]) / 2
        a, b = (fit_text(_prompt_text(c), px, max(room, 40)) for c in (cube, subtract))
        prompt_line = f'A: "{a}" − B: "{b}"{suffix}'
    return [fit_text(head, px * 1.1, width), fit_text(prompt_line, px, width)]


def _scale_text(color: ColorScale, sink: str, downsampled: bool, shape) -> str:
    parts = [{"power": f"power {color.gamma:g}", "difference": "A − B, symmetric range"}.get(color.scale, color.scale)]
    if color.per_head:
        parts.append("range per head")
    if sink == "exclude":
        parts.append("first token left out of the range")
    elif sink == "mask":
        parts.append("first token masked (grey)")
    if downsampled:
        parts.append(f"heads area-downsampled to {shape[0]}x{shape[1]}")
    return ", ".join(parts)


def _build(cube, style, *, layers=None, heads=None, title=None, vector=False, attach_image=True, subtract=None):
    scale, gamma, vmin, vmax, per_head_range, sink = (style.scale, style.gamma, style.vmin, style.vmax,
                                                      style.per_head_range, style.sink)
    background, cmap, cell_px, size, max_tokens = style.background, style.cmap, style.cell_px, style.size, style.max_tokens
    hide_unattendable = style.hide_unattendable
    cube = cube.one_sequence()
    if layers is not None or heads is not None:
        cube = cube.select(layers=layers, heads=heads)
    if subtract is not None:
        subtract = subtract.one_sequence()
        if layers is not None or heads is not None:
            subtract = subtract.select(layers=layers, heads=heads)
        if subtract.pattern.shape != cube.pattern.shape:
            raise InputError(f"prompts A and B give cubes of shapes {tuple(cube.pattern.shape)} and "
                             f"{tuple(subtract.pattern.shape)}; compare prompts with the same number of tokens "
                             "(and the same layers/heads).")
    limit = max_tokens
    nq, nk = min(cube.num_queries, limit), min(cube.num_keys, limit)
    labels_ok = cube.num_keys <= limit and isinstance(cube.tokens, list) and len(cube.tokens) == cube.num_keys
    labels_ok = labels_ok and (subtract is None or list(subtract.tokens) == list(cube.tokens)) and not _pooled(cube)
    options = dict(show_tokens=labels_ok, n_title_lines=2, colorbar_label="")
    plan, nq, nk = _fit_cells(cube, nq, nk, cell_px, size, **options)
    if labels_ok and (nq, nk) != (cube.num_queries, cube.num_keys):
        options["show_tokens"] = False
        plan, nq, nk = _fit_cells(cube, nq, nk, cell_px, size, **options)
    index, color, downsampled = _prepare(
        cube, subtract=subtract, scale=scale, gamma=gamma, vmin=vmin, vmax=vmax, per_head_range=per_head_range,
        sink=sink, max_tokens=max(nq, nk) if (nq, nk) != (cube.num_queries, cube.num_keys) else limit,
        hide_unattendable=hide_unattendable)
    if index.shape[-2:] != (nq, nk):  # unequal axes: downsample shrinks both to the larger bound
        nq, nk = index.shape[-2:]
        plan = _plan(cube, nq, nk, plan.c, **options)

    width = plan.natural_w if size is None else int(size if np.isscalar(size) else size[0])
    height = plan.natural_h if (size is None or np.isscalar(size)) else int(size[1])
    extra_x = (width - plan.natural_w) // 2
    extra_y = (height - plan.natural_h) // 2
    gx0 = extra_x + plan.pad + int(np.ceil(plan.layer_width)) + plan.pad
    gy0 = int(np.ceil(extra_y + plan.pad + plan.title_h + plan.pad + plan.head_block[1] + 0.4 * plan.label_px))
    gx1, gy1 = gx0 + plan.grid_w, gy0 + plan.grid_h

    bg = (255, 255, 255, 255) if background == "white" else (255, 255, 255, 0)
    facecolor = "white" if background == "white" else "none"
    fig = Figure(figsize=((width + 0.25) / DPI, (height + 0.25) / DPI), dpi=DPI, facecolor=facecolor)
    FigureCanvasAgg(fig)
    table = lookup_table(cmap, bg)
    fig_w, fig_h = width + 0.25, height + 0.25

    def put(x, y, text, px, **kw):  # (x, y) in pixels from the top-left; figure fractions also hold in SVG/PDF
        return fig.text(x / fig_w, (height - y) / fig_h, text, fontsize=px * 72 / DPI, **kw)

    layout = GridLayout(width=width, height=height, cell_px=plan.c, gutter=plan.gutter,
                        grid_box=(gx0, gy0, gx1, gy1), panel_shape=(nq, nk), layers=tuple(cube.layers),
                        heads=tuple(cube.heads), downsampled=downsampled, token_labels=bool(plan.token_px),
                        kv_separators=bool((plan.cols == -2).any()), color=color, label_px=plan.label_px,
                        title_px=plan.title_px)
    for li, layer in enumerate(cube.layers):
        for hi, head in enumerate(cube.heads):
            x0, y0 = gx0 + plan.col_starts[hi], gy0 + plan.row_starts[li]
            layout.panels[(layer, head)] = (x0, y0, x0 + nk * plan.c, y0 + nq * plan.c)

    if vector:
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_axis_off()
        ax.set_xlim(0, width + 0.25)
        ax.set_ylim(height + 0.25, 0)
        native = table[index].view(np.uint8).reshape(index.shape + (4,))
        for (li, layer) in enumerate(cube.layers):
            for (hi, head) in enumerate(cube.heads):
                x0, y0, x1, y1 = layout.panels[(layer, head)]
                ax.imshow(native[li, hi], extent=(x0, x1, y1, y0), interpolation="none", aspect="auto")
        for x in np.flatnonzero(np.diff(np.r_[0, (plan.cols == -2).astype(int)]) == 1):
            ax.add_patch(Rectangle((gx0 + x, gy0), plan.sep_width, plan.grid_h, color="#606060", lw=0))
        ax.set_xlim(0, width + 0.25)
        ax.set_ylim(height + 0.25, 0)
    else:
        canvas = compose(index, table, plan.rows, plan.cols)
        if attach_image:  # save_grid pastes the raster itself; figimage would copy and re-check it
            # figimage offsets count from the bottom-left corner
            fig.figimage(canvas, xo=gx0, yo=height - gy1, origin="upper")
        fig._llm_heatmap_raster = (canvas, gx0, gy0)

    # title
    scale_text = _scale_text(color, sink, downsampled, (nq, nk))
    lines = _title_lines(cube, title, scale_text, width - 2 * plan.pad, plan.title_px, subtract)
    y = extra_y + plan.pad
    for i, line in enumerate(lines):
        px = plan.title_px * (1.1 if i == 0 else 1.0)
        put(width / 2, y, line, px, ha="center", va="top", weight="bold" if i == 0 else "normal")
        y += plan.title_px * 1.35
    # head labels above, layer labels at the left
    head_px, head_h = plan.head_block
    for hi, text in plan.head_labels:
        x0, _, x1, _ = layout.panels[(cube.layers[0], cube.heads[hi])]
        put((x0 + x1) / 2, gy0 - 0.3 * plan.label_px, text, head_px, ha="center", va="bottom",
            multialignment="center", linespacing=1.05)
    layer_px = min(plan.label_px, max(MIN_LABEL_PX, 0.8 * (nq * plan.c + plan.gutter) / 1.2))
    for li, text in plan.layer_labels:
        _, y0, _, y1 = layout.panels[(cube.layers[li], cube.heads[0])]
        put(gx0 - plan.pad, (y0 + y1) / 2, text, layer_px, ha="right", va="center")
    # key tokens under the bottom row
    if plan.token_px:
        for hi, head in enumerate(cube.heads):
            x0, _, _, y1 = layout.panels[(cube.layers[-1], head)]
            for k, token in enumerate(cube.tokens):
                put(x0 + (k + 0.5) * plan.c, y1 + 0.3 * plan.label_px, token_label(token), plan.token_px,
                    ha="center", va="top", rotation=90)
    # colorbar beside the grid
    cbar_h = plan.grid_h if plan.grid_h <= 1200 else max(1200, plan.grid_h // 2)
    cbar_w = max(10, plan.label_px)
    cx0 = gx1 + plan.label_px
    layout.colorbar_box = (int(cx0), gy0, int(cx0 + cbar_w), gy0 + cbar_h)
    fw, fh = fig.bbox.width, fig.bbox.height
    cax = fig.add_axes((cx0 / fw, (height - gy0 - cbar_h) / fh, cbar_w / fw, cbar_h / fh))
    from matplotlib.cm import ScalarMappable
    from .raster import get_cmap
    bar = fig.colorbar(ScalarMappable(norm=color.norm(), cmap=get_cmap(cmap)), cax=cax)
    tick_pt = plan.label_px * 0.9 * 72 / DPI
    bar.ax.tick_params(labelsize=tick_pt, length=plan.label_px * 0.4 * 72 / DPI, width=max(0.5, plan.label_px / 20))
    bar.outline.set_linewidth(max(0.5, plan.label_px / 20))
    label = color.label()
    label_pt = plan.label_px * 72 / DPI
    while text_size(label, label_pt * DPI / 72)[0] > cbar_h * 0.95 and label_pt > MIN_LABEL_PX * 72 / DPI:
        label_pt -= 0.5
    bar.set_label(fit_text(label, label_pt * DPI / 72, cbar_h * 0.95), fontsize=label_pt)
    fig.grid_layout = layout
    return fig, layout


def plot_grid(cube, style: GridStyle | None = None, *, layers=None, heads=None, title=None, **style_options) -> Figure:
    """All heads of all layers as one labelled raster; the Figure is exactly the PNG's pixel size at its dpi.

    `style` (a `GridStyle`, default `GridStyle()`) says how to draw; keyword `style_options`
    override its fields (`plot_grid(cube, scale="log")`). layers/heads: model layer and head
    indices to draw. title: replaces the first title line.

    `fig.grid_layout` is the `GridLayout` (pixel boxes of every panel, the colour scale used).
    """
    fig, _ = _build(cube, style_of(style, style_options), layers=layers, heads=heads, title=title)
    return fig


def write_png(fig: Figure, path) -> None:
    """Encode a Figure made here: matplotlib renders the text, the raster is pasted in at full resolution."""
    raster = getattr(fig, "_llm_heatmap_raster", None)
    if raster is None:
        fig.savefig(path, dpi=fig.dpi)
        return
    canvas, x0, y0 = raster
    images = fig.images
    fig.images = []  # draw the labels only; the raster goes in as bytes, not as an artist to resample
    try:
        fig.canvas.draw()
    finally:
        fig.images = images
    buffer = np.asarray(fig.canvas.buffer_rgba())
    buffer[y0:y0 + canvas.shape[0], x0:x0 + canvas.shape[1]] = canvas
    encode_png(buffer, path, dpi=fig.dpi)


def save_grid(cube, path, style: GridStyle | None = None, *, layers=None, heads=None, title=None,
              **style_options) -> GridLayout:
    """Write `plot_grid(cube, style, ...)` to `path`: .png at any size; .svg/.pdf while the grid has at
    most `VECTOR_MAX_CELLS` token cells (each panel is embedded at one pixel per cell, text stays vector).
    Returns the `GridLayout` with `path` set."""
    return _save(cube, path, style_of(style, style_options), dict(layers=layers, heads=heads, title=title))


def plot_grid_difference(cube_a, cube_b, style: GridStyle | None = None, *, layers=None, heads=None, title=None,
                         **style_options) -> Figure:
    """The grid of `A - B` (same layers, heads and token count) on a diverging colormap (default RdBu_r)
    with a symmetric range (`vmax` bounds |A - B|; `per_head_range` gives each head its own bound).
    Other options as `plot_grid` (scale/gamma do not apply)."""
    style = style_of(style, {"cmap": "RdBu_r", **style_options})
    fig, _ = _build(cube_a, style, subtract=cube_b, layers=layers, heads=heads, title=title)
    return fig


def save_grid_difference(cube_a, cube_b, path, style: GridStyle | None = None, *, layers=None, heads=None,
                         title=None, **style_options) -> GridLayout:
    """Write `plot_grid_difference` to .png (or .svg/.pdf for small grids); returns the `GridLayout`."""
    style = style_of(style, {"cmap": "RdBu_r", **style_options})
    return _save(cube_a, path, style, dict(layers=layers, heads=heads, title=title, subtract=cube_b))


def _save(cube, path, style, options) -> GridLayout:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg", ".pdf"):
        raise InputError(f"output {path} has an unknown extension; use .png, .svg or .pdf.")
    if suffix == ".png":
        fig, layout = _build(cube, style, attach_image=False, **options)
        write_png(fig, path)
    else:
        probe = cube.one_sequence()
        if options.get("layers") is not None or options.get("heads") is not None:
            probe = probe.select(layers=options.get("layers"), heads=options.get("heads"))
        limit = style.max_tokens
        cells = probe.num_layers * probe.num_heads * min(probe.num_queries, limit) * min(probe.num_keys, limit)
        if cells > VECTOR_MAX_CELLS:
            raise InputError(f"{suffix[1:].upper()} output of this grid would embed {cells:,} token cells "
                             f"(limit {VECTOR_MAX_CELLS:,}); write a .png instead, or pass fewer layers/heads "
                             "or a smaller max_tokens.")
        fig, layout = _build(cube, style, vector=True, **options)
        fig.savefig(path, dpi=DPI, format=suffix[1:])
    layout.path = path
    return layout
