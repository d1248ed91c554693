"""Pixels without artists: colour scales, the first-token (sink) rule, a 256-entry colormap lookup
table and the gather that lays every head's panel onto one canvas with gutters.

Everything here is numpy over the whole `"l h q k"` array at once; matplotlib only supplies
colormaps and `Normalize` objects (for colorbars and as the reference the tests compare with).
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import matplotlib
import matplotlib.colors as mcolors
import numpy as np

from llm_heatmap.errors import InputError

LUT_SIZE = 256
# extra LUT rows after the colormap: cells that are not drawn with a colour
BACKGROUND, MASKED, SEPARATOR = LUT_SIZE, LUT_SIZE + 1, LUT_SIZE + 2
MASK_RGBA = (158, 158, 158, 255)
SEPARATOR_RGBA = (96, 96, 96, 255)
# log scale: the auto lower bound never goes below vmax * LOG_FLOOR (a 4-decade colorbar)
LOG_FLOOR = 1e-4


def get_cmap(cmap) -> mcolors.Colormap:
    if isinstance(cmap, mcolors.Colormap):
        return cmap
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise InputError(f"cmap {cmap!r} is not a matplotlib colormap; pass a name such as 'viridis' or 'magma'.") from None


def colormap_bytes(cmap) -> np.ndarray:
    """`(256, 4)` uint8 RGBA: entry i is the colour matplotlib gives a normalised value in `[i/256, (i+1)/256)`."""
    return get_cmap(cmap).resampled(LUT_SIZE)(np.arange(LUT_SIZE), bytes=True)


def lookup_table(cmap, background_rgba) -> np.ndarray:
    """`uint32` view of RGBA bytes: 256 colormap entries (`colormap_bytes`), then background, masked and
    separator colours."""
    colors = colormap_bytes(cmap)
    extra = np.array([background_rgba, MASK_RGBA, SEPARATOR_RGBA], dtype=np.uint8)
    table = np.ascontiguousarray(np.concatenate([colors, extra]).astype(np.uint8))
    return table.view(np.uint32).reshape(-1)


def lut_index(normalised: np.ndarray) -> np.ndarray:
    """Normalised values -> LUT index (`uint16`), the way `Colormap.__call__` bins floats (NaN -> background)."""
    scaled = np.nan_to_num(normalised * LUT_SIZE, nan=-1.0)
    index = np.clip(scaled, 0, LUT_SIZE - 1).astype(np.uint16)
    index[np.isnan(normalised)] = BACKGROUND
    return index


@dataclass(frozen=True)
class ColorScale:
    """How values become colours: `scale`, its range (`vmin`, `vmax`; per head when `per_head`), `gamma`.

    - linear: `(x - vmin) / (vmax - vmin)`
    - power: `((x - vmin) / (vmax - vmin)) ** gamma` (matplotlib's `PowerNorm`)
    - log: `(log x - log vmin) / (log vmax - log vmin)`; x <= 0 draws as the lowest colour
    - row: `x / max(row)`, each query row divided by its largest in-range weight
    """

    scale: str
    vmin: float | np.ndarray
    vmax: float | np.ndarray
    gamma: float = 0.5
    per_head: bool = False
    above: bool = False  # some drawn cell lies above the range (drawn at its top colour)
    below: bool = False  # ... or below it

    @property
    def extend(self) -> str:
        """matplotlib's colorbar `extend`: the triangles that mark values drawn clipped to the range's ends."""
        return {(True, True): "both", (True, False): "max", (False, True): "min"}.get((self.above, self.below), "neither")

    def norm(self) -> mcolors.Normalize:
        """The matplotlib norm for a colorbar (unit range when per head or per row)."""
        if self.scale == "difference":
            return mcolors.Normalize(-1.0, 1.0) if self.per_head else mcolors.Normalize(self.vmin, self.vmax)
        if self.scale == "row" or self.per_head:
            if self.scale == "power":
                return mcolors.PowerNorm(self.gamma, 0.0, 1.0)
            return mcolors.Normalize(0.0, 1.0)
        if self.scale == "log":
            return mcolors.LogNorm(self.vmin, self.vmax)
        if self.scale == "power":
            return mcolors.PowerNorm(self.gamma, self.vmin, self.vmax)
        return mcolors.Normalize(self.vmin, self.vmax)

    def label(self, quantity: str = "attention") -> str:
        """The colorbar label for `quantity` (what the cells hold) on this scale."""
        if self.scale == "difference":
            return "B − A, over each head's largest |B − A|" if self.per_head else f"{quantity} B − A"
        if self.scale == "row":
            return f"{quantity} / row maximum"
        name = {"linear": quantity, "log": f"{quantity} (log)", "power": f"{quantity} (power {self.gamma:g})"}[self.scale]
        return f"{name}, each head's own range" if self.per_head else name


def _clipped(values: np.ndarray, lo, hi, shown) -> dict:
    """Whether any coloured cell (`shown`, default all) lies above `hi` or below `lo` (relative slack for rounding)."""
    shown = np.ones(values.shape, bool) if shown is None else np.broadcast_to(shown, values.shape)
    slack = 1e-9 * np.maximum(np.abs(hi), np.abs(lo))
    return {"above": bool(np.any(shown & (values > hi + slack))), "below": bool(np.any(shown & (values < lo - slack)))}


def normalise(values: np.ndarray, in_range: np.ndarray, *, scale: str, gamma: float = 0.5, vmin=None, vmax=None,
              per_head: bool = False, shown=None) -> tuple[np.ndarray, ColorScale]:
    """`"l h q k"` values -> values in [0, 1] (outside clipped later by the LUT) and the `ColorScale` used.

    `in_range` (bool, broadcastable to values) marks the cells that set an automatic range: a given
    `vmin`/`vmax` wins over the automatic one. `shown` marks the cells drawn in colour (default all):
    the scale records whether any of them is clipped to an end of the range (`above`, `below`).
    """
    values = values.astype(np.float64, copy=False)
    if scale == "row":
        row_max = np.where(in_range, values, 0.0).max(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(row_max > 0, values / np.where(row_max > 0, row_max, 1.0), 0.0)
        return out, ColorScale("row", 0.0, 1.0, gamma)
    axes = (-2, -1) if per_head else None
    keep = dict(axis=axes, keepdims=per_head)
    mask = np.broadcast_to(in_range, values.shape)
    hi = np.where(mask, values, -np.inf).max(**keep) if vmax is None else np.asarray(float(vmax))
    hi = np.where(np.isfinite(hi), hi, 1.0)
    if vmin is not None:
        lo = np.asarray(float(vmin))
    elif scale == "log":
        positive = np.where(mask & (values > 0), values, np.inf).min(**keep)
        lo = np.maximum(np.where(np.isfinite(positive), positive, hi * LOG_FLOOR), hi * LOG_FLOOR)
    else:
        lo = np.zeros_like(hi)
    if scale == "log" and np.any(lo <= 0):
        raise InputError(f"vmin {vmin} must be positive on a log scale; pass e.g. vmin=1e-4.")
    hi = np.where(hi > lo, hi, lo + np.maximum(np.abs(lo), 1.0) * 1e-6)
    if scale == "log":
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(np.where(values > 0, values, lo))
        out = (logs - np.log(lo)) / (np.log(hi) - np.log(lo))
    else:
        out = (values - lo) / (hi - lo)
        if scale == "power":
            out = np.clip(out, 0.0, 1.0) ** gamma  # above the range draws as its top either way
    clipped = _clipped(values, lo, hi, shown)
    if scale == "log":
        clipped["below"] = bool(np.any(np.broadcast_to(True if shown is None else shown, values.shape)
                                       & (values > 0) & (values < lo * (1 - 1e-9))))
    if per_head:
        color = ColorScale(scale, lo, hi, gamma, per_head=True, **clipped)
    else:
        color = ColorScale(scale, float(lo), float(hi), gamma, **clipped)
    return out, color


def normalise_difference(values: np.ndarray, in_range: np.ndarray, *, vmax=None,
                         per_head: bool = False, shown=None) -> tuple[np.ndarray, ColorScale]:
    """Signed `"l h q k"` differences -> [0, 1] on a symmetric range `[-m, m]`, `m` = max |value| in range
    (or `vmax`), 0 at the middle of the colormap."""
    axes = (-2, -1) if per_head else None
    mask = np.broadcast_to(in_range, values.shape)
    if vmax is None:
        bound = np.where(mask, np.abs(values), 0.0).max(axis=axes, keepdims=per_head)
    else:
        bound = np.asarray(float(vmax))
    bound = np.where(bound > 0, bound, 1e-12)
    out = (values / bound + 1.0) / 2.0
    clipped = _clipped(values, -bound, bound, shown)
    if per_head:
        return out, ColorScale("difference", -bound, bound, per_head=True, **clipped)
    return out, ColorScale("difference", -float(bound), float(bound), **clipped)


QUANTITIES = {"weights": "attention", "norms": "‖α f(x)‖"}


def range_and_grey(drawn: np.ndarray, sink_column: int, sink: str) -> tuple[np.ndarray, np.ndarray]:
    """(cells that set an automatic colour range, cells drawn grey) for the `sink` option of a
    `"... q k"` mask of drawn cells: "keep" puts the first-token column in the range, "exclude" leaves
    it out of the range (still coloured), "mask" also draws it grey."""
    column = np.zeros(drawn.shape[-1], dtype=bool)
    if sink != "keep":
        column[sink_column] = True
    in_range = drawn & ~column
    grey = drawn & column if sink == "mask" else np.zeros(drawn.shape, bool)
    return in_range, grey


def compose(index: np.ndarray, table: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Lay `"l h q k"` LUT indices out as one RGBA canvas `(y, x, 4)` uint8.

    `rows[y]` is the `(l q)` row drawn at pixel row y, `cols[x]` the `(h k)` column at pixel column x;
    `-1` means gutter (background), `-2` a KV-group separator. Integer repeats of each index give
    crisp square cells; two `take`s over a `uint32` view, columns first so that the full-size pass
    copies whole rows.
    """
    native = table[einops.rearrange(index, "l h q k -> (l q) (h k)")]
    n_rows, n_cols = native.shape
    extended = np.empty((n_rows + 1, n_cols + 2), dtype=np.uint32)
    extended[:n_rows, :n_cols] = native
    extended[:, n_cols] = table[BACKGROUND]  # gutter column (index -2 after the shift below)
    extended[:, n_cols + 1] = table[SEPARATOR]
    extended[n_rows, :n_cols] = table[BACKGROUND]
    col_index = np.where(cols == -1, n_cols, np.where(cols == -2, n_cols + 1, cols))
    row_index = np.where(rows < 0, n_rows, rows)
    canvas = extended.take(col_index, axis=1).take(row_index, axis=0)
    return canvas.view(np.uint8).reshape(len(rows), len(cols), 4)
