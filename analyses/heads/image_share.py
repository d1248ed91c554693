"""The share of text-query attention that lands on image tokens, per layer and head, for the language
model of a vision-language model.

A row counts when it is a real text token (not an image token, `cube.key_axis.is_image`) that may attend
at least one image token in that layer (`cube.attendable()`: in a causal model the text before the
image cannot, and its rows would only add zeros). The head's share is the mean over those rows of the
attention weight the row puts on all image tokens together; NaN for a layer where no text row reaches
an image.

`per="image"` splits the share by image (one row per layer x head x image), `per="tile"` by tile of each image
(Idefics3 / SmolVLM's split images: `tile_name` "rI,cJ" or "global", `probes.axes.Axis.tile_names`); the rows
counted are the same, so the parts add up to the total share.
"""

from __future__ import annotations

import einops
import pandas as pd
import torch

from llm_heatmap.errors import InputError


PER = ("all", "image", "tile")


def image_share(cube, per: str = "all") -> pd.DataFrame:
    """One row per layer x head (x image, or x tile: `per`): `image_share` (mean over counted text rows of their
    weight on the image tokens, or on one image's or tile's) and `text_rows` (how many rows counted in that layer)."""
    if per not in PER:
        raise InputError(f"per={per!r} is not one of {', '.join(PER)}; choose how to split the image share.")
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
    rows = counted.sum(-1)  # "l"
    pattern = cube.pattern.double().cpu()
    layers = torch.tensor(cube.layers).repeat_interleave(len(cube.heads))
    heads = torch.tensor(cube.heads).repeat(len(cube.layers))
    tables = []
    for labels, keys in _key_groups(axis, per):
        on_keys = einops.einsum(pattern, keys.double(), "l h q k, k -> l h q")
        share = (on_keys * counted[:, None]).sum(-1) / rows[:, None].clamp(min=1)
        share = torch.where(rows[:, None] > 0, share, torch.full_like(share, float("nan")))
        tables.append(pd.DataFrame({"layer": layers.numpy(), "head": heads.numpy(), **labels,
                                    "image_share": share.flatten().numpy(),
                                    "text_rows": rows.repeat_interleave(len(cube.heads)).numpy()}))
    return pd.concat(tables, ignore_index=True)


def _key_groups(axis, per: str):
    """(label columns, bool keys `[k]`) of every part the share is split into."""
    if per == "all":
        return [({}, axis.is_image)]
    cells = axis.patch_cells()
    if per == "image":
        return [({"image": image}, cells[:, 0] == image) for image in sorted(set(cells[:, 0].tolist()) - {-1})]
    tiles = axis.tile_index
    return [({"image": image, "tile": tile, "tile_name": name}, (cells[:, 0] == image) & (tiles == tile))
            for (image, tile), name in axis.tile_names().items()]
