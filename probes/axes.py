"""`Axis`: what the positions of a cube's key axis are (text tokens, image patches, special tokens, frames).

    axis = cube.key_axis
    axis.kind                  # "text", "patches", "frames" or "mixed" (a VLM's text and image tokens)
    axis.is_image              # bool [n]: which positions are image patches (or merged patch tokens)
    axis.patch_grid            # (rows, cols) of the first image's patch grid, in this axis's units
    axis.patch_cells()         # long [n, 3]: (image, row, col) of every position, -1 where not a patch
    axis.tile_names()          # {(image, tile): "image", "rI,cJ" or "global"}

Per-position fields are tuples of ints, -1 where a position is not a patch: `image` (which image),
`tile` (which tile of that image, 0 when it is not split; Idefics3 / SmolVLM's split images: its tiles in the
order they run, the global view last, `tile_names()`), `row`, `col` (the cell of the image's patch grid).
`merge` is how many patches a side one position stands for (Qwen2-VL's language model: 2, a position covers
rows 2r..2r+1 and columns 2c..2c+1 of the tower's grid; 1 elsewhere), and `grids` the (rows, cols) of each
image's grid in these units. `patch_pixels`: the side of one patch in pixels of the
image the model saw (0 where unknown; a position covers `merge * patch_pixels`). `special` names the positions that are neither text
nor patches ("[CLS]", "[DIST]", "[REG i]"). The axis describes the positions of the sequence, also
when the cube's entries are pooled bins (`cube.pooling` maps bins to positions).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch

from llm_heatmap.errors import InputError

KINDS = ("text", "patches", "frames", "mixed")
_PER_POSITION = ("image", "tile", "row", "col")


@dataclass(frozen=True)
class Axis:
    kind: str
    length: int
    image: tuple[int, ...] = ()
    tile: tuple[int, ...] = ()
    row: tuple[int, ...] = ()
    col: tuple[int, ...] = ()
    merge: int = 1
    grids: tuple[tuple[int, int], ...] = ()
    special: dict[int, str] = field(default_factory=dict)
    patch_pixels: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"axis kind {self.kind!r} is not one of {', '.join(KINDS)}.")
        if self.patch_pixels < 0:
            raise InputError(f"axis patch_pixels={self.patch_pixels} must be 0 (unknown) or a positive pixel count.")
        for name in _PER_POSITION:
            values = getattr(self, name)
            if values and len(values) != self.length:
                raise InputError(f"axis {name} has {len(values)} entries for {self.length} positions; give one per position.")

    @property
    def is_image(self) -> torch.Tensor:
        """bool `[n]`: which positions are image patches (or tokens standing for merged patches)."""
        if not self.row:
            return torch.zeros(self.length, dtype=torch.bool)
        return torch.tensor(self.row) >= 0

    @property
    def patch_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the first image's grid, None on an axis without patches."""
        return self.grids[0] if self.grids else None

    def patch_cells(self) -> torch.Tensor:
        """long `[n, 3]`: (image, row, col) of every position, -1 where a position is not a patch."""
        if not self.row:
            return torch.full((self.length, 3), -1, dtype=torch.long)
        return torch.tensor([self.image, self.row, self.col], dtype=torch.long).T.contiguous()

    @property
    def tile_index(self) -> torch.Tensor:
        """long `[n]`: the tile of every position (`tile`; 0 everywhere on an axis that records no tiles)."""
        return torch.tensor(self.tile, dtype=torch.long) if self.tile else torch.zeros(self.length, dtype=torch.long)

    def tile_names(self) -> dict[tuple[int, int], str]:
        """{(image, tile): name} of every tile on the axis: "image" for an image that is one tile, else "rI,cJ" for
        the tile at row I, column J of the image's tiles (from 0) and "global" for its global view (its last tile,
        the whole picture downscaled, whose cells are those of its own grid)."""
        cells, tiles, names = self.patch_cells(), self.tile_index, {}
        for image in sorted(set(cells[:, 0].tolist()) - {-1}):
            numbers = sorted(set(tiles[cells[:, 0] == image].tolist()))
            for number in numbers:
                chosen = cells[(cells[:, 0] == image) & (tiles == number), 1:]
                top, left = chosen.min(0).values.tolist()
                height, width = (chosen.max(0).values + 1 - chosen.min(0).values).tolist()
                name = "image" if len(numbers) == 1 else "global" if number == numbers[-1] else \
                    f"r{top // height},c{left // width}"
                names[(image, number)] = name
        return names

    def to_dict(self) -> dict:
        data = asdict(self)
        data["special"] = {str(position): name for position, name in self.special.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Axis":
        data = dict(data)
        for name in _PER_POSITION:
            data[name] = tuple(int(v) for v in data.get(name, ()))
        data["grids"] = tuple((int(r), int(c)) for r, c in data.get("grids", ()))
        data["special"] = {int(position): str(name) for position, name in data.get("special", {}).items()}
        data["patch_pixels"] = int(data.get("patch_pixels", 0))
        return cls(**data)


def text_axis(length: int) -> Axis:
    return Axis("text", length)


def frames_axis(length: int) -> Axis:
    return Axis("frames", length)


def vision_axis(special: list[str], rows: int, cols: int, patch_pixels: int = 0) -> Axis:
    """A vision tower's axis: the `special` tokens, then one image's rows x cols patches, row by row."""
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    n, count = len(special), len(special) + len(cells)
    return Axis("patches", count, image=(-1,) * n + (0,) * len(cells), tile=(-1,) * n + (0,) * len(cells),
                row=(-1,) * n + tuple(r for r, _ in cells), col=(-1,) * n + tuple(c for _, c in cells),
                grids=((rows, cols),), special=dict(enumerate(special)), patch_pixels=patch_pixels)


def language_axis(token_ids, image_token_id: int | None, grids=None, merge: int = 1, patch_pixels: int = 0,
                  tokens=None) -> Axis:
    """A VLM language model's axis: text tokens, and runs of `image_token_id`, each run one image, its tokens in
    row order over `grids[i]` (rows, cols) when given (Qwen2-VL, after its merge), else over a square grid when
    the run's length is a square, else one row. A text-only sequence is a text axis.

    With `tokens` (the token strings), Idefics3 / SmolVLM's split images are grouped: a run right after a
    `<row_I_col_J>` token is that tile of an image, and the next run after `<global-img>` (the whole picture,
    downscaled) closes the image. An image's tiles are numbered in the order they run (the order of its pictures
    in `pixel_values`): the row-major tiles, then the global view last; an image that is not split has one tile,
    0. A tile's positions sit at their cells of the image's grid, the tiles side by side (tile (I, J) of
    s x s tokens covers rows I*s.. and columns J*s..); the global view's cells are those of its own grid."""
    ids = torch.as_tensor(token_ids).reshape(-1).tolist()
    if image_token_id is None or image_token_id not in ids:
        return text_axis(len(ids))
    runs, position = [], 0
    while position < len(ids):
        end = position
        while end < len(ids) and ids[end] == image_token_id:
            end += 1
        if end > position:
            marker = str(tokens[position - 1]) if tokens is not None and position > 0 else ""
            runs.append((position, end, marker))
        position = max(end, position + 1)
    (image, tile, row, col), found = ([-1] * len(ids) for _ in range(4)), []
    for group in _images_of_runs(runs):
        index = len(found)
        tiles = [(start, end, _tile_cell(marker)) for start, end, marker in group]
        if len(tiles) == 1:
            start, end, _ = tiles[0]
            shape = tuple(int(v) for v in grids[index]) if grids is not None and index < len(grids) else _run_grid(end - start)
            if shape[0] * shape[1] != end - start:
                raise InputError(f"image {index} has {end - start} image tokens, but its grid is {shape[0]} x {shape[1]}; "
                                 "pass the image_grid_thw the model ran with.")
            offsets = [(0, 0)]
        else:
            shapes = {_run_grid(end - start) for start, end, _ in tiles}
            if len(shapes) != 1:
                raise InputError(f"the tiles of image {index} hold different numbers of image tokens "
                                 f"({[end - start for start, end, _ in tiles]}); pass the input_ids the processor made.")
            (side_rows, side_cols), = shapes
            cells = [cell for _, _, cell in tiles if cell is not None]
            shape = ((max(r for r, _ in cells) + 1) * side_rows, (max(c for _, c in cells) + 1) * side_cols)
            offsets = [(0, 0) if cell is None else (cell[0] * side_rows, cell[1] * side_cols) for _, _, cell in tiles]
        for number, ((start, end, _), (top, left)) in enumerate(zip(tiles, offsets)):
            width = shape[1] if len(tiles) == 1 else _run_grid(end - start)[1]
            for k in range(end - start):
                image[start + k], tile[start + k] = index, number
                row[start + k], col[start + k] = top + k // width, left + k % width
        found.append(shape)
    return Axis("mixed", len(ids), image=tuple(image), tile=tuple(tile), row=tuple(row), col=tuple(col), merge=merge,
                grids=tuple(found), patch_pixels=patch_pixels)


_TILE = re.compile(r"<row_(\d+)_col_(\d+)>")
GLOBAL_VIEW = "<global-img>"


def _tile_cell(marker: str) -> tuple[int, int] | None:
    """(row, col) of the tile a `<row_I_col_J>` marker names (counted from 0), None for any other token."""
    match = _TILE.fullmatch(marker)
    return None if match is None else (int(match[1]) - 1, int(match[2]) - 1)


def _images_of_runs(runs):
    """The runs of image tokens grouped by image: tiles (runs after a `<row_I_col_J>` marker) up to and with the
    global view's run (after `<global-img>`); any other run is an image of its own."""
    group = []
    for run in runs:
        marker = run[2]
        if _tile_cell(marker) is not None:
            group.append(run)
            continue
        if group and marker != GLOBAL_VIEW:
            yield group
            group = []
        yield group + [run]
        group = []
    if group:
        yield group


def _run_grid(count: int) -> tuple[int, int]:
    side = math.isqrt(count)
    return (side, side) if side * side == count else (1, count)
