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

import sys

from .errors import InputError
from .lazy import lazy_exports

__version__ = "0.1.0"

_MODULES = {
    "llm_heatmap.models": ("load_model", "ModelSpec", "spec_from_model"),
    "llm_heatmap.probes": ("AttentionCube", "capture", "capture_prompt", "capture_generate", "capture_lens", "capture_sites",
                           "Downsampler"),
    "llm_heatmap.analyses": ("head_metrics", "HeadMetricsReducer", "kv_group_similarity", "head_similarity_matrix",
                             "rollout", "compare_cubes"),
    "llm_heatmap.viz": ("GridStyle", "plot_grid", "save_grid", "write_html"),
    "llm_heatmap.notebook": ("view", "grid"),
}

__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
__all__ = ["InputError", "__version__", *(name for names in _MODULES.values() for name in names)]


def _show_cubes_in_a_running_notebook() -> None:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and hasattr(shell, "display_formatter"):
        from .notebook import register

        register(shell)


_show_cubes_in_a_running_notebook()
