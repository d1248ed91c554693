"""The all-heads grid: every layer x head panel composed as ONE raster, labelled around it.

`plot_grid` lays `"l h q k -> (l q) (h k)"` out with gutters (wider, with a rule, between KV
groups), colours it through a 256-entry lookup table and repeats each token cell `cell_px` times
(nearest, so cells stay crisp squares). Matplotlib draws only the text: title, layer and head
labels, key-token labels and the colorbar. Drawing goes in steps: choose the cells and pixel plan
(`grid_layout`), colour the cells (`raster`), place the figure, then title, labels and colorbar.
Long prompts are area-pooled by `probes.stream.downsample` first, and which cells are drawn at
all is `cube.attendable()`, the geometry every other view and metric uses.

PNG output pastes the raster into the rendered labels and encodes once (`png.py`); SVG/PDF get
one embedded image per panel, for grids small enough to stay editable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import LogFormatterSciNotation, LogLocator

from llm_heatmap.errors import InputError
from llm_heatmap.models.files import atomic_output
from llm_heatmap.models.sites import DECODER
from llm_heatmap.probes.stream import downsample

from .grid_layout import MIN_LABEL_PX, Plan, axis_map, fit_cells, panels_px, plan_grid, start_cell_px
from .labels import drawable, fit_text, model_name, positions_text, prompt_text, text_size, token_label, token_text
from .png import png_bytes
from .raster import (BACKGROUND, MASKED, QUANTITIES, ColorScale, compose, get_cmap, lookup_table, lut_index, normalise,
                     normalise_difference, range_and_grey)
from .saving import save_deterministic
from .style import GridStyle, style_of

DPI = 100
CANVAS_COPIES = 3  # RGBA: the composed raster, matplotlib's canvas and the PNG encoder's rows
CELL_BYTES = 16  # per token cell drawn: its values, normalised values, colour index and masks
VECTOR_MAX_CELLS = 1_000_000  # SVG/PDF embed every token cell; above this the file stops being editable
TITLE_LINE = 1.35  # title line pitch, in title font sizes


@dataclass
class GridLayout:
    """Where everything landed, in pixels of the saved PNG (origin top-left, boxes `(x0, y0, x1, y1)`, end exclusive).

    `panels[(layer, head)]` is the box of that head's panel (model layer and head indices);
    `panel_shape` the `(rows, keys)` cells per panel after any downsampling, each `cell_px` square;
    `title_lines` the title as drawn, centred in the image.
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
    title_lines: list = field(default_factory=list)
    colorbar_box: tuple[int, int, int, int] | None = None
    path: Path | None = None

    def panel(self, layer: int, head: int) -> tuple[int, int, int, int]:
        return self.panels[(layer, head)]


@dataclass
class DrawnGrid:
    """A drawn grid: the matplotlib `figure` (labels, and the panels as a figure image unless they are
    vector artists), the `raster` of the panel area (RGBA, placed at `layout.grid_box`) and the `layout`.
    It displays itself in notebooks."""

    figure: Figure
    layout: GridLayout
    raster: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"DrawnGrid({self.layout.width} x {self.layout.height} px; .save(path) writes it, a notebook shows it)"

    def png(self) -> bytes:
        """The PNG file: matplotlib renders the labels, the raster is pasted in at full resolution."""
        if self.raster is None:
            raise InputError("this grid was drawn with vector panels; save it as .svg or .pdf.")
        images, self.figure.images = self.figure.images, []  # labels only: the raster goes in as bytes
        try:
            self.figure.canvas.draw()
        finally:
            self.figure.images = images
        buffer = np.asarray(self.figure.canvas.buffer_rgba())
        x0, y0 = self.layout.grid_box[:2]
        buffer[y0:y0 + self.raster.shape[0], x0:x0 + self.raster.shape[1]] = self.raster
        return png_bytes(buffer, dpi=self.figure.dpi)

    def save(self, path) -> GridLayout:
        """Write .png (any size) or, for a grid drawn with vector panels, .svg / .pdf (complete or not at all)."""
        path = Path(path)
        with atomic_output(path, force=True) as temp:
            if path.suffix.lower() == ".png" and self.raster is not None:
                temp.write_bytes(self.png())
            else:
                save_deterministic(self.figure, temp, DPI)
        self.layout.path = path
        return self.layout

    def _repr_png_(self) -> bytes:
        return self.png()



# ---- public API -----------------------------------------------------------------------------

def plot_grid(cube, style: GridStyle | None = None, *, layers=None, heads=None, title=None,
              **style_options) -> DrawnGrid:
    """All heads of all layers as one labelled raster, exactly the PNG's pixel size at `DPI`.

    `style` (a `GridStyle`, default `GridStyle()`) says how to draw; keyword `style_options`
    override its fields (`plot_grid(cube, scale="log")`). layers/heads: model layer and head
    indices to draw. title: replaces the first title line.
    """
    return _draw(cube, style_of(style, style_options), layers=layers, heads=heads, title=title)


def save_grid(cube, path, style: GridStyle | None = None, *, layers=None, heads=None, title=None,
              **style_options) -> GridLayout:
    """Write `plot_grid(cube, style, ...)` to `path`: .png at any size; .svg/.pdf while the grid has at
    most `VECTOR_MAX_CELLS` token cells (each panel is embedded at one pixel per cell, text stays vector).
    Returns the `GridLayout` with `path` set."""
    return _save(cube, path, style_of(style, style_options), dict(layers=layers, heads=heads, title=title))


def plot_grid_difference(cube_a, cube_b, style: GridStyle | None = None, *, layers=None, heads=None, title=None,
                         **style_options) -> DrawnGrid:
    """The grid of `B - A` (same layers, heads and token count; the sign `compare` reports) on a diverging
    colormap (default RdBu_r: red where B attends more) with a symmetric range (`vmax` bounds |B - A|;
    `per_head_range` gives each head its own bound). Other options as `plot_grid` (scale/gamma do not
    apply). A difference cube (`cube.difference`, e.g. from `compare`) draws the same way through `plot_grid`."""
    return _draw(cube_b, style_of(style, style_options), subtract=cube_a, layers=layers, heads=heads, title=title)


def save_grid_difference(cube_a, cube_b, path, style: GridStyle | None = None, *, layers=None, heads=None,
                         title=None, **style_options) -> GridLayout:
    """Write `plot_grid_difference` (B - A) to .png (or .svg/.pdf for small grids); returns the `GridLayout`."""
    return _save(cube_b, path, style_of(style, style_options), dict(layers=layers, heads=heads, title=title,
                                                                    subtract=cube_a))


def _save(cube, path, style: GridStyle, options: dict) -> GridLayout:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg", ".pdf"):
        raise InputError(f"output {path} has an unknown extension; use .png, .svg or .pdf.")
    if suffix == ".png":
        return _draw(cube, style, panels="raster", **options).save(path)
    selected, _ = _selected(cube, None, options["layers"], options["heads"])
    cells = (selected.num_layers * selected.num_heads * min(selected.num_queries, style.max_tokens)
             * min(selected.num_keys, style.max_tokens))
    if cells > VECTOR_MAX_CELLS:
        raise InputError(f"{suffix[1:].upper()} output of this grid would embed {cells:,} token cells "
                         f"(limit {VECTOR_MAX_CELLS:,}); write a .png instead, or pass fewer layers/heads "
                         "or a smaller max_tokens.")
    return _draw(cube, style, panels="vector", **options).save(path)


def grid_thumbnail(cube, style: GridStyle | None = None, *, width: int = 420, height: int = 640,
                   **style_options) -> bytes:
    """A PNG of every panel and nothing else (no labels) within `width` x `height` pixels, for summaries
    such as a cube's notebook display. Colours as the full-size grid's (a prompt pooled only to fit the
    thumbnail keeps the full grid's scale)."""
    style = style_of(style, style_options)
    cube, _ = _selected(cube, None, None, None)
    style = style.signed(cube.difference).but(scale=style.resolved_scale(cube.pooling is not None or cube.num_keys > style.max_tokens))
    layers, heads = cube.num_layers, cube.num_heads
    cells = max(2, min(style.max_tokens, (height - layers + 1) // layers, (width - heads + 1) // heads))
    index = _cells(cube, None, style, cells)[0]
    nq, nk = index.shape[-2:]
    c = max(1, min((height - layers + 1) // (layers * nq), (width - heads + 1) // (heads * nk)))
    rows, _ = axis_map(layers, nq, c, 1, [False] * layers, 1)
    cols, _ = axis_map(heads, nk, c, 1, [False] * heads, 1)
    background = (255, 255, 255, 255) if style.background == "white" else (255, 255, 255, 0)
    return png_bytes(compose(index, lookup_table(style.cmap, background), rows, cols))


# ---- steps ----------------------------------------------------------------------------------

def _selected(cube, subtract, layers, heads):
    """The cube(s) to draw: one sequence, only the chosen layers and heads."""
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
    if cube.num_layers == 0 or cube.num_heads == 0 or cube.num_keys == 0:
        raise InputError("the cube has no layers, heads or tokens to draw; capture a non-empty prompt.")
    return cube, subtract


def _cells(cube, subtract, style: GridStyle, limit: int):
    """(LUT index `"l h q k"` of every cell, the `ColorScale` used, whether the panels are pooled, what
    the cells hold), with long axes first area-pooled to at most `limit` entries. `cube - subtract`, or a
    difference cube, is drawn on a symmetric range around 0."""
    cube = downsample(style.weighted(cube), limit)
    pooled = cube.pooling is not None
    values = cube.pattern.detach().float().cpu().numpy()
    drawn = cube.attendable().numpy()[:, None] if style.hide_unattendable else np.ones((1, 1) + values.shape[-2:], bool)
    if subtract is not None:
        subtract = downsample(style.weighted(subtract), limit)
        values = values - subtract.pattern.detach().float().cpu().numpy()
        if style.hide_unattendable:
            drawn = drawn & subtract.attendable().numpy()[:, None]
    drawn = np.broadcast_to(drawn, values.shape)
    in_range, grey = range_and_grey(drawn, cube.first_key, style.sink)
    shown = drawn & ~grey
    if subtract is not None or cube.difference:
        normalised, color = normalise_difference(values, in_range, vmax=style.vmax, per_head=style.per_head_range,
                                                 shown=shown)
    else:
        normalised, color = normalise(values, in_range, scale=style.resolved_scale(pooled), gamma=style.gamma,
                                      vmin=style.vmin, vmax=style.vmax, per_head=style.per_head_range, shown=shown)
    index = lut_index(normalised)
    index[~drawn] = BACKGROUND
    index[grey] = MASKED
    return index, color, pooled, QUANTITIES[cube.weighting]


def _draw(cube, style: GridStyle, *, layers=None, heads=None, title=None, subtract=None,
          panels: str = "figimage") -> DrawnGrid:
    """`panels`: "figimage" (raster shown in the figure too), "raster" (kept beside the figure only,
    for `png()`), or "vector" (one image artist per panel, for SVG/PDF)."""
    cube, subtract = _selected(cube, subtract, layers, heads)
    style = style.signed(subtract is not None or cube.difference)
    limit = style.max_tokens
    labelled = (cube.pooling is None and cube.num_keys <= limit and len(cube.tokens) == cube.num_keys
                and (subtract is None or list(subtract.tokens) == list(cube.tokens)))
    options = dict(show_tokens=labelled, n_title_lines=2)
    nq, nk = min(cube.num_queries, limit), min(cube.num_keys, limit)
    plan, nq, nk = fit_cells(cube, nq, nk, style.cell_px, style.size, check_canvas=style.check_canvas, **options)
    if labelled and (nq, nk) != (cube.num_queries, cube.num_keys):  # a small size shrank the panels
        options["show_tokens"] = False
        plan, nq, nk = fit_cells(cube, nq, nk, style.cell_px, style.size, **options)
    pool_to = max(nq, nk) if (nq, nk) != (cube.num_queries, cube.num_keys) else limit
    index, color, pooled, quantity = _cells(cube, subtract, style, pool_to)
    if index.shape[-2:] != (nq, nk):  # unequal axes: pooling shrinks both to the larger bound
        nq, nk = index.shape[-2:]
        plan = plan_grid(cube, nq, nk, plan.c, **options)

    scale_text = _scale_text(color, style.sink, pooled, (nq, nk), quantity)
    width = _image_size(plan, style.size)[0]
    lines = _title_lines(cube, title, scale_text, width - 2 * plan.pad, plan.title_px, subtract)
    if len(lines) != options["n_title_lines"]:
        options["n_title_lines"] = len(lines)
        plan = plan_grid(cube, nq, nk, plan.c, **options)
    layout = _layout(cube, plan, style, (nq, nk), pooled, color, lines)
    style.check_canvas(layout.width, layout.height)
    figure, put = _figure(layout, style)
    raster = _draw_panels(figure, layout, plan, index, style, panels)
    _draw_title(put, layout, plan)
    _draw_axis_labels(put, layout, plan, cube)
    _draw_colorbar(figure, layout, plan, color, style, quantity)
    return DrawnGrid(figure, layout, raster)


def grid_needs(num_layers: int, num_heads: int, num_tokens: int, style: GridStyle) -> dict[str, int]:
    """Bytes that drawing the grid of a cube of this shape takes besides the cube, by what takes them
    (for `probes.memory.check_fits`), after refusing a canvas above `style.max_pixels` (its panels
    alone). Known before the cube exists, so a run can be refused before it captures anything."""
    n = min(num_tokens, style.max_tokens)
    c = start_cell_px(num_layers, num_heads, n, n, style.cell_px, style.size)
    width, height = panels_px(num_layers, num_heads, n, n, c)
    if style.size is not None:
        width, height = (style.size, height) if isinstance(style.size, int) else style.size
    style.check_canvas(width, height)
    cells = num_layers * num_heads * n * n
    needs = {"drawing canvas": width * height * 4 * CANVAS_COPIES, "drawing cells": cells * CELL_BYTES}
    if num_tokens > n:  # area pooling sums whole rows into their bins first
        needs["pooling"] = num_layers * num_heads * n * num_tokens * 4
    if style.weighting == "norms":  # the norm-weighted pattern is a float32 copy of the cube
        needs["norm-weighted copy"] = num_layers * num_heads * num_tokens * num_tokens * 4
    return needs


def _image_size(plan: Plan, size) -> tuple[int, int]:
    if size is None:
        return plan.natural_w, plan.natural_h
    if isinstance(size, int):
        return size, plan.natural_h
    return int(size[0]), int(size[1])


def _layout(cube, plan: Plan, style: GridStyle, shape, pooled: bool, color, lines) -> GridLayout:
    width, height = _image_size(plan, style.size)
    extra_x, extra_y = (width - plan.natural_w) // 2, (height - plan.natural_h) // 2
    gx0 = extra_x + plan.pad + int(np.ceil(plan.layer_width)) + plan.pad + int(np.ceil(plan.query_width))
    gy0 = int(np.ceil(extra_y + plan.pad + plan.title_h + plan.pad + plan.head_block[1] + 0.4 * plan.label_px))
    layout = GridLayout(width=width, height=height, cell_px=plan.c, gutter=plan.gutter,
                        grid_box=(gx0, gy0, gx0 + plan.grid_w, gy0 + plan.grid_h), panel_shape=tuple(shape),
                        layers=tuple(cube.layers), heads=tuple(cube.heads), downsampled=pooled,
                        token_labels=bool(plan.token_px), kv_separators=bool((plan.cols == -2).any()), color=color,
                        label_px=plan.label_px, title_px=plan.title_px, title_lines=lines)
    nq, nk = shape
    for li, layer in enumerate(cube.layers):
        for hi, head in enumerate(cube.heads):
            x0, y0 = gx0 + plan.col_starts[hi], gy0 + plan.row_starts[li]
            layout.panels[(layer, head)] = (x0, y0, x0 + nk * plan.c, y0 + nq * plan.c)
    return layout


def _figure(layout: GridLayout, style: GridStyle):
    """(Figure of exactly the layout's pixel size, `put(x, y, text, px, **kw)` placing text by pixels
    from the top-left in figure fractions, which also hold in SVG/PDF)."""
    width, height = layout.width + 0.25, layout.height + 0.25
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI,
                    facecolor="white" if style.background == "white" else "none")
    FigureCanvasAgg(figure)

    def put(x, y, text, px, **kw):
        return figure.text(x / width, (layout.height - y) / height, text, fontsize=px * 72 / DPI, **kw)

    return figure, put


def _draw_panels(figure, layout: GridLayout, plan: Plan, index, style: GridStyle, panels: str):
    background = (255, 255, 255, 255) if style.background == "white" else (255, 255, 255, 0)
    table = lookup_table(style.cmap, background)
    gx0, gy0, gx1, gy1 = layout.grid_box
    if panels != "vector":
        raster = compose(index, table, plan.rows, plan.cols)
        if panels == "figimage":  # figimage offsets count from the bottom-left corner
            figure.figimage(raster, xo=gx0, yo=layout.height - gy1, origin="upper")
        return raster
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    native = table[index].view(np.uint8).reshape(index.shape + (4,))
    for (layer, head), (x0, y0, x1, y1) in layout.panels.items():
        li, hi = layout.layers.index(layer), layout.heads.index(head)
        ax.imshow(native[li, hi], extent=(x0, x1, y1, y0), interpolation="none", aspect="auto")
    for x in np.flatnonzero(np.diff(np.r_[0, (plan.cols == -2).astype(int)]) == 1):
        ax.add_patch(Rectangle((gx0 + x, gy0), plan.sep_width, plan.grid_h, color="#606060", lw=0))
    ax.set_xlim(0, layout.width + 0.25)
    ax.set_ylim(layout.height + 0.25, 0)
    return None


def _draw_title(put, layout: GridLayout, plan: Plan) -> None:
    y = (layout.height - plan.natural_h) // 2 + plan.pad
    for i, line in enumerate(layout.title_lines):
        px = plan.title_px * (1.1 if i == 0 else 1.0)
        put(layout.width / 2, y, line, px, ha="center", va="top", weight="bold" if i == 0 else "normal")
        y += plan.title_px * TITLE_LINE


def _draw_axis_labels(put, layout: GridLayout, plan: Plan, cube) -> None:
    """Head labels above the grid, layer labels at its left, key tokens under the bottom row; a cube whose
    rows are tokens of their own (cross-attention: target over source) names them left of the first head."""
    gx0, gy0 = layout.grid_box[:2]
    head_px = plan.head_block[0]
    for hi, text in plan.head_labels:
        x0, _, x1, _ = layout.panels[(cube.layers[0], cube.heads[hi])]
        put((x0 + x1) / 2, gy0 - 0.3 * plan.label_px, text, head_px, ha="center", va="bottom",
            multialignment="center", linespacing=1.05)
    nq = layout.panel_shape[0]
    layer_px = min(plan.label_px, max(MIN_LABEL_PX, 0.8 * (nq * plan.c + plan.gutter) / 1.2))
    for li, text in plan.layer_labels:
        _, y0, _, y1 = layout.panels[(cube.layers[li], cube.heads[0])]
        put(gx0 - plan.pad - plan.query_width, (y0 + y1) / 2, text, layer_px, ha="right", va="center")
    if plan.query_width:
        for layer in cube.layers:
            x0, y0, _, _ = layout.panels[(layer, cube.heads[0])]
            for q, token in enumerate(cube.query_tokens):
                put(x0 - 0.3 * plan.label_px, y0 + (q + 0.5) * plan.c, token_label(token), plan.token_px,
                    ha="right", va="center")
    if plan.token_px:
        for head in cube.heads:
            x0, _, _, y1 = layout.panels[(cube.layers[-1], head)]
            for k, token in enumerate(cube.tokens):
                put(x0 + (k + 0.5) * plan.c, y1 + 0.3 * plan.label_px, token_label(token), plan.token_px,
                    ha="center", va="top", rotation=90)


def _draw_colorbar(figure, layout: GridLayout, plan: Plan, color: ColorScale, style: GridStyle, quantity: str) -> None:
    gx1, gy0 = layout.grid_box[2], layout.grid_box[1]
    bar_h = plan.grid_h if plan.grid_h <= 1200 else max(1200, plan.grid_h // 2)
    bar_w = max(10, plan.label_px)
    x0 = gx1 + plan.label_px
    layout.colorbar_box = (int(x0), gy0, int(x0 + bar_w), gy0 + bar_h)
    fw, fh = figure.bbox.width, figure.bbox.height
    cax = figure.add_axes((x0 / fw, (layout.height - gy0 - bar_h) / fh, bar_w / fw, bar_h / fh))
    bar = figure.colorbar(ScalarMappable(norm=color.norm(), cmap=get_cmap(style.cmap)), cax=cax, extend=color.extend,
                          extendfrac=min(0.05, 2 * bar_w / bar_h))
    if color.scale == "log" and not color.per_head and bar_h / max(1.0, np.log10(color.vmax / color.vmin)) > 150:
        # a tall log bar: 1, 2 and 5 of every decade labelled, not only the decades
        bar.locator = LogLocator(base=10, subs=(1.0, 2.0, 5.0))
        bar.formatter = LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(np.inf, np.inf))
    bar.ax.tick_params(labelsize=plan.label_px * 0.9 * 72 / DPI, length=plan.label_px * 0.4 * 72 / DPI,
                       width=max(0.5, plan.label_px / 20))
    bar.outline.set_linewidth(max(0.5, plan.label_px / 20))
    label, label_px = color.label(quantity), plan.label_px
    if color.extend != "neither":
        label = f"▲ beyond range · {label}"  # first, so that a short bar cuts the quantity rather than the mark
    while text_size(label, label_px)[0] > bar_h * 0.95 and label_px > MIN_LABEL_PX:
        label_px -= 0.5 * DPI / 72
    bar.set_label(fit_text(label, label_px, bar_h * 0.95), fontsize=label_px * 72 / DPI)


# ---- title ----------------------------------------------------------------------------------

def _title_lines(cube, title, scale_text, width, px, subtract=None) -> list[str]:
    """Two lines: "model · spec" and the prompt with token count and scale; three when the prompt
    would get less than half the width beside the scale text. Every line is fitted to `width`."""
    head = drawable(title if title is not None else " · ".join(x for x in (model_name(cube.source), cube.spec.summary) if x))
    described = positions_text(cube)  # drawn as it is, not quoted as a prompt
    facts = scale_text if described else f"{cube.num_tokens} tokens · {scale_text}"
    pair = _prompt_pair(cube, subtract)
    quotes = '""' if pair is None else 'B − A · B: "" · A: ""'
    beside = width - text_size(f" · {facts}", px)[0] - text_size(quotes, px)[0]
    split = beside < width / 2
    room = (width - text_size(quotes, px)[0]) if split else beside
    if pair is None and cube.query_tokens is not None:  # cross-attention: the target reads the source
        target = drawable("".join(token_text(t) for t in cube.query_tokens).replace("␣", " "))
        source, target = (fit_text(text, px, room / 2 - text_size(' → ""', px)[0]) for text in (prompt_text(cube), target))
        prompt = f'{source} → "{target}"' if described else f'"{source}" → "{target}"'
        facts = f"{len(cube.query_tokens)} target tokens · {scale_text}" if described else \
            f"{cube.num_tokens} source x {len(cube.query_tokens)} target tokens · {scale_text}"
        if cube.spec.site == DECODER:  # a decoder's decode steps (`capture_decode_sites`) read the target so far
            facts = f"{len(cube.query_tokens)} steps over {cube.num_tokens} target tokens · {scale_text}"
    elif pair is None:
        prompt = fit_text(described, px, room) if described else f'"{fit_text(prompt_text(cube), px, room)}"'
    else:
        b, a = (fit_text(drawable(" ".join(text.split())), px, room / 2) for text in pair)
        prompt = f'B − A · B: "{b}" · A: "{a}"'
    body = [prompt, facts] if split else [f"{prompt} · {facts}"]
    return [fit_text(head, px * 1.1, width, "bold")] + [fit_text(line, px, width) for line in body]


def _prompt_pair(cube, subtract) -> tuple[str, str] | None:
    """(prompt B, prompt A) of a drawn difference, or None for a plain cube."""
    if subtract is not None:
        return prompt_text(cube), prompt_text(subtract)
    if cube.difference:
        meta = cube.metadata or {}
        return str(meta.get("prompt_b") or "?"), str(meta.get("prompt_a") or "?")
    return None


def _scale_text(color: ColorScale, sink: str, downsampled: bool, shape, quantity: str) -> str:
    parts = [{"power": f"power {color.gamma:g}", "difference": "B − A, symmetric range around 0"}.get(color.scale, color.scale)]
    if quantity != QUANTITIES["weights"]:
        parts.insert(0, f"norm-weighted {quantity}")
    if color.per_head:
        parts.append("range per head")
    if sink == "exclude":
        parts.append("first token left out of the range")
    elif sink == "mask":
        parts.append("first token masked (grey)")
    if downsampled:
        parts.append(f"heads area-downsampled to {shape[0]}x{shape[1]}")
    return ", ".join(parts)
