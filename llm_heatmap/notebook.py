"""Notebook entry points: one line from a model and a prompt to the inline view or grid, and the rich
display of a cube (a summary with an all-heads thumbnail).

    import llm_heatmap as lh
    lh.view("smollm2-135m", "The cat sat on the mat.")       # the interactive view, inline
    lh.grid(model, "The cat sat on the mat.", tokenizer=tok)  # the grid of an already loaded model

Both capture through `analyses.measure_prompt` (streaming when the full cube would not fit) and
return objects that display themselves (`HtmlView`, `DrawnGrid`) and can be saved. Every result
displays itself in any front-end that asks for `_repr_html_` (Jupyter, marimo, VS Code): a cube through
`cube_html`, a result of tables through `tables_html`, both imported only when a display is asked for.
"""

from __future__ import annotations

import base64
import html
from dataclasses import replace


def _cube_and_table(model, prompt, tokenizer, *, chat: bool, max_tokens: int):
    from llm_heatmap.analyses import measure_prompt
    from llm_heatmap.errors import InputError
    from llm_heatmap.models import load_model, spec_from_model

    if isinstance(model, str):
        source = model
        model, tokenizer, spec = load_model(model)
    else:
        if tokenizer is None:
            raise InputError("a loaded model needs its tokenizer; pass tokenizer=... (or a model name such as "
                             "'smollm2-135m' instead of the model).")
        source, spec = getattr(model.config, "name_or_path", None), spec_from_model(model)
    import torch

    with torch.no_grad():
        return measure_prompt(model, tokenizer, spec, prompt, stream=None, max_tokens=max_tokens, chat=chat,
                              source=source)


INLINE_MB = 8  # an inline page larger than this slows a notebook (and its saved .ipynb) down


def inline_max_tokens(num_layers: int, num_heads: int, *, bits: int, megabytes: float = INLINE_MB) -> int:
    """The largest per-head size T whose `l h T T` weights (base64, `bits` each) fit in `megabytes`."""
    cells = megabytes * 2**20 * 3 / 4 / (bits / 8) / max(1, num_layers * num_heads)
    return max(2, int(cells ** 0.5))


def view(model, prompt: str, *, tokenizer=None, chat: bool = False, style=None, inline_mb: float | None = INLINE_MB,
         **style_options):
    """The interactive view of every head for `prompt` (an `HtmlView`, shown inline; `.save(path)`).
    `model` is a source for `load_model` or a loaded model with its `tokenizer`. A page that would embed
    more than `inline_mb` MiB (None: no limit) is drawn area-downsampled to fit, and says so above the view."""
    from llm_heatmap.viz import html_view
    from llm_heatmap.viz.style import style_of

    style = style_of(style, style_options)
    cube, table = _cube_and_table(model, prompt, tokenizer, chat=chat, max_tokens=style.max_tokens)
    note = None
    if inline_mb is not None:
        bits = 16 if style.resolved_scale(True) == "log" else 8
        fits = inline_max_tokens(cube.num_layers, cube.num_heads, bits=bits, megabytes=inline_mb)
        if min(style.max_tokens, max(cube.num_keys, cube.num_queries)) > fits:
            style = style.but(max_tokens=fits)
            note = (f"{cube.num_tokens} tokens drawn area-downsampled to at most {fits} x {fits} per head so that the "
                    f"inline page stays under {inline_mb:g} MiB; pass inline_mb=None (or fewer layers) for more detail.")
    result = html_view(cube, metrics=table, style=style)
    return replace(result, note=note) if note else result


def grid(model, prompt: str, *, tokenizer=None, chat: bool = False, style=None, **style_options):
    """The all-heads grid for `prompt` (a `DrawnGrid`, shown inline; `.save(path)`)."""
    from llm_heatmap.viz import plot_grid
    from llm_heatmap.viz.style import style_of

    style = style_of(style, style_options)
    cube, _ = _cube_and_table(model, prompt, tokenizer, chat=chat, max_tokens=style.max_tokens)
    return plot_grid(cube, style)


THUMBNAIL_WIDTH, THUMBNAIL_HEIGHT = 420, 640


def sites_html(cubes) -> str:
    """The notebook display of a capture's sites (`SiteCubes`): the one page with its site switch, inline."""
    from llm_heatmap.viz.html import sites_view

    return sites_view(cubes)._repr_html_()


def cube_html(cube) -> str:
    """A cube's notebook display: what it holds, in a few lines, beside a small all-heads grid."""
    from llm_heatmap.viz.grid import grid_thumbnail
    from llm_heatmap.viz.labels import model_name, prompt_text

    one = cube.one_sequence() if not cube.batched or len(cube) == 1 else cube.item(0)
    thumbnail = grid_thumbnail(one, width=THUMBNAIL_WIDTH, height=THUMBNAIL_HEIGHT)
    rows = {
        "model": model_name(cube.source) or cube.spec.architecture,
        "spec": cube.spec.summary,
        "tokens": f"{one.num_tokens}" + (f" (pooled to {one.num_keys} x {one.num_queries} bins)" if one.pooling else ""),
        "pattern": f'{" x ".join(map(str, cube.pattern.shape))} ({"b " if cube.batched else ""}l h q k), '
                   f"{str(cube.pattern.dtype).removeprefix('torch.')}, {cube.pattern.numel() * cube.pattern.element_size() / 2**20:,.1f} MiB",
        "holds": ", ".join([cube.weighting, *cube.side_tensors()]),
        "prompt": prompt_text(one)[:300],
    }
    table = "".join(f"<tr><th style='text-align:left;padding-right:12px'>{html.escape(k)}</th>"
                    f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in rows.items())
    image = base64.b64encode(thumbnail).decode("ascii")
    return (f"<div style='display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap'>"
            f"<table style='font-size:12px'><caption style='text-align:left;font-weight:600'>AttentionCube</caption>"
            f"{table}</table><img alt='all heads' style='max-width:{THUMBNAIL_WIDTH}px' "
            f"src='data:image/png;base64,{image}'></div>")


def tables_html(title: str, tables: dict, rows: int = 10) -> str:
    """A result's notebook display: its title, then the first `rows` rows of each of its tables."""
    parts = [f"<div><b>{html.escape(title)}</b>"]
    for name, table in tables.items():
        if table is not None:
            parts.append(f"<p style='margin:8px 0 2px'>{html.escape(name)}: {len(table):,} rows</p>"
                         f"{table.head(rows).to_html(index=False, float_format=lambda v: f'{v:.4g}')}")
    return "".join(parts) + "</div>"
