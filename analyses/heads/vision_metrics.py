"""Per-head metrics of attention over image patches (a vision tower, or a ViT).

For every query that is an image patch, its attention over the patches of the same image, renormalised
to sum to 1 (`patch_share` holds what it put on those patches before renormalising):

- `attention_distance`: the mean over patch queries of `sum_k a_qk ||c_q - c_k||`, with `c` a patch's
  (row, col) on the image's patch grid: Dosovitskiy et al. (2020, Fig. 7)'s mean attention distance, in
  patches; `attention_distance_px` multiplies it by the axis's pixels per patch side (NaN where unknown).
- `spatial_entropy`: the mean over patch queries of `-sum_k a_qk ln a_qk` (nats) over the patch grid;
  `spatial_entropy / ln(patches)` is 1 for a uniform spread over the image, 0 for one patch.
- `cls_mass` and `register_mass` (Darcet et al. 2024, "Vision Transformers Need Registers"): the mean over
  patch queries of the weight (not renormalised) on the [CLS] token and on the register tokens.

The positions come from the cube's key axis (`probes.axes.Axis`): which are patches, of which image, at
which row and column, and which special tokens sit before them.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from einops import rearrange

from llm_heatmap.errors import InputError

COLUMNS = ("attention_distance", "attention_distance_px", "spatial_entropy", "cls_mass", "register_mass", "patch_share")


def patch_metrics(pattern: torch.Tensor, query_cells: torch.Tensor, key_cells: torch.Tensor,
                  cls_keys: torch.Tensor, register_keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """The module's metrics of `pattern` `"... q k"` (float64, each `"..."`). `*_cells`: long `[n, 3]` (image,
    row, col) of every query row / key, -1 where not a patch; `cls_keys`, `register_keys`: bool `[k]`."""
    pattern = pattern.double()
    queries = query_cells[:, 1] >= 0
    if not bool(queries.any()):
        raise InputError("no query row of this cube is an image patch; capture a vision site with an image.")
    same_image = (query_cells[:, None, 0] == key_cells[None, :, 0]) & queries[:, None] & (key_cells[None, :, 1] >= 0)
    on_patches = pattern * same_image
    share = on_patches.sum(-1)
    weights = on_patches / share[..., None].clamp(min=1e-300)
    offsets = (query_cells[:, None, 1:] - key_cells[None, :, 1:]).double()
    distance = offsets.pow(2).sum(-1).sqrt() * same_image
    plogp = torch.special.entr(weights)

    def over_patch_queries(values: torch.Tensor) -> torch.Tensor:
        return values[..., queries].mean(-1)

    return {"attention_distance": over_patch_queries((weights * distance).sum(-1)),
            "spatial_entropy": over_patch_queries(plogp.sum(-1)),
            "cls_mass": over_patch_queries((pattern * cls_keys).sum(-1)),
            "register_mass": over_patch_queries((pattern * register_keys).sum(-1)),
            "patch_share": over_patch_queries(share)}


def special_keys(axis, prefix: str) -> torch.Tensor:
    """bool `[n]`: the axis's special positions whose name starts with `prefix` ("[CLS]", "[REG")."""
    keys = torch.zeros(axis.length, dtype=torch.bool)
    for position, name in axis.special.items():
        keys[position] = name.startswith(prefix)
    return keys


def vision_metrics(cube) -> pd.DataFrame:
    """One row per layer x head of a cube over image patches (module docstring)."""
    cube = cube.one_sequence()
    axis = cube.key_axis
    if axis is None or not bool(axis.is_image.any()):
        raise InputError("this cube's key axis marks no image patches; capture a vision site with an image.")
    if cube.pooling is not None or cube.query_tokens is not None:
        raise InputError("vision metrics need a full-resolution self-attention cube; pass the captured cube, not a "
                         "pooled or cross-attention one.")
    cells = axis.patch_cells()
    values = patch_metrics(cube.pattern, cells[cube.query_positions.long()], cells, special_keys(axis, "[CLS]"),
                           special_keys(axis, "[REG"))
    table = pd.DataFrame({"layer": np.repeat(cube.layers, len(cube.heads)), "head": np.tile(cube.heads, len(cube.layers)),
                          **{name: rearrange(value, "l h -> (l h)").numpy() for name, value in values.items()}})
    pixels = axis.patch_pixels * axis.merge if axis.patch_pixels else math.nan
    table.insert(table.columns.get_loc("attention_distance") + 1, "attention_distance_px",
                 table["attention_distance"] * pixels)
    return table
