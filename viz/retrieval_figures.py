"""The retrieval probe by depth: the model's recall and its strongest heads' scores on the grid of
context lengths x needle depths."""

from __future__ import annotations

import numpy as np
from matplotlib.cm import ScalarMappable
import matplotlib.colors as mcolors
from matplotlib.figure import Figure

from llm_heatmap.errors import InputError

from .figures import DPI, _figure, _format
from .labels import fit_text
from .raster import get_cmap

COLUMNS = ("context_length", "depth", "recall", "recalled", "layer", "head", "score")


def _grid_panel(ax, values, counted, lengths, depths, title, cm):
    """One lengths x depths panel; runs that do not count are hatched grey."""
    norm = mcolors.Normalize(0.0, 1.0)
    ax.imshow(np.ma.masked_array(values, mask=~counted), cmap=cm.with_extremes(bad="#d9d9d9"), norm=norm,
              aspect="auto", interpolation="nearest")
    rgba = cm(norm(values))
    luminance = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
    for (i, j), value in np.ndenumerate(values):
        if not counted[i, j]:
            ax.add_patch(_hatch(j, i))
        ax.text(j, i, _format(value), ha="center", va="center", fontsize=7.5,
                color="white" if counted[i, j] and luminance[i, j] < 0.5 else "black")
    ax.set_xticks(np.arange(len(depths)))
    ax.set_xticklabels([f"{d:g}" for d in depths], fontsize=8)
    ax.set_yticks(np.arange(len(lengths)))
    ax.set_yticklabels([str(n) for n in lengths], fontsize=8)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=10)


def _hatch(x, y):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, hatch="///", edgecolor="#9a9a9a", linewidth=0)


def plot_retrieval_probe(run_heads, heads=None, *, top: int = 7, columns: int = 4, title: str | None = None) -> Figure:
    """Recall and the chosen heads' retrieval scores on every context length x depth cell.

    `run_heads`: one row per run x head with columns context_length, depth, recall, recalled, layer,
    head, score (`RetrievalScores.run_heads()`). `heads`: (layer, head) pairs to draw, default the
    `top` heads by mean score over the runs that recalled. Runs that did not recall the needle do not
    count towards a head's score; their cells are hatched grey.
    """
    missing = [c for c in COLUMNS if c not in run_heads.columns]
    if missing:
        raise InputError(f"the run table lacks column(s) {missing}; pass RetrievalScores.run_heads().")
    if heads is None:
        counted = run_heads[run_heads["recalled"].astype(bool)]
        if counted.empty:
            raise InputError("no run recalled the needle, so no head has a retrieval score to draw; "
                             "pass heads=[(layer, head), ...] to draw their per-run scores anyway.")
        means = counted.groupby(["layer", "head"])["score"].mean().sort_values(ascending=False, kind="stable")
        heads = list(means.index[:top])
    lengths = sorted(run_heads["context_length"].unique())
    depths = sorted(run_heads["depth"].unique())
    runs = run_heads.drop_duplicates(["context_length", "depth"]).set_index(["context_length", "depth"])

    def grid(frame, column):
        table = frame.pivot_table(index="context_length", columns="depth", values=column, aggfunc="first")
        return table.reindex(index=lengths, columns=depths).to_numpy(dtype=float)

    recalled = grid(runs.reset_index(), "recalled") > 0.5
    panels = [("recall of the answer", grid(runs.reset_index(), "recall"), np.ones_like(recalled))]
    for layer, head in heads:
        one = run_heads[(run_heads["layer"] == layer) & (run_heads["head"] == head)]
        if one.empty:
            raise InputError(f"head L{layer}H{head} is not in the run table; pick heads it holds.")
        mean = one.loc[one["recalled"].astype(bool), "score"].mean()
        panels.append((f"L{layer}H{head}  (score {_format(mean) or '–'})", grid(one, "score"), recalled))
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    cell_w, cell_h = 0.5, 0.32
    panel_w, panel_h = len(depths) * cell_w, len(lengths) * cell_h
    left, gap_x, gap_y, top_margin, bottom = 0.8, 0.45, 0.75, 0.75, 0.6
    width = left + columns * panel_w + (columns - 1) * gap_x + 1.1
    height = top_margin + rows * panel_h + (rows - 1) * gap_y + bottom
    fig = _figure(width, height)
    cm = get_cmap("viridis")
    for index, (name, values, counted) in enumerate(panels):
        row, column = divmod(index, columns)
        x = left + column * (panel_w + gap_x)
        y = height - top_margin - (row + 1) * panel_h - row * gap_y
        ax = fig.add_axes((x / width, y / height, panel_w / width, panel_h / height))
        _grid_panel(ax, values, counted, lengths, depths, name, cm)
        if column == 0:
            ax.set_ylabel("context (tokens)", fontsize=8)
        if row == rows - 1 or index + columns >= len(panels):
            ax.set_xlabel("needle depth", fontsize=8)
    bar = fig.colorbar(ScalarMappable(mcolors.Normalize(0, 1), cm), cax=fig.add_axes(
        ((width - 0.75) / width, bottom / height, 0.14 / width, (height - top_margin - bottom) / height)))
    bar.ax.tick_params(labelsize=8)
    bar.set_label("recall / retrieval score", fontsize=9)
    text = title or "Retrieval heads by needle depth and context length (hatched: no recall, not counted)"
    fig.suptitle(fit_text(text, 11 * 1.4, width * DPI * 0.95), fontsize=11, y=1 - 0.12 / height, va="top")
    return fig
