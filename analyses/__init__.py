"""Metrics over an `AttentionCube`: per-head tables, TransformerLens head scores, KV-group similarity,
rollout, query-key maps, comparisons of prompts and prompt sets."""

from llm_heatmap.lazy import lazy_exports

_MODULES = {
    ".compare": ("compare_cubes", "compare_sets"),
    ".heads.head_detector": ("detection_patterns", "head_detector_scores", "repeated_random_tokens"),
    ".heads.induction_probe": ("induction_probe_scores",),
    ".similarity.kv_similarity": ("HeadSimilarity", "head_similarity_matrix", "kv_group_similarity",
                       "layer_similarity"),
    ".heads.measure": ("measure_prompt", "stream_head_metrics"),
    ".heads.metrics": ("HeadMetricsReducer", "head_metrics"),
    ".heads.patterns": ("classify_heads", "is_special_token", "segment_ids", "special_token_mask"),
    ".maps.qk_maps": ("QKMap", "layer_maps", "qk_map"),
    ".maps.rollouts": ("rollout",),
    ".stats": ("bootstrap_means", "group_gap", "paired_statistics", "set_statistics"),
}

__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
__all__ = [name for names in _MODULES.values() for name in names]
