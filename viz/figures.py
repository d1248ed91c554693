"""Detail and summary figures: one head (or one KV group) with token labels, prompt A vs B with their
difference, layer x head metric maps, the KV-group similarity chart and attention rollout.

All functions return a `matplotlib.figure.Figure` (not managed by pyplot); `save_figure` writes one.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
import matplotlib.colors as mcolors
from matplotlib.figure import Figure

from llm_heatmap.errors import InputError
from llm_heatmap.models.files import atomic_output

from .labels import drawable, fit_text, model_name, prompt_text, token_label
from .raster import QUANTITIES, get_cmap, normalise, range_and_grey
from .saving import FORMATS, save_deterministic
from .style import GridStyle, style_of

DPI = 100


class InlineFigure(Figure):
    """A matplotlib Figure that shows itself as a PNG in notebooks, without pyplot's inline backend."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=self.dpi)
        return buffer.getvalue()


def _figure(width_in, height_in) -> Figure:
    fig = InlineFigure(figsize=(width_in, height_in), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path) -> Path:
    """Write a figure from this module as .png, .svg or .pdf (pixel size = figure size x its dpi)."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"output {path} has an unknown extension; use .png, .svg or .pdf.")
    with atomic_output(path, force=True) as temp:
        save_deterministic(fig, temp, fig.dpi)
    return path


def _index(values, value, what, cube):
    if value not in values:
        raise InputError(f"{what} {value} is not in this cube (it holds {what}s {list(values)}); pick one of those.")
    return list(values).index(value)


def _token_font(n: int) -> float:
    """Point size for n token labels along an axis of about 0.2 inch per token."""
    return float(np.clip(13 - n / 6, 6.5, 10))


def _panel_inches(n_rows: int, n_cols: int) -> tuple[float, float]:
    side = float(np.clip(0.2 * max(n_rows, n_cols), 3.2, 14))
    return side * n_cols / max(n_rows, n_cols), side * n_rows / max(n_rows, n_cols)


def _draw_matrix(ax, values01, drawn, *, cmap, row_labels, col_labels, title=None):
    """imshow of normalised values; cells not drawn show the background; tokens on both axes."""
    shown = np.ma.masked_array(values01, mask=~drawn)
    cm = get_cmap(cmap).with_extremes(bad=(1, 1, 1, 0))
    image = ax.imshow(shown, cmap=cm, vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    n_rows, n_cols = values01.shape
    ax.set_xticks(np.arange(n_cols))
    ax.set_xticklabels([token_label(t) for t in col_labels], rotation=90, fontsize=_token_font(n_cols))
    ax.set_yticks(np.arange(n_rows))
    ax.set_yticklabels([token_label(t) for t in row_labels], fontsize=_token_font(n_rows))
    ax.tick_params(length=2, pad=1)
    ax.set_xlabel("key", fontsize=9)
    ax.set_ylabel("query", fontsize=9)
    if title:
        ax.set_title(title, fontsize=11)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return image


def _head_values(cube, heads_index, layer_index, style: GridStyle):
    """Normalised `"h q k"` values of some heads of one layer on one shared range, the cells to colour
    (attendable, minus a masked sink column) and the `ColorScale`."""
    values = cube.pattern[layer_index][heads_index].detach().float().cpu().numpy()
    drawn = np.broadcast_to(cube.attendable()[layer_index].cpu().numpy(), values.shape)
    in_range, grey = range_and_grey(drawn, cube.first_key, style.sink)
    out, color = normalise(values, in_range, scale=style.resolved_scale(False), gamma=style.gamma, vmin=style.vmin,
                           vmax=style.vmax, shown=drawn & ~grey)
    return out, drawn & ~grey, color


def _query_labels(cube):
    return cube.query_labels()


def _colorbar(fig, ax, color, cmap, label):
    bar = fig.colorbar(ScalarMappable(norm=color.norm(), cmap=get_cmap(cmap)), cax=ax, extend=color.extend)
    bar.set_label(label + ("\n(▲ beyond the range: end colour)" if color.extend != "neither" else ""), fontsize=9)
    bar.ax.tick_params(labelsize=8)
    return bar


def _model_line(cube) -> str:
    return drawable(f"{model_name(cube.source) or cube.spec.model_type} · {cube.spec.summary}")


def _suptitle(fig, cube, text):
    width_px = fig.get_figwidth() * DPI * 0.95
    lines = [fit_text(text, 13, width_px), fit_text(_model_line(cube), 10.5, width_px),
             fit_text(f'"{prompt_text(cube)}"', 10.5, width_px)]
    fig.suptitle("\n".join(lines), fontsize=10, linespacing=1.4, y=1 - 0.1 / fig.get_figheight(), va="top")


def plot_head(cube, layer: int, head: int, style: GridStyle | None = None, **style_options) -> Figure:
    """One head in detail: every query row and key column labelled with its token (readable at 50 tokens).
    Drawing options as the grid's (`GridStyle`: scale, gamma, vmin/vmax, sink, cmap)."""
    return plot_heads(cube, layer, [head], style, **style_options)


def plot_kv_group(cube, layer: int, group: int, **options) -> Figure:
    """The query heads that share KV head `group` in `layer`, side by side on one colour range."""
    cube = cube.one_sequence()
    heads = [h for h in cube.heads if cube.spec.kv_group(h) == group]
    if not heads:
        raise InputError(f"KV group {group} has no heads in this cube (groups 0..{cube.spec.num_kv_heads - 1}).")
    return plot_heads(cube, layer, heads, title=f"layer {layer}, KV group {group}", **options)


def _panel_row(n_panels, w, h, margin, colorbars, top=1.35, gap=0.3):
    """A figure with `n_panels` axes of w x h inches in one row and colorbar axes after the panels listed in
    `colorbars` (panel index -> colorbar after it); `margin` inches for token labels left and below."""
    bar_w, bar_gap, bar_room = 0.15, 0.2, 0.95
    width = margin + n_panels * w + (n_panels - 1) * gap + len(colorbars) * (bar_gap + bar_w + bar_room) + 0.2
    height = margin + h + top
    fig = _figure(width, height)
    axes, bars, x = [], [], margin
    for i in range(n_panels):
        axes.append(fig.add_axes((x / width, margin / height, w / width, h / height)))
        x += w
        if i in colorbars:
            bars.append(fig.add_axes(((x + bar_gap) / width, margin / height, bar_w / width, h / height)))
            x += bar_gap + bar_w + bar_room + (gap if i < n_panels - 1 else 0)
        else:
            x += gap
    return fig, axes, bars


def _label_margin(tokens) -> float:
    return 0.75 + 0.075 * max(len(token_label(t)) for t in tokens)


def plot_heads(cube, layer: int, heads, style: GridStyle | None = None, *, title=None, **style_options) -> Figure:
    """Several heads of one layer side by side (shared colour range), tokens on both axes."""
    style = style_of(style, style_options)
    cube = style.weighted(cube.one_sequence())
    if cube.pooling is not None or len(cube.tokens) != cube.num_keys:
        raise InputError("this cube's tokens do not match its key axis (it was downsampled); "
                         "detail figures need a full-resolution cube.")
    li = _index(cube.layers, layer, "layer", cube)
    hi = [_index(cube.heads, h, "head", cube) for h in heads]
    values, drawn, color = _head_values(cube, hi, li, style)
    w, h = _panel_inches(*values.shape[-2:])
    margin = _label_margin(cube.tokens)
    fig, axes, bars = _panel_row(len(hi), w, h, margin, {len(hi) - 1}, gap=margin)
    for i, (ax, head) in enumerate(zip(axes, heads)):
        group = cube.spec.kv_group(head)
        label = f"L{layer} H{head}" + (f" / KV{group}" if cube.spec.group_size > 1 else "")
        # every panel names its query rows: a reader looking at the third head should not count rows
        _draw_matrix(ax, values[i], drawn[i], cmap=style.cmap, row_labels=_query_labels(cube), col_labels=cube.tokens,
                     title=label)
    _colorbar(fig, bars[0], color, style.cmap, color.label(QUANTITIES[cube.weighting]))
    _suptitle(fig, cube, title or (f"layer {layer}, head {heads[0]}" if len(heads) == 1 else f"layer {layer}"))
    return fig


def plot_comparison(cube_a, cube_b, layer: int, head: int, *, cmap="viridis", diff_cmap="RdBu_r",
                    labels=("A", "B")) -> Figure:
    """Prompt A, prompt B (one shared linear range) and B - A (the sign `compare` reports) on a diverging map
    with a symmetric range.

    The prompts must have the same number of tokens (compare position by position).
    """
    cube_a, cube_b = cube_a.one_sequence(), cube_b.one_sequence()
    if cube_a.pattern.shape != cube_b.pattern.shape:
        raise InputError(f"prompts A and B give cubes of shapes {tuple(cube_a.pattern.shape)} and "
                         f"{tuple(cube_b.pattern.shape)}; compare prompts with the same number of tokens "
                         "(and the same layers/heads).")
    li = _index(cube_a.layers, layer, "layer", cube_a)
    hi = _index(cube_a.heads, head, "head", cube_a)
    a = cube_a.pattern[li, hi].float().cpu().numpy()
    b = cube_b.pattern[li, hi].float().cpu().numpy()
    drawn = cube_a.attendable()[li].cpu().numpy() & cube_b.attendable()[li].cpu().numpy()
    top = float(max(a[drawn].max(), b[drawn].max()))
    diff = b - a
    bound = float(np.abs(diff[drawn]).max()) or 1e-6
    w, h = _panel_inches(*a.shape)
    q_a, q_b = _query_labels(cube_a), _query_labels(cube_b)
    both = [x if x == y else f"{token_label(x, 7)}/{token_label(y, 7)}" for x, y in zip(cube_a.tokens, cube_b.tokens)]
    both_q = [x if x == y else f"{token_label(x, 7)}/{token_label(y, 7)}" for x, y in zip(q_a, q_b)]
    margin = _label_margin(list(cube_a.tokens) + list(cube_b.tokens) + both)
    fig, axes, bars = _panel_row(3, w, h, margin, {1, 2}, top=1.6, gap=margin)
    _draw_matrix(axes[0], a / top, drawn, cmap=cmap, row_labels=q_a, col_labels=cube_a.tokens, title=labels[0])
    _draw_matrix(axes[1], b / top, drawn, cmap=cmap, row_labels=q_b, col_labels=cube_b.tokens, title=labels[1])
    _draw_matrix(axes[2], (diff + bound) / (2 * bound), drawn, cmap=diff_cmap, row_labels=both_q, col_labels=both,
                 title=f"{labels[1]} − {labels[0]}")
    same = fig.colorbar(ScalarMappable(mcolors.Normalize(0, top), get_cmap(cmap)), cax=bars[0])
    same.set_label(f"attention ({labels[0]} and {labels[1]})", fontsize=9)
    delta = fig.colorbar(ScalarMappable(mcolors.Normalize(-bound, bound), get_cmap(diff_cmap)), cax=bars[1])
    delta.set_label(f"{labels[1]} − {labels[0]}", fontsize=9)
    for bar in (same, delta):
        bar.ax.tick_params(labelsize=8)
    width_px = fig.get_figwidth() * DPI * 0.95
    text = [f"layer {layer}, head {head}: {labels[0]} vs {labels[1]}",
            fit_text(_model_line(cube_a), 10.5, width_px)]
    for name, cube in zip(labels, (cube_a, cube_b)):
        text.append(fit_text(f'{name}: "{prompt_text(cube)}"', 10.5, width_px))
    fig.suptitle("\n".join(text), fontsize=10, linespacing=1.4, y=1 - 0.1 / fig.get_figheight(), va="top")
    return fig


def _pivot(table, metric):
    missing = [c for c in ("layer", "head", metric) if c not in table.columns]
    if missing:
        raise InputError(f"the table lacks column(s) {missing}; pass a per-head table with columns layer, head and "
                         f"the metric (it has {list(table.columns)}).")
    grid = table.pivot_table(index="layer", columns="head", values=metric, aggfunc="mean")
    return grid


def _format(value: float) -> str:
    if not np.isfinite(value):
        return ""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 0.01:
        return f"{value:.2f}"
    return f"{value:.0e}"


def plot_metric_map(table, metric: str, *, cmap=None, annotate=None, title=None, center=None) -> Figure:
    """Layer x head heatmap of one column of a per-head table (columns layer, head, <metric>[, kv_group]).

    Values are written into the cells while they stay readable (annotate=None: up to 24 heads).
    A signed column (or `center=0`) uses a diverging map centred on `center`.
    """
    grid = _pivot(table, metric)
    values = grid.to_numpy(dtype=float)
    layers, heads = list(grid.index), list(grid.columns)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise InputError(f"column {metric!r} has no finite values to draw.")
    if center is None and finite.min() < 0 < finite.max():
        center = 0.0
    if center is not None:
        bound = float(np.abs(finite - center).max()) or 1.0
        norm = mcolors.Normalize(center - bound, center + bound)
        cmap = cmap or "RdBu_r"
    else:
        norm = mcolors.Normalize(finite.min(), finite.max() if finite.max() > finite.min() else finite.min() + 1e-9)
        cmap = cmap or "viridis"
    cm = get_cmap(cmap)
    annotate = len(heads) <= 24 if annotate is None else annotate
    cell_w = 0.62 if annotate else 0.32
    cell_h = 0.34 if annotate else 0.22
    fig = _figure(len(heads) * cell_w + 2.2, len(layers) * cell_h + 1.9)
    ax = fig.add_axes((1.0 / fig.get_figwidth(), 0.7 / fig.get_figheight(),
                       len(heads) * cell_w / fig.get_figwidth(), len(layers) * cell_h / fig.get_figheight()))
    ax.imshow(np.ma.masked_invalid(values), cmap=cm, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(len(heads)))
    if "kv_group" in table.columns and table["kv_group"].nunique() < table["head"].nunique():
        groups = table.drop_duplicates("head").set_index("head")["kv_group"]
        ax.set_xticklabels([f"H{h}\nKV{groups[h]}" for h in heads], fontsize=8)
    else:
        ax.set_xticklabels([f"H{h}" for h in heads], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(np.arange(len(layers)))
    ax.set_yticklabels([f"L{layer}" for layer in layers], fontsize=8)
    ax.tick_params(length=0)
    if annotate:
        rgba = cm(norm(np.nan_to_num(values)))
        luminance = rgba[..., :3] @ np.array([0.299, 0.587, 0.114])
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, _format(value), ha="center", va="center", fontsize=7.5,
                    color="black" if luminance[i, j] > 0.5 else "white")
    bar = fig.colorbar(ScalarMappable(norm, cm), cax=fig.add_axes(
        ((len(heads) * cell_w + 1.15) / fig.get_figwidth(), 0.7 / fig.get_figheight(), 0.15 / fig.get_figwidth(),
         len(layers) * cell_h / fig.get_figheight())))
    bar.ax.tick_params(labelsize=8)
    bar.set_label(metric, fontsize=9)
    width_px = fig.get_figwidth() * DPI * 0.95
    fig.suptitle(fit_text(title or f"{metric} per head", 12 * 1.4, width_px), fontsize=12,
                 y=1 - 0.15 / fig.get_figheight(), va="top")
    return fig


def plot_kv_similarity(table, *, title=None) -> Figure:
    """Per layer: mean similarity of heads that share a KV head ("within") vs heads that do not ("across").

    `table` has a `layer` column plus one column whose name contains "within" and one containing
    "across" or "between" (as `analyses.kv_group_similarity` returns); a `grouping` column of
    "pseudo" (MHA heads grouped by position) changes the legend accordingly. With `gap`, `gap_low` and
    `gap_high` columns (the gap's mean over prompts and its interval), a second panel below draws the gap per
    layer with its interval around 0.
    """
    if "layer" not in table.columns:
        raise InputError(f"the KV-similarity table needs a 'layer' column (it has {list(table.columns)}).")
    within = [c for c in table.columns if "within" in str(c)]
    across = [c for c in table.columns if "across" in str(c) or "between" in str(c)]
    if not within or not across:
        raise InputError(f"the KV-similarity table needs a 'within...' and an 'across...' (or 'between...') column "
                         f"(it has {list(table.columns)}).")
    data = table.sort_values("layer")
    layers = data["layer"].to_numpy()
    pseudo = "grouping" in data.columns and (data["grouping"] == "pseudo").all()
    same, other = (("heads in one pseudo-group", "heads in different pseudo-groups") if pseudo
                   else ("heads sharing a KV head", "heads of different KV heads"))
    width = float(np.clip(0.22 * len(layers) + 3, 6, 14))
    with_gap = {"gap", "gap_low", "gap_high"} <= set(data.columns)
    height = 6.6 if with_gap else 4.2
    fig = _figure(width, height)
    left = 0.75 / width  # room for the y label, whatever the width
    ax = fig.add_axes((left, 2.9 / height, 0.97 - left, 2.8 / height) if with_gap else (left, 0.14, 0.97 - left, 0.72))
    ax.plot(layers, data[within[0]], marker="o", ms=4, label=f"{within[0]} ({same})", color="#1f77b4")
    ax.plot(layers, data[across[0]], marker="s", ms=4, label=f"{across[0]} ({other})", color="#ff7f0e")
    ax.fill_between(layers, data[within[0]], data[across[0]], color="#1f77b4", alpha=0.12, lw=0)
    ticks = layers if len(layers) <= 32 else layers[:: int(np.ceil(len(layers) / 32))]
    ax.set_xlabel("layer")
    ax.set_ylabel("similarity")
    ax.legend(fontsize=8, loc="best", frameon=False)
    axes = [ax]
    if with_gap:
        gap_ax = fig.add_axes((left, 0.6 / height, 0.97 - left, 1.6 / height), sharex=ax)
        gap = data["gap"].to_numpy()
        gap_ax.errorbar(layers, gap, yerr=[gap - data["gap_low"].to_numpy(), data["gap_high"].to_numpy() - gap],
                        fmt="o", ms=4, color="#1f77b4", ecolor="#1f77b4", elinewidth=1, capsize=2)
        gap_ax.axhline(0, color="0.4", lw=0.8)
        gap_ax.set_xlabel("layer")
        gap_ax.set_ylabel("gap (within − between)")
        ax.set_xlabel("")
        axes.append(gap_ax)
    for axis in axes:
        axis.set_xticks(ticks)
        axis.grid(alpha=0.3)
        for side in ("top", "right"):
            axis.spines[side].set_visible(False)
    fig.suptitle(title or "KV-group similarity per layer", fontsize=12, y=0.97)
    return fig


def plot_rollout(rollout, tokens, style: GridStyle | None = None, *, title=None, **style_options) -> Figure:
    """Attention rollout (a 2-D `[query, key]` tensor or array) with token labels on both axes."""
    values = rollout.detach().float().cpu().numpy() if isinstance(rollout, torch.Tensor) else np.asarray(rollout, float)
    if values.ndim != 2:
        raise InputError(f"rollout has shape {values.shape}; pass a 2-D [query, key] matrix.")
    if values.shape[1] != len(tokens):
        raise InputError(f"rollout has {values.shape[1]} key columns but {len(tokens)} tokens were given; "
                         "pass the tokens of the cube it came from.")
    style = style_of(style, style_options)
    scale = style.resolved_scale(False)
    drawn = np.isfinite(values)
    out, color = normalise(np.nan_to_num(values), drawn, scale=scale, gamma=style.gamma, vmin=style.vmin, vmax=style.vmax)
    rows = list(tokens)[-values.shape[0]:]
    w, h = _panel_inches(*values.shape)
    margin = 0.9 + 0.075 * max(len(token_label(t)) for t in tokens)
    fig = _figure(w + margin + 1.4, h + margin + 0.9)
    ax = fig.add_axes((margin / fig.get_figwidth(), margin / fig.get_figheight(), w / fig.get_figwidth(),
                       h / fig.get_figheight()))
    _draw_matrix(ax, out, drawn, cmap=style.cmap, row_labels=rows, col_labels=tokens)
    cax = fig.add_axes(((margin + w + 0.2) / fig.get_figwidth(), margin / fig.get_figheight(),
                        0.15 / fig.get_figwidth(), h / fig.get_figheight()))
    bar = fig.colorbar(ScalarMappable(color.norm(), get_cmap(style.cmap)), cax=cax)
    bar.ax.tick_params(labelsize=8)
    bar.set_label("rollout" if scale == "linear" else f"rollout ({scale})", fontsize=9)
    fig.suptitle(title or "attention rollout", fontsize=12, y=1 - 0.2 / fig.get_figheight(), va="top")
    return fig
