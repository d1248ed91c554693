"""Attention from one query onto one image's patch grid: every head's map, the per-layer mean and the rollout.

    maps = head_image_maps(cube, "cls")                   # values "l h r c": row of CLS per head, on the grid
    layer = layer_image_maps(cube, "last")                # mean over heads and rollout after each layer, "l r c"

A query is `"cls"` (the first special position of the axis, a vision tower's [CLS]), `"last"` (the last
query row: a generated token, or a VLM's last text token) or a position of the sequence. Each key position
of the chosen image is put at its cell `(row, col)` of that image's grid (`Axis.patch_cells`), in the axis's
own units: a Qwen2-VL language-model token stands for `merge x merge` tower patches and is one cell of the
merged grid. Keys that are not the image's patches (CLS, registers, text, other images) are left out; their
share is what `mass` does not hold. The rollout is `analyses.maps.rollouts.rollout`'s row of the query.

An image split into tiles (Idefics3 / SmolVLM) is drawn with its tiles side by side on the image's grid; its
global view (the whole picture downscaled, the image's last tile) is left out unless chosen: `tile=` picks one
tile of the image (`Axis.tile_names()`) on that tile's own grid, and the title names it.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch

from llm_heatmap.errors import InputError

from .rollouts import rollout


@dataclass(frozen=True)
class ImageMaps:
    """Attention of one query over one image's patch grid: `values` `"l h r c"` (per head) or `"l r c"` (per
    layer), `mass` the sum of each map (how much of the query's attention lands on this image)."""

    values: torch.Tensor
    mass: torch.Tensor
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    kv_groups: tuple[int, ...]
    query: int
    query_label: str
    image: int
    grid: tuple[int, int]
    merge: int
    title: str = ""
    query_cell: tuple[int, int] | None = None  # (row, col) of the query when it is a patch of this image
    tile: int | None = None  # the one tile drawn (None: the image's tiles side by side)


def resolve_query(cube, query) -> int:
    """The sequence position of `query` ("cls", "last" or an int) among the cube's query rows."""
    cube = cube.one_sequence()
    positions = [int(p) for p in cube.query_positions]
    axis = cube.query_axis
    if query == "last":
        return positions[-1]
    if query == "cls":
        special = sorted(axis.special) if axis is not None else []
        if not special:
            raise InputError("query 'cls' needs a special position (a [CLS] token) before the patches, and this "
                             "site has none; give a position or 'last'.")
        position = special[0]
    elif isinstance(query, int) and not isinstance(query, bool):
        position = query
    else:
        raise InputError(f"query {query!r} is not 'cls', 'last' or a position; give one of those.")
    if position not in positions:
        raise InputError(f"query position {position} is not a query row of this cube (it has "
                         f"{len(positions)} rows, positions {positions[0]}-{positions[-1]}); give a position in "
                         "that range.")
    return position


def _image_cells(cube, image: int, tile: int | None = None):
    """(key positions of `image`'s patches, their (row, col) cells, the grid, the title's tile words): the
    image's tiles side by side (an image split into tiles: without its global view), or the one `tile`."""
    axis = cube.key_axis
    if axis is None or not bool(axis.is_image.any()):
        raise InputError("this site's keys are not image patches, so there is nothing to draw over an image; "
                         "choose a vision site or a VLM's language model.")
    cells = axis.patch_cells()
    images = sorted(set(cells[:, 0].tolist()) - {-1})
    if image not in images:
        raise InputError(f"image {image} is not on this site's key axis (it holds images {images}); pick one of those.")
    names = {number: name for (picture, number), name in axis.tile_names().items() if picture == image}
    tiles = axis.tile_index
    if tile is None:
        chosen = cells[:, 0] == image
        if len(names) > 1:
            chosen &= tiles != max(names)
        positions = chosen.nonzero().squeeze(-1)
        return positions, cells[positions, 1:], tuple(axis.grids[image]), ""
    if tile not in names:
        raise InputError(f"tile {tile} is not a tile of image {image} (it has tiles {sorted(names)}); pick one of those.")
    positions = ((cells[:, 0] == image) & (tiles == tile)).nonzero().squeeze(-1)
    local = cells[positions, 1:] - cells[positions, 1:].min(0).values
    return positions, local, tuple((local.max(0).values + 1).tolist()), f", tile {tile} ({names[tile]})"


def _onto_grid(values: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`"... k -> ... r c"`: each key's value at its cell; cells no key covers stay NaN."""
    rows, cols = grid
    out = torch.full((*values.shape[:-1], rows * cols), float("nan"), dtype=values.dtype)
    out[..., cells[:, 0] * cols + cells[:, 1]] = values
    return einops.rearrange(out, "... (r c) -> ... r c", r=rows, c=cols)


def _query_row(cube, position: int) -> int:
    return [int(p) for p in cube.query_positions].index(position)


def _check_full(cube) -> None:
    if cube.pooling is not None:
        raise InputError("this cube is area-downsampled, so its keys are no longer patches; capture the full cube "
                         "(without streaming) to draw it over the image.")


def _maps(cube, values, mass, position, image, drawn, title, heads=(), tile=None) -> ImageMaps:
    """`drawn`: `_image_cells`' (keys, cells, grid, tile words)."""
    keys, cells, grid, tile_words = drawn
    axis = cube.key_axis
    at = (keys == position).nonzero().flatten().tolist()
    return ImageMaps(values=values, mass=mass, layers=tuple(cube.layers), heads=tuple(heads),
                     kv_groups=tuple(int(g) for g in cube.kv_groups) if heads else (), query=position,
                     query_label=str(cube.query_labels()[_query_row(cube, position)]), image=image, grid=grid,
                     merge=axis.merge, title=title + tile_words,
                     query_cell=tuple(cells[at[0]].tolist()) if at else None, tile=tile)


def head_image_maps(cube, query, *, image: int = 0, tile: int | None = None) -> ImageMaps:
    """Every head's attention from `query` over image `image`'s patch grid (or its tile `tile`'s): values
    `"l h r c"`, the cube's row of the query (`pattern[l, h, row]`) with each patch key at its cell."""
    cube = cube.one_sequence()
    _check_full(cube)
    drawn = keys, cells, grid, _ = _image_cells(cube, image, tile)
    position = resolve_query(cube, query)
    row = cube.pattern[:, :, _query_row(cube, position)].double()  # "l h k"
    values = _onto_grid(row[..., keys], cells, grid)
    return _maps(cube, values, row[..., keys].sum(-1), position, image, drawn, "attention per head", cube.heads, tile)


def layer_image_maps(cube, query, *, image: int = 0, tile: int | None = None,
                     residual: float = 0.5) -> tuple[ImageMaps, ImageMaps]:
    """(mean over heads of each layer, rollout after each layer) of `query`'s row over image `image`'s patch
    grid (or its tile `tile`'s), values `"l r c"`; the rollout is `rollout(cube, residual=...)` (which needs
    every query row and consecutive layers)."""
    cube = cube.one_sequence()
    _check_full(cube)
    drawn = keys, cells, grid, _ = _image_cells(cube, image, tile)
    position = resolve_query(cube, query)
    mean = einops.reduce(cube.pattern[:, :, _query_row(cube, position)].double(), "l h k -> l k", "mean")[:, keys]
    rolled = rollout(cube, residual=residual)[:, position, keys]
    return (_maps(cube, _onto_grid(mean, cells, grid), mean.sum(-1), position, image, drawn, "layer mean", tile=tile),
            _maps(cube, _onto_grid(rolled, cells, grid), rolled.sum(-1), position, image, drawn,
                  f"rollout (residual {residual:g})", tile=tile))
