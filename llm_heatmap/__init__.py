"""llm-heatmap: every attention head of a transformer as a `[layer, head, query, key]` cube, drawn and measured.

    import llm_heatmap as lh

    model, tokenizer, spec = lh.load_model("smollm2-135m")
    cube = lh.capture_prompt(model, tokenizer, "The cat sat on the mat.")
    table = lh.head_metrics(cube)
    lh.save_grid(cube, "grid.png")
    lh.view("smollm2-135m", "The cat sat on the mat.")   # in a notebook: the interactive view, inline

The rooms are `llm_heatmap.models`, `.probes`, `.analyses`, `.viz` and `.cli`; the names below are
theirs, imported on first use so that `import llm_heatmap` (and `llm-heatmap --help`) stays light.
"""

from .errors import InputError
from .lazy import lazy_exports

__version__ = "0.1.0"

_MODULES = {
    "llm_heatmap.models": ("load_model", "ModelSpec", "spec_from_model", "processed_pictures"),
    "llm_heatmap.probes": ("AttentionCube", "CaptureOptions", "Probe", "capture", "capture_prompt", "capture_generate",
                           "capture_decode", "DecodeSteps", "capture_decode_sites", "capture_lens", "capture_sites",
                           "Downsampler"),
    "llm_heatmap.analyses": ("head_metrics", "HeadMetricsReducer", "measure_prompt", "kv_group_similarity",
                             "head_similarity_matrix", "rollout", "qk_map", "compare_cubes", "compare_sets",
                             "read_prompts", "run_batch", "run_atlas", "kv_report", "retrieval_head_scores",
                             "head_image_maps", "layer_image_maps"),
    "llm_heatmap.viz": ("GridStyle", "plot_grid", "save_grid", "html_view", "sites_view", "decode_view", "write_html",
                        "write_atlas", "plot_overlays", "plot_layer_overlays"),
    "llm_heatmap.analyses.importance.attribution": ("logit_attribution", "LogitAttribution"),
    "llm_heatmap.analyses.importance.knockout": ("Edges", "knocked_out", "knockout_effect", "knockout_scan"),
    "llm_heatmap.analyses.importance.contributions": ("token_contributions", "TokenContributions"),
    "llm_heatmap.analyses.importance.ablation": ("heads_replaced", "ablation_effect", "mean_head_outputs",
                                                 "head_ablation_rows", "run_head_ablation", "HeadAblation"),
    "llm_heatmap.notebook": ("view", "grid"),
}

__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
__all__ = ["InputError", "__version__", *(name for names in _MODULES.values() for name in names)]

