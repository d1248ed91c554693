"""Metrics over an `AttentionCube`: per-head tables, TransformerLens head scores, KV-group similarity,
rollout, query-key maps, comparisons of prompts and prompt sets."""

from llm_heatmap.lazy import lazy_exports

_MODULES = {
    ".compare": ("compare_cubes", "compare_sets"),
    ".head_detector": ("detection_patterns", "head_detector_scores", "repeated_random_tokens"),
    ".induction_probe": ("induction_probe_scores",),
    ".kv_similarity": ("HeadSimilarity", "group_gap", "head_similarity_matrix", "kv_group_similarity",
                       "layer_similarity"),
    ".measure": ("measure_prompt", "stream_head_metrics"),
    ".metrics": ("HeadMetricsReducer", "head_metrics"),
    ".patterns": ("classify_heads", "is_special_token", "segment_ids", "special_token_mask"),
    ".qk_maps": ("QKMap", "layer_maps", "qk_map"),
    ".rollouts": ("rollout",),
}

__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
__all__ = [name for names in _MODULES.values() for name in names]
