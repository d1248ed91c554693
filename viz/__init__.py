"""Turning attention cubes and per-head tables into images: the all-heads grid, detail figures, the HTML view."""

from .figures import (plot_comparison, plot_head, plot_heads, plot_kv_group, plot_kv_similarity, plot_metric_map,
                      plot_rollout, save_figure)
from .grid import DrawnGrid, GridLayout, plot_grid, plot_grid_difference, save_grid, save_grid_difference
from .html import HtmlView, html_view, write_html
from .qk_figures import plot_qk_map, plot_qk_maps
from .style import GridStyle

__all__ = ["DrawnGrid", "GridLayout", "GridStyle", "HtmlView", "html_view", "plot_comparison", "plot_grid",
           "plot_grid_difference", "plot_head", "plot_heads", "plot_kv_group", "plot_kv_similarity", "plot_metric_map",
           "plot_qk_map", "plot_qk_maps", "plot_rollout", "save_figure", "save_grid", "save_grid_difference", "write_html"]
