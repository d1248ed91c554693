"""Query-key maps (`analyses.qk_map`) as figures: one map, or every head or KV group of a layer side by side.

Queries are dots and keys triangles, both coloured by token position (dark = early); for a KV group
each query head has its own marker edge colour. With few points each carries its token.
"""

from __future__ import annotations

import numpy as np
from matplotlib.cm import ScalarMappable
import matplotlib.colors as mcolors
from matplotlib.figure import Figure

from llm_heatmap.errors import InputError

from .figures import DPI, _figure
from .labels import fit_text, text_size, token_label

LABELLED_POINTS = 60  # at most this many points get their token written beside them
HEAD_EDGES = ("#1f1f1f", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
# each query head of a group its own marker as well as its outline: an outline alone was hard to tell apart
HEAD_MARKERS = ("o", "s", "D", "P", "X", "v", "h", "*")


def _title(qk) -> str:
    who = f"head {qk.heads[0]}" if len(qk.heads) == 1 else f"KV{qk.group}: H{','.join(map(str, qk.heads))}"
    method = f"PCA {qk.explained[0]:.0%} + {qk.explained[1]:.0%} of variance" if qk.explained else qk.method
    return f"L{qk.layer} {who} · {method}"


def _draw(ax, qk, norm, cmap, *, labels: bool) -> None:
    points = qk.points.numpy()
    position = qk.position.numpy()
    keys = qk.is_key.numpy()
    ax.scatter(points[keys, 0], points[keys, 1], c=position[keys], cmap=cmap, norm=norm, marker="^", s=26,
               linewidths=0.4, edgecolors="#555555", label="keys")
    heads = qk.head.numpy()
    for i, head in enumerate(qk.heads):
        mine = heads == head
        name = "queries" if len(qk.heads) == 1 else f"queries H{head}"
        ax.scatter(points[mine, 0], points[mine, 1], c=position[mine], cmap=cmap, norm=norm,
                   marker=HEAD_MARKERS[i % len(HEAD_MARKERS)], s=22,
                   linewidths=0.9 if len(qk.heads) > 1 else 0.3, edgecolors=HEAD_EDGES[i % len(HEAD_EDGES)], label=name)
    if labels:
        for (x, y), token, key in zip(points, qk.tokens, keys):
            ax.annotate(token_label(token, 10), (x, y), fontsize=6.5, xytext=(3, 2), textcoords="offset points",
                        color="#444444" if key else "#000000")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(fit_text(_title(qk), 10 * DPI / 72, ax.bbox.width * 0.98), fontsize=10)
    ax.legend(fontsize=7, loc="best", framealpha=0.7, markerscale=0.8)


def plot_qk_maps(maps, *, columns: int | None = None, cmap: str = "viridis", title: str | None = None) -> Figure:
    """One panel per map (e.g. every head or KV group of a layer), a shared position colour bar."""
    maps = list(maps)
    if not maps:
        raise InputError("there is no query-key map to draw; pass at least one map from analyses.qk_map.")
    columns = columns or min(len(maps), 3)
    rows = -(-len(maps) // columns)
    side = 4.2
    heading = _wrapped(title or "query-key map: keys (triangles) and queries (one marker per head); nearness tracks q·k",
                       12 * DPI / 72, (columns * side + 0.9) * DPI * 0.95)
    extra = 0.22 * (len(heading) - 1)  # room for a heading that takes two lines
    fig = _figure(columns * side + 0.9, rows * side + 0.8 + extra)
    length = max(int(qk.position.max()) for qk in maps) + 1
    norm = mcolors.Normalize(0, max(1, length - 1))
    width, height = fig.get_figwidth(), fig.get_figheight()
    for index, qk in enumerate(maps):
        row, column = divmod(index, columns)
        ax = fig.add_axes(((0.15 + column * side) / width, (height - 0.6 - extra - (row + 1) * side + 0.35) / height,
                           (side - 0.35) / width, (side - 0.55) / height))
        _draw(ax, qk, norm, cmap, labels=len(qk.points) <= LABELLED_POINTS)
    cax = fig.add_axes(((columns * side + 0.25) / width, 0.5 / height, 0.15 / width, (rows * side - 0.6) / height))
    bar = fig.colorbar(ScalarMappable(norm, cmap), cax=cax)
    bar.set_label("token position", fontsize=9)
    bar.ax.tick_params(labelsize=8)
    fig.suptitle("\n".join(heading), fontsize=12, y=1 - 0.12 / height, va="top")
    return fig


def _wrapped(text: str, px: float, width: float, lines: int = 2) -> list[str]:
    """`text` broken at spaces into at most `lines` lines of `width` pixels (the last one cut if need be)."""
    out, words = [], text.split()
    while words and len(out) < lines - 1:
        line = words.pop(0)
        while words and text_size(f"{line} {words[0]}", px)[0] <= width:
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words:
        out.append(fit_text(" ".join(words), px, width))
    return out


def plot_qk_map(qk, *, cmap: str = "viridis", title: str | None = None) -> Figure:
    """One query-key map (of a head or a KV group)."""
    return plot_qk_maps([qk], columns=1, cmap=cmap, title=title)
