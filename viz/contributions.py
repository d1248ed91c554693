"""Figures for "does it matter?" analyses: token-to-token contributions per layer beside the rolled-out input
attribution of one row (ALTI / Kobayashi next to attention rollout), and the knockout scan (layer x key span)."""

from __future__ import annotations

import numpy as np
import matplotlib.colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from llm_heatmap.errors import InputError

from .figures import _figure
from .labels import token_label
from .raster import get_cmap

MAX_PANELS = 12


def _shown_layers(num_layers: int) -> list[int]:
    """Every layer up to MAX_PANELS; beyond that MAX_PANELS evenly spaced ones, first and last included."""
    if num_layers <= MAX_PANELS:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / (MAX_PANELS - 1)) for i in range(MAX_PANELS)})


def plot_token_contributions(per_layer, rolled_out, attention_rolled_out, tokens: list[str], *, measure: str = "alti",
                             position: int = -1, title: str | None = None) -> Figure:
    """Top: the `"l i j"` contribution matrices (rows: receiving token, columns: contributing token), one panel
    per layer (at most 12, evenly spaced). Bottom: how much each input token feeds row `position` after the
    last layer, by the contributions' rollout and by attention rollout (`"j"` each)."""
    per_layer = np.asarray(per_layer, dtype=float)
    if per_layer.ndim != 3 or per_layer.shape[1] != per_layer.shape[2] or per_layer.shape[2] != len(tokens):
        raise InputError(f"contributions of shape {per_layer.shape} do not match {len(tokens)} tokens; pass "
                         "'l i j' matrices over the prompt's tokens.")
    layers = _shown_layers(per_layer.shape[0])
    labels = [token_label(t) for t in tokens]
    n = len(tokens)
    columns = min(len(layers), 6)
    rows = -(-len(layers) // columns)
    panel = float(np.clip(0.18 * n, 1.6, 3.2))
    width = columns * (panel + 0.35) + 1.6
    bars_height = 2.8
    height = rows * (panel + 0.45) + bars_height + 1.6
    fig = _figure(width, height)
    cmap = get_cmap("viridis")
    norm = mcolors.Normalize(0, 1)
    tick_size = float(np.clip(9 - n / 6, 5, 8))
    for index, layer in enumerate(layers):
        row, column = divmod(index, columns)
        left = (0.9 + column * (panel + 0.35)) / width
        bottom = 1 - (1.15 + (row + 1) * (panel + 0.45) - 0.45) / height
        ax = fig.add_axes((left, bottom, panel / width, panel / height))
        ax.imshow(per_layer[layer], cmap=cmap, norm=norm, interpolation="nearest", aspect="auto")
        ax.set_title(f"layer {layer}", fontsize=9, pad=3)
        ax.set_xticks([])
        if column == 0 and n <= 24:
            ax.set_yticks(range(n))
            ax.set_yticklabels(labels, fontsize=tick_size)
        else:
            ax.set_yticks([])
    bar = fig.colorbar(ScalarMappable(norm, cmap), cax=fig.add_axes(
        ((width - 0.55) / width, 1 - (1.15 + panel) / height, 0.12 / width, panel / height)))
    bar.ax.tick_params(labelsize=7)
    bar.set_label(f"{measure} share", fontsize=8)

    ax = fig.add_axes((0.9 / width, 0.75 / height, (width - 1.6) / width, (bars_height - 0.6) / height))
    x = np.arange(n)
    ax.bar(x - 0.2, np.asarray(rolled_out, dtype=float), 0.4, label=f"{measure} rollout", color="#d62728")
    ax.bar(x + 0.2, np.asarray(attention_rolled_out, dtype=float), 0.4, label="attention rollout", color="#1f77b4")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=60 if n > 8 else 0, ha="right" if n > 8 else "center", fontsize=tick_size)
    ax.set_ylabel(f"share of row {token_label(tokens[position]).strip() or repr(tokens[position])}", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title or f"token-to-token contributions ({measure}) per layer, and the input attribution of the "
                 "last token", fontsize=10, y=1 - 0.25 / height, va="top")
    return fig


def plot_knockout_scan(table, *, title: str | None = None) -> Figure:
    """Layer (window centre) x key span, coloured by the relative change of the target's probability when the
    edges from the query to the span are cut in that window (a table from `analyses.knockout_scan`)."""
    missing = [c for c in ("layer", "span", "relative_probability_change") if c not in table.columns]
    if missing:
        raise InputError(f"the knockout scan table lacks column(s) {missing}; pass the table knockout_scan returns.")
    grid = table.pivot(index="span", columns="layer", values="relative_probability_change")
    grid = grid.loc[list(dict.fromkeys(table.span))]  # spans in prompt order
    values = grid.to_numpy(dtype=float) * 100
    bound = float(np.nanmax(np.abs(values))) or 1.0
    norm = mcolors.Normalize(-bound, bound)
    cmap = get_cmap("RdBu_r")
    width = max(5.0, 0.22 * values.shape[1] + 3.2)
    height = 0.3 * values.shape[0] + 1.8
    fig = _figure(width, height)
    ax = fig.add_axes((2.0 / width, 0.6 / height, (width - 3.0) / width, (height - 1.3) / height))
    ax.imshow(values, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(values.shape[0]))
    ax.set_yticklabels([token_label(str(s)) for s in grid.index], fontsize=8)
    ax.set_xticks(range(0, values.shape[1], max(1, values.shape[1] // 15)))
    ax.set_xlabel("layer (centre of the knocked-out window)", fontsize=8)
    ax.tick_params(labelsize=7)
    bar = fig.colorbar(ScalarMappable(norm, cmap), cax=fig.add_axes(
        ((width - 0.8) / width, 0.6 / height, 0.12 / width, (height - 1.3) / height)))
    bar.set_label("% change of p(target)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(title or "attention knockout: edges from the last position to each span, by layer window",
                 fontsize=10, y=1 - 0.2 / height, va="top")
    return fig
