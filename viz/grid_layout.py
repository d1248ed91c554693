"""Pixel layout of the all-heads grid: cell size, gutters, KV-group separators, label sizes and the
natural image size, for a given number of cells per panel, `cell_px` or a target `size`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_heatmap.errors import InputError

from .labels import block_size, text_size, token_label

DEFAULT_LONG_SIDE = 2400  # default canvas: cells sized so the grid's long side is about this many pixels
MIN_PANEL_PX = 40
MIN_LABEL_PX = 8
PAD_FRACTION = 0.6  # margins, in label heights
TITLE_CHARS = 45  # the title font is small enough for about this many characters per line


def _has_groups(groups) -> bool:
    return any(a == b for a, b in zip(groups, groups[1:]))


def axis_map(n_panels, cells, c, gutter, boundaries, sep_width):
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
class Plan:
    """Pixel sizes of one grid: `rows`/`cols` map every pixel row/column of the panel area to a
    `(l q)`/`(h k)` source index (-1 gutter, -2 KV separator); the rest sizes the labels."""

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
    query_width: float = 0.0  # row labels (a cross-attention cube's target tokens) between layer labels and grid


def _label_px(pitch, grid_w):
    return float(np.clip(round(max(0.14 * pitch, grid_w / 140)), 10, 44))


def _thin(count, needed, pitch):
    step = 1
    while step < count and needed > step * pitch:
        step += 1
    return step


def plan_grid(cube, nq, nk, c, *, show_tokens: bool, n_title_lines: int) -> Plan:
    """The pixel plan of `cube`'s grid with panels of `nq x nk` cells of `c` pixels."""
    L, H = cube.num_layers, cube.num_heads
    groups = cube.kv_groups.tolist()
    separators = _has_groups(groups)
    boundaries = [separators and a != b for a, b in zip(groups, groups[1:])]
    gutter = int(np.clip(round(0.06 * min(nq, nk) * c), 2, 16))
    sep_width = max(1, round(gutter * 0.4))
    cols, col_starts = axis_map(H, nk, c, gutter, boundaries, sep_width)
    rows, row_starts = axis_map(L, nq, c, gutter, [False] * (L - 1), sep_width)
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
    query_width = 0.0
    if token_px and cube.query_tokens is not None and len(cube.query_tokens) == nq:
        query_width = max(text_size(token_label(t), token_px)[0] for t in cube.query_tokens) + 0.4 * label_px

    pad = int(round(label_px * PAD_FRACTION)) + 2
    tick_px = label_px * 0.9
    cbar_width = (label_px + max(10, label_px) + 0.5 * label_px + text_size("0.0000", tick_px)[0]
                  + 0.6 * label_px + label_px * 1.3)
    natural_w = int(np.ceil(pad + layer_width + pad + query_width + grid_w + cbar_width + pad))
    natural_w = max(natural_w, 480)
    title_px = round(min(label_px * 1.3, natural_w / TITLE_CHARS))  # a narrow grid keeps a readable title line
    title_h = n_title_lines * title_px * 1.35
    natural_h = int(np.ceil(pad + title_h + pad + head_block[1] + 0.4 * label_px + grid_h
                            + (0.4 * label_px + token_width if token_px else 0) + pad))
    return Plan(c, gutter, sep_width, cols, rows, col_starts, row_starts, label_px, title_px, head_labels,
                 layer_labels, head_block, layer_width, token_px, token_width, cbar_width, grid_w, grid_h,
                 natural_w, natural_h, pad, title_h, query_width)


def start_cell_px(num_layers: int, num_heads: int, nq: int, nk: int, cell_px, size) -> int:
    """Pixels per cell before labels are fitted: `cell_px`, the largest that lets the panels alone fit
    `size`, or the default (the grid's long side near `DEFAULT_LONG_SIDE`, panels at least `MIN_PANEL_PX`)."""
    if cell_px is not None:
        return cell_px
    if size is None:
        c = max(1, DEFAULT_LONG_SIDE // max(num_layers * nq, num_heads * nk))
        if c * max(nq, nk) < MIN_PANEL_PX:
            c = int(np.ceil(MIN_PANEL_PX / max(nq, nk)))
        return min(c, 32)
    width, height = (size, None) if np.isscalar(size) else size
    c = max(1, int(width) // (num_heads * nk))
    return c if height is None else min(c, max(1, int(height) // (num_layers * nq)))


def panels_px(num_layers: int, num_heads: int, nq: int, nk: int, c: int) -> tuple[int, int]:
    """(width, height) of the panels alone, without gutters and labels: the least a grid can take."""
    return num_heads * nk * c, num_layers * nq * c


def fit_cells(cube, nq, nk, cell_px, size, *, check_canvas=None, **plan_options) -> tuple[Plan, int, int]:
    """Choose the cell size (and, for a small target `size`, fewer cells per panel) for `cell_px` or
    `size`; returns (plan, nq, nk). `check_canvas(width, height)` sees the panels' pixel size before any
    pixel map is built (`GridStyle.check_canvas`)."""
    L, H = cube.num_layers, cube.num_heads
    c = start_cell_px(L, H, nq, nk, cell_px, size)
    if check_canvas is not None:
        check_canvas(*panels_px(L, H, nq, nk, c))
    if cell_px is not None or size is None:
        return plan_grid(cube, nq, nk, c, **plan_options), nq, nk
    width, height = (size, None) if np.isscalar(size) else size
    while True:
        plan = plan_grid(cube, nq, nk, c, **plan_options)
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
            raise InputError(f"size={size} is too small for {L} x {H} heads with their labels; "
                             "ask for a larger size or fewer layers/heads.")
        nq, nk = new_nq, new_nk
