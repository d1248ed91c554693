"""`Axis`: what the positions of a cube's key axis are (text tokens, image patches, special tokens, frames).

    axis = cube.key_axis
    axis.kind                  # "text", "patches", "frames" or "mixed" (a VLM's text and image tokens)
    axis.is_image              # bool [n]: which positions are image patches (or merged patch tokens)
    axis.patch_grid            # (rows, cols) of the first image's patch grid, in this axis's units
    axis.patch_cells()         # long [n, 3]: (image, row, col) of every position, -1 where not a patch

Per-position fields are tuples of ints, -1 where a position is not a patch: `image` (which image),
`tile` (which tile of that image, 0 when it is not split), `row`, `col` (the cell of the image's patch
grid). `merge` is how many patches a side one position stands for (Qwen2-VL's language model: 2, a
position covers rows 2r..2r+1 and columns 2c..2c+1 of the tower's grid; 1 elsewhere), and `grids` the
(rows, cols) of each image's grid in these units. `patch_pixels`: the side of one patch in pixels of the
image the model saw (0 where unknown; a position covers `merge * patch_pixels`). `special` names the positions that are neither text
nor patches ("[CLS]", "[DIST]", "[REG i]"). The axis describes the positions of the sequence, also
when the cube's entries are pooled bins (`cube.pooling` maps bins to positions).
"""

from __future__ import annotations

import math
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


def language_axis(token_ids, image_token_id: int | None, grids=None, merge: int = 1, patch_pixels: int = 0) -> Axis:
    """A VLM language model's axis: text tokens, and runs of `image_token_id` each one image, its tokens
    in row order over `grids[i]` (rows, cols) when given (Qwen2-VL, after its merge), else over a square
    grid when the run's length is a square, else one row. A text-only sequence is a text axis."""
    ids = torch.as_tensor(token_ids).reshape(-1).tolist()
    if image_token_id is None or image_token_id not in ids:
        return text_axis(len(ids))
    image, row, col, found = [-1] * len(ids), [-1] * len(ids), [-1] * len(ids), []
    position = 0
    while position < len(ids):
        if ids[position] != image_token_id:
            position += 1
            continue
        end = position
        while end < len(ids) and ids[end] == image_token_id:
            end += 1
        count, index = end - position, len(found)
        if grids is not None and index < len(grids):
            shape = tuple(int(v) for v in grids[index])
        else:
            side = math.isqrt(count)
            shape = (side, side) if side * side == count else (1, count)
        if shape[0] * shape[1] != count:
            raise InputError(f"image {index} has {count} image tokens, but its grid is {shape[0]} x {shape[1]}; "
                             "pass the image_grid_thw the model ran with.")
        for k in range(count):
            image[position + k], row[position + k], col[position + k] = index, k // shape[1], k % shape[1]
        found.append(shape)
        position = end
    tile = [0 if i >= 0 else -1 for i in image]
    return Axis("mixed", len(ids), image=tuple(image), tile=tuple(tile), row=tuple(row), col=tuple(col), merge=merge,
                grids=tuple(found), patch_pixels=patch_pixels)
