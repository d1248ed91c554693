"""Turning attention cubes and per-head tables into images: the all-heads grid and detail figures."""

from .grid import GridLayout, plot_grid, save_grid

__all__ = ["GridLayout", "plot_grid", "save_grid"]
