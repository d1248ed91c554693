"""Attention drawn over the picture: every head's map from one query as a layers x heads grid of overlays, and
the per-layer mean with the rollout after each layer as two rows.

    maps = analyses.maps.image_maps.head_image_maps(cube, "cls")
    plot_overlays(maps, picture)                          # a Figure; save_figure(fig, "overlays.png")
    plot_layer_overlays(*layer_image_maps(cube, "cls"), picture)

`picture` is the image as the model saw it (`models.processed_images.processed_pictures`: resized and
cropped by its processor), so its pixels and the patch grid line up: cell (r, c) of a `rows x cols` grid
covers pixel rows `r * H / rows` to `(r + 1) * H / rows` and the same for columns. A Qwen2-VL
language-model token covers `merge x merge` tower patches; its grid is already in those merged units, so the
same rule holds. The heat is upsampled to the panel `"nearest"` (one block per patch) or `"bilinear"`, and
laid over a dimmed copy of the picture with an opacity that grows with the value, so low attention leaves
the picture visible. Each panel is scaled to its own maximum (`scale="panel"`), or all panels share one
range (`scale="shared"`, with a colorbar); the number in a panel's corner is the attention mass that the
query puts on the image's patches (the rest goes to text, CLS, registers or other images). A query that is
itself a patch of the image has its cell framed in white.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.cm import ScalarMappable
import matplotlib.colors as mcolors
from matplotlib.figure import Figure

from llm_heatmap.errors import InputError

from .figures import DPI, _figure
from .labels import drawable, text_size, token_label
from .raster import get_cmap

UPSAMPLING = ("nearest", "bilinear")
SCALES = ("panel", "shared")
GUTTER = 6
LABEL_PX = 13


def _panel_size(picture, panel_px: int) -> tuple[int, int]:
    """(height, width) of a panel: the picture's aspect, its long side `panel_px`."""
    width, height = picture.size
    factor = panel_px / max(width, height)
    return max(1, round(height * factor)), max(1, round(width * factor))


def _base(picture, size: tuple[int, int]) -> np.ndarray:
    """The picture at panel size, float `"h w 3"` in 0-1, dimmed and half desaturated so the heat reads."""
    from PIL import Image

    rgb = np.asarray(picture.convert("RGB").resize(size[::-1], Image.Resampling.BILINEAR), dtype=np.float64) / 255
    grey = rgb.mean(-1, keepdims=True)
    return 0.85 * (0.6 * rgb + 0.4 * grey)


def upsampled(values: torch.Tensor, size: tuple[int, int], mode: str) -> np.ndarray:
    """`"... r c"` maps to `"... H W"` (NaN cells, keys no patch covers, as 0)."""
    if mode not in UPSAMPLING:
        raise InputError(f"upsample={mode!r} is not one of {', '.join(UPSAMPLING)}.")
    flat = torch.nan_to_num(values.double(), nan=0.0).reshape(-1, 1, *values.shape[-2:])
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(flat, size=size, mode=mode, **kwargs)
    return out.reshape(*values.shape[:-2], *size).numpy()


def _blend(base: np.ndarray, heat: np.ndarray, cmap, alpha: float) -> np.ndarray:
    """`heat` (0-1) coloured by `cmap` over `base`, opacity `alpha * heat ** 0.7` (faint attention still shows)."""
    colours = get_cmap(cmap)(np.clip(heat, 0, 1))[..., :3]
    weight = alpha * np.clip(heat, 0, 1)[..., None] ** 0.7
    return base * (1 - weight) + colours * weight


def _normalised(values: np.ndarray, scale: str) -> tuple[np.ndarray, float]:
    """Values over `"p H W"` panels divided by each panel's maximum, or all by the overall maximum."""
    if scale not in SCALES:
        raise InputError(f"scale={scale!r} is not one of {', '.join(SCALES)}.")
    if scale == "shared":
        top = float(values.max()) if values.size else 0.0
        return values / (top or 1.0), top
    tops = values.reshape(len(values), -1).max(-1)
    return values / np.where(tops > 0, tops, 1.0)[:, None, None], 1.0


def _canvas(panels: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """`"(rows cols) h w 3"` panels on a white canvas with gutters."""
    _, h, w, _ = panels.shape
    canvas = np.ones((rows * h + (rows - 1) * GUTTER, cols * w + (cols - 1) * GUTTER, 3))
    for index, panel in enumerate(panels):
        r, c = divmod(index, cols)
        canvas[r * (h + GUTTER): r * (h + GUTTER) + h, c * (w + GUTTER): c * (w + GUTTER) + w] = panel
    return canvas


def _draw(panels, masses, row_labels, col_labels, title_lines, cmap, shared_top) -> Figure:
    """The figure: title, column labels above, row labels left, the panels, a mass in each panel's corner."""
    rows, cols = len(row_labels), len(col_labels)
    canvas = _canvas(panels, rows, cols)
    title_lines = _wrapped(title_lines, canvas.shape[1] + 6 * LABEL_PX)
    _, h, w, _ = panels.shape
    px = LABEL_PX
    mass_px = max(8.0, min(11.0, 0.16 * min(h, w)))
    left = int(max(text_size(t, px)[0] for t in row_labels) + 2 * px)
    col_lines = max(t.count("\n") + 1 for t in col_labels)
    title_h = int(len(title_lines) * px * 1.45 + px)
    top = title_h + int(col_lines * px * 1.25 + 0.5 * px)
    bar = int(7 * px) if shared_top is not None else 0
    width = left + canvas.shape[1] + bar + px
    width = max(width, int(max(text_size(t, px, "bold")[0] for t in title_lines) + 2 * px))
    height = top + canvas.shape[0] + px
    fig = _figure(width / DPI, height / DPI)  # white, and shown as a PNG in a notebook
    axes = fig.add_axes((left / width, px / height, canvas.shape[1] / width, canvas.shape[0] / height))
    axes.imshow(canvas, interpolation="nearest", aspect="auto")
    axes.set_axis_off()
    font = px * 72 / DPI  # points for px pixels
    for line, text in enumerate(title_lines):
        fig.text(px / width, 1 - (px * 0.7 + line * px * 1.45) / height, text, fontsize=font, va="top",
                 weight="bold" if line < len(title_lines) - 1 else "normal")
    for c, text in enumerate(col_labels):
        x = left + c * (w + GUTTER) + w / 2
        fig.text(x / width, 1 - (top - 0.3 * px) / height, text, fontsize=font, ha="center", va="bottom",
                 linespacing=1.1)
    for r, text in enumerate(row_labels):
        y = top + r * (h + GUTTER) + h / 2
        fig.text((left - 0.6 * px) / width, 1 - y / height, text, fontsize=font, ha="right", va="center")
    if masses is not None and min(h, w) >= 40:
        for index, mass in enumerate(masses):
            r, c = divmod(index, cols)
            x = left + c * (w + GUTTER) + 2
            y = top + r * (h + GUTTER) + h - 2
            fig.text(x / width, 1 - y / height, f"{mass:.2f}", fontsize=mass_px * 72 / DPI, ha="left", va="bottom",
                     color="white", bbox=dict(boxstyle="square,pad=0.15", facecolor="black", alpha=0.55, linewidth=0))
    if shared_top is not None:
        bar_axes = fig.add_axes(((left + canvas.shape[1] + px) / width, px / height, px / width,
                                 min(canvas.shape[0], 240) / height))
        bar_axes.set_zorder(1)
        bar_axes.set_anchor("S")
        fig.colorbar(ScalarMappable(mcolors.Normalize(0, shared_top), get_cmap(cmap)), cax=bar_axes)
        bar_axes.tick_params(labelsize=0.85 * font)
    return fig


def _wrapped(lines: list[str], width: float) -> list[str]:
    """The first (bold) line split after its first ": " when it is wider than `width` pixels."""
    first, rest = lines[0], lines[1:]
    if ": " in first and text_size(first, LABEL_PX, "bold")[0] > width:
        head, tail = first.split(": ", 1)
        return [head + ":", tail, *rest]
    return lines


def _query_text(maps) -> str:
    grid = f"{maps.grid[0]} x {maps.grid[1]} patches" + (f" of {maps.merge} x {maps.merge} merged" if maps.merge > 1 else "")
    return f"query {maps.query} '{token_label(maps.query_label)}' over image {maps.image} ({grid})"


def _scale_text(scale: str) -> str:
    return ("each panel scaled to its own maximum" if scale == "panel" else "one colour range for all panels") + \
        "; corner: attention mass on the image"


def _outline(panels: np.ndarray, grid: tuple[int, int], cell: tuple[int, int] | None) -> np.ndarray:
    """A white frame around `cell` of the patch grid in every panel: where the query itself sits."""
    if cell is None:
        return panels
    _, h, w, _ = panels.shape
    top, bottom = round(cell[0] * h / grid[0]), round((cell[0] + 1) * h / grid[0]) - 1
    left, right = round(cell[1] * w / grid[1]), round((cell[1] + 1) * w / grid[1]) - 1
    panels[:, top:bottom + 1, [left, right]] = 1.0
    panels[:, [top, bottom], left:right + 1] = 1.0
    return panels


def _panels(values: torch.Tensor, picture, panel_px, upsample, scale, cmap, alpha, grid, cell):
    """`"p r c"` maps -> blended `"p h w 3"` panels (the query's cell framed) and the shared maximum (None with
    per-panel scaling)."""
    size = _panel_size(picture, panel_px)
    heat, top = _normalised(upsampled(values, size, upsample), scale)
    base = _base(picture, size)
    panels = np.stack([_blend(base, panel, cmap, alpha) for panel in heat])
    return _outline(panels, grid, cell), (top if scale == "shared" else None)


def plot_overlays(maps, picture, *, upsample: str = "bilinear", scale: str = "panel", cmap: str = "inferno",
                  alpha: float = 0.6, panel_px: int = 112, title: str | None = None, context: str = "") -> Figure:
    """The layers x heads grid of `maps` (`head_image_maps`: values `"l h r c"`) over `picture`, rows
    labelled L, columns H (with the KV group, H / KV, where heads share KV heads)."""
    if maps.values.dim() != 4:
        raise InputError("plot_overlays draws per-head maps (values 'l h r c', from head_image_maps); "
                         "use plot_layer_overlays for the layer mean and the rollout.")
    layers, heads = maps.values.shape[:2]
    panels, top = _panels(maps.values.reshape(-1, *maps.grid), picture, panel_px, upsample, scale, cmap, alpha,
                          maps.grid, maps.query_cell)
    grouped = any(a == b for a, b in zip(maps.kv_groups, maps.kv_groups[1:]))
    col_labels = [f"H{h}\nKV{g}" if grouped else f"H{h}" for h, g in zip(maps.heads, maps.kv_groups)]
    titles = [drawable(title or f"{context}{maps.title}: {_query_text(maps)}"), _scale_text(scale)]
    return _draw(panels, maps.mass.reshape(-1).tolist(), [f"L{l}" for l in maps.layers], col_labels, titles, cmap,
                 top)


def plot_layer_overlays(mean, rolled, picture, *, upsample: str = "bilinear", scale: str = "panel",
                        cmap: str = "inferno", alpha: float = 0.6, panel_px: int = 112,
                        title: str | None = None, context: str = "") -> Figure:
    """Two rows over `picture`, a column per layer: the mean over heads and the rollout after that layer
    (`layer_image_maps`)."""
    if mean.values.dim() != 3 or rolled.values.shape != mean.values.shape:
        raise InputError("plot_layer_overlays draws the two per-layer maps of layer_image_maps (values 'l r c').")
    values = torch.cat([mean.values, rolled.values])
    panels, top = _panels(values, picture, panel_px, upsample, scale, cmap, alpha, mean.grid, mean.query_cell)
    masses = torch.cat([mean.mass, rolled.mass]).tolist()
    titles = [drawable(title or f"{context}layer mean and {rolled.title}: {_query_text(mean)}"), _scale_text(scale)]
    row_labels = ["mean", "rollout"]
    return _draw(panels, masses, row_labels, [f"L{l}" for l in mean.layers], titles, cmap, top)

