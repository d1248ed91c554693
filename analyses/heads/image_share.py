"""The share of text-query attention that lands on image tokens, per layer and head, for the language
model of a vision-language model.

A row counts when it is a real text token (not an image token, `cube.key_axis.is_image`) that may attend
at least one image token in that layer (`cube.attendable()`: in a causal model the text before the
image cannot, and its rows would only add zeros). The head's share is the mean over those rows of the
attention weight the row puts on all image tokens together; NaN for a layer where no text row reaches
an image.
"""

from __future__ import annotations

import einops
import pandas as pd
import torch

from llm_heatmap.errors import InputError


def image_share(cube) -> pd.DataFrame:
    """One row per layer x head: `image_share` (mean over counted text rows of their weight on image
    tokens) and `text_rows` (how many rows counted in that layer)."""
    cube = cube.one_sequence()
    axis = cube.key_axis
    if axis is None or not bool(axis.is_image.any()):
        raise InputError("this cube's key axis marks no image tokens; capture a vision-language model's language "
                         "site with capture_sites and an image in the prompt.")
    if cube.pooling is not None or cube.query_tokens is not None:
        raise InputError("image_share needs a full-resolution self-attention cube; pass the captured cube, not a "
                         "pooled or cross-attention one.")
    image = axis.is_image
    text_rows = ~image[cube.query_positions] & cube.query_mask.bool().cpu()
    counted = (cube.attendable() & image).any(-1) & text_rows  # "l q"
    on_image = einops.einsum(cube.pattern.double().cpu(), image.double(), "l h q k, k -> l h q")
    rows = counted.sum(-1)  # "l"
    share = (on_image * counted[:, None]).sum(-1) / rows[:, None].clamp(min=1)
    share = torch.where(rows[:, None] > 0, share, torch.full_like(share, float("nan")))
    layers = torch.tensor(cube.layers).repeat_interleave(len(cube.heads))
    heads = torch.tensor(cube.heads).repeat(len(cube.layers))
    return pd.DataFrame({"layer": layers.numpy(), "head": heads.numpy(), "image_share": share.flatten().numpy(),
                         "text_rows": rows.repeat_interleave(len(cube.heads)).numpy()})
