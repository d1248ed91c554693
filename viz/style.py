"""`GridStyle`: how a cube is drawn, one set of defaults for the grid (PNG/SVG/PDF), the detail
figures and the HTML view.

    style = GridStyle(scale="power", sink="mask")
    save_grid(cube, "grid.png", style=style)
    write_html(cube, "view.html", style=style)       # opens with the same scale, sink and colours
    save_grid(cube, "small.png", style=style, cell_px=2)   # keywords override single fields
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from llm_heatmap.choices import BACKGROUNDS, SCALES, SINK_MODES, WEIGHTINGS
from llm_heatmap.errors import InputError

MAX_GAMMA = 100  # past this every weight below the top of the range draws as 0, and powers overflow
DEFAULT_CMAP = "viridis"
DIFFERENCE_CMAP = "RdBu_r"  # diverging: blue where B attends less than A, white at 0, red where more
MAX_PIXELS = 2**28  # a quarter gigapixel: 1 GiB as RGBA, before matplotlib's copy of the canvas


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise InputError(f"{name}={value!r} is not one of {', '.join(choices)}; pick one of them.")


@dataclass(frozen=True)
class GridStyle:
    """Drawing options (every field has the default the CLI uses).

    - scale: "linear", "log", "power" (`gamma`) or "row" (each query row over its maximum); "auto"
      is linear, or log where long prompts are area-downsampled (`resolved_scale`).
    - vmin/vmax: the colour range (default: from the cells drawn; one range for the whole grid, or
      one per head with `per_head_range`).
    - sink: the first-token column is "keep" (in the colour range), "exclude" (drawn, but left out of
      the automatic range, since in most decoder heads it saturates the scale) or "mask" (also grey).
    - background: "white" or "transparent" (gutters, margins and cells a query may not attend to).
    - cmap: any matplotlib colormap name.
    - max_tokens: panels longer than this are area-downsampled (rows still sum to 1).
    - hide_unattendable: cells outside the attendable set (causal future, padding, outside a
      sliding window) draw as background instead of the lowest colour.
    - cell_px or size: pixels per token cell, or a target width / (width, height) in pixels
      (grid only; None picks a size near 2400 px on the long side).
    - max_pixels: the largest canvas drawn, in pixels (width x height); a larger one is refused before
      it is allocated (`check_canvas`).
    - weighting: "weights" draws attention weights alpha_ij; "norms" draws the norm-weighted pattern
      `||alpha_ij v_j W_O^h||` (Kobayashi et al. 2020), what each key's value really adds to the row's
      output (needs a cube captured with value norms).
    """

    scale: str = "auto"
    gamma: float = 0.5
    vmin: float | None = None
    vmax: float | None = None
    per_head_range: bool = False
    sink: str = "exclude"
    background: str = "white"
    cmap: str = DEFAULT_CMAP
    max_tokens: int = 256
    hide_unattendable: bool = True
    cell_px: int | None = None
    size: int | tuple[int, int] | None = None
    weighting: str = "weights"
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        _choice("scale", self.scale, SCALES)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("sink", self.sink, SINK_MODES)
        _choice("background", self.background, BACKGROUNDS)
        if not (isinstance(self.gamma, (int, float)) and 0 < self.gamma <= MAX_GAMMA):
            raise InputError(f"gamma={self.gamma!r} must be a number above 0 and at most {MAX_GAMMA} "
                             "(0.5 brightens small weights, 2 darkens them).")
        for name in ("vmin", "vmax"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise InputError(f"{name}={value!r} must be a finite number, or None for the automatic range.")
        if self.vmin is not None and self.vmax is not None and not self.vmin < self.vmax:
            raise InputError(f"vmin={self.vmin} must be below vmax={self.vmax}.")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 2:
            raise InputError(f"max_tokens={self.max_tokens!r} must be a whole number of at least 2.")
        if self.cell_px is not None and self.size is not None:
            raise InputError("give cell_px or size, not both (size picks the largest cell_px that fits).")
        if self.cell_px is not None and (not isinstance(self.cell_px, int) or self.cell_px < 1):
            raise InputError(f"cell_px={self.cell_px!r} must be a positive whole number of pixels per token cell.")
        if self.size is not None:
            sizes = (self.size,) if isinstance(self.size, int) else tuple(self.size)
            if len(sizes) not in (1, 2) or not all(isinstance(s, int) and s >= 16 for s in sizes):
                raise InputError(f"size={self.size!r} must be a width in pixels or (width, height), each at least 16.")
        if not isinstance(self.max_pixels, int) or isinstance(self.max_pixels, bool) or self.max_pixels < 1:
            raise InputError(f"max_pixels={self.max_pixels!r} must be a whole number of pixels above 0.")
        if self.size is not None:
            self.check_canvas(*((self.size, 16) if isinstance(self.size, int) else self.size))
        if self.cell_px is not None:
            self.check_canvas(self.cell_px, self.cell_px, "one token cell")
        from .raster import get_cmap

        get_cmap(self.cmap)

    def check_canvas(self, width: int, height: int, what: str = "the grid") -> None:
        """Refuse a canvas of `width` x `height` pixels above `max_pixels`, before it is allocated."""
        if width * height > self.max_pixels:
            raise InputError(f"{what} would be {width:,} x {height:,} pixels, more than max_pixels={self.max_pixels}; "
                             "pass a smaller cell_px or size, or fewer layers or heads, or allow a larger canvas with "
                             "max_pixels=N.")

    def but(self, **changes) -> "GridStyle":
        """This style with some fields changed (and checked again)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise InputError(f"{unknown[0]!r} is not a drawing option; use one of {', '.join(f.name for f in fields(self))}.")
        return replace(self, **changes) if changes else self

    def signed(self, difference: bool) -> "GridStyle":
        """The style for drawing signed values (a difference B - A): the default colormap becomes the
        diverging `DIFFERENCE_CMAP`, so 0 sits at its neutral middle; a colormap the caller chose stays."""
        return self.but(cmap=DIFFERENCE_CMAP) if difference and self.cmap == DEFAULT_CMAP else self

    def weighted(self, cube):
        """`cube` with the pattern this style draws: as captured, or norm-weighted (`cube.norm_weighted()`)."""
        return cube.norm_weighted() if self.weighting == "norms" else cube

    def resolved_scale(self, downsampled: bool) -> str:
        """The scale actually drawn: "auto" is log where the panels are downsampled (a few near-1 cells
        and about 1/T everywhere else, which only a log scale shows), linear otherwise."""
        if self.scale != "auto":
            return self.scale
        return "log" if downsampled else "linear"


def style_of(style: GridStyle | None, options: dict) -> GridStyle:
    """`style` (default `GridStyle()`) with keyword `options` applied."""
    return (style or GridStyle()).but(**options)
