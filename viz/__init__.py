"""Turning attention cubes and per-head tables into images: the all-heads grid, detail figures, the HTML view."""

from llm_heatmap.lazy import lazy_exports

_MODULES = {
    ".atlas": ("atlas_view", "write_atlas"),
    ".decode": ("decode_view",),
    ".figures": ("plot_comparison", "plot_head", "plot_heads", "plot_kv_group", "plot_kv_similarity",
                 "plot_metric_map", "plot_rollout", "save_figure"),
    ".grid": ("DrawnGrid", "GridLayout", "plot_grid", "plot_grid_difference", "save_grid", "save_grid_difference"),
    ".html": ("HtmlView", "html_view", "sites_view", "write_html"),
    ".overlays": ("plot_layer_overlays", "plot_overlays"),
    ".qk_figures": ("plot_qk_map", "plot_qk_maps"),
    ".retrieval_figures": ("plot_retrieval_probe",),
    ".style": ("GridStyle",),
    ".tables": ("metric_table",),
}

__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
__all__ = [name for names in _MODULES.values() for name in names]
