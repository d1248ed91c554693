"""llm-heatmap: every attention head of a transformer as a `[layer, head, query, key]` cube, drawn and measured.

    import llm_heatmap as lh

    model, tokenizer, spec = lh.load_model("smollm2-135m")
    cube = lh.capture_prompt(model, tokenizer, "The cat sat on the mat.")
    table = lh.head_metrics(cube)
    lh.save_grid(cube, "grid.png")

The rooms are `llm_heatmap.models`, `.probes`, `.analyses`, `.viz` and `.cli`; the names below are
theirs, imported on first use so that `import llm_heatmap` (and `llm-heatmap --help`) stays light.
"""

from .errors import InputError
from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "llm_heatmap.models",
    "ModelSpec": "llm_heatmap.models",
    "spec_from_model": "llm_heatmap.models",
    "AttentionCube": "llm_heatmap.probes",
    "capture": "llm_heatmap.probes",
    "capture_prompt": "llm_heatmap.probes",
    "capture_generate": "llm_heatmap.probes",
    "capture_lens": "llm_heatmap.probes",
    "Downsampler": "llm_heatmap.probes",
    "head_metrics": "llm_heatmap.analyses",
    "HeadMetricsReducer": "llm_heatmap.analyses",
    "kv_group_similarity": "llm_heatmap.analyses",
    "head_similarity_matrix": "llm_heatmap.analyses",
    "rollout": "llm_heatmap.analyses",
    "compare_cubes": "llm_heatmap.analyses",
    "GridStyle": "llm_heatmap.viz",
    "plot_grid": "llm_heatmap.viz",
    "save_grid": "llm_heatmap.viz",
    "write_html": "llm_heatmap.viz",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["InputError", "__version__", *_EXPORTS]
