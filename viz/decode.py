"""`decode_view`: what every head looked at while the model generated each token, as one interactive page.

The page shows the prompt and the generated text. A step (a click on a generated token, or the step
slider) selects the row that produced that token: the text before it is coloured by the chosen head's
attention from that row (or a layer's mean over its heads; text heat, as ecco and inseq draw it), and a
layers x heads image shows every head's row (one line per head, one column per position, each head's
line scaled to its own maximum; hover names head, token and weight).

Embedded format (what `tests/test_decode_view.py` decodes independently):

- `<script id="dv-meta" type="application/json">`: `layers`, `heads`, `kv`, `tokens` (every token of the
  final sequence as shown), `promptTokens`, `steps`, `scales` (`"s l h"` row-major: each step's and head's
  largest weight) and `title`/`summary`.
- `<script id="dv-data">`: base64 of uint8: step after step, for each layer and head, that step's row over
  positions 0..p (p = `promptTokens - 1 + step`), each `round(weight / scale * 255)`.
"""

from __future__ import annotations

import base64

import numpy as np
import torch

from llm_heatmap.errors import InputError

from .html import HtmlView, _page, _script_json
from .labels import model_name, token_text

MAX_PAGE_MB = 64  # the rows of every step, one byte each, above this make a page a browser struggles with


def decode_view(steps, *, title: str | None = None) -> HtmlView:
    """`steps` (`probes.capture_decode`'s `DecodeSteps`) as one self-contained page (module docstring)."""
    rows = steps.kept_rows()
    size = sum(row.numel() for row in rows)
    if size > MAX_PAGE_MB * 2**20:
        raise InputError(f"the decode view would hold {size / 2**20:,.0f} MiB of rows ({steps.num_steps} steps x "
                         f"{len(steps.layers)} layers x {len(steps.heads)} heads); capture fewer layers or heads "
                         "(layers=..., heads=...) or fewer new tokens.")
    scales, levels = [], []
    for row in rows:
        row = row.float().clamp(min=0)
        scale = row.amax(-1)
        scale = torch.where(scale > 0, scale, torch.ones(()))
        scales.append(scale)
        levels.append(torch.round(row / scale[..., None] * 255).to(torch.uint8).reshape(-1))
    data = torch.cat(levels).numpy() if levels else np.zeros(0, np.uint8)
    group = max(1, steps.spec.num_heads // steps.spec.num_kv_heads)
    meta = {"title": title or f"{model_name(steps.source) or steps.spec.model_type}: attention while generating",
            "summary": steps.spec.summary, "layers": [int(x) for x in steps.layers],
            "heads": [int(x) for x in steps.heads], "kv": [int(h) // group for h in steps.heads],
            "tokens": [token_text(str(t)) for t in steps.tokens], "promptTokens": int(steps.prompt_tokens),
            "steps": steps.num_steps, "scales": [float(v) for v in torch.stack(scales).reshape(-1)] if scales else []}
    page = _page(meta["title"], "decode", META=_script_json(meta), DATA=base64.b64encode(data.tobytes()).decode("ascii"))
    return HtmlView(page, height=820)
