"""Metrics over an `AttentionCube` and runs over prompt sets, in rooms by concept:

- `heads/`: per-head metrics, TransformerLens head scores, the induction and retrieval probes, a prompt measured in
  one call;
- `similarity/`: divergences between heads, KV-group similarity and its report, head maps;
- `maps/`: query-key maps, rollout, and one query's attention over an image's patches;
- `stats.py`: the one statistics module (bootstrap intervals, permutation tests, interval means);
- `runs/`: the resumable prompt-set run engine, prompt files, output files, and the batch run;
- `atlas/`: the head atlas over a prompt set and its summary tables;
- `compare.py`: two prompts or two prompt sets; `bounds.py`: option bounds and measure names.
"""

from llm_heatmap.lazy import lazy_exports

_MODULES = {
    ".atlas.run": ("AtlasResult", "run_atlas"),
    ".runs.batch": ("BatchResult", "read_batch", "run_batch"),
    ".runs.engine": ("PromptSetRun", "RunOptions", "Section", "run_per_prompt", "run_prompt_set"),
    ".runs.prompts": ("Prompt", "read_prompts"),
    ".similarity.kv_report": ("KVReport", "kv_report"),
    ".compare": ("compare_cubes", "compare_sets"),
    ".heads.head_detector": ("detection_patterns", "head_detector_scores", "repeated_random_tokens"),
    ".heads.induction_probe": ("induction_probe_scores",),
    ".heads.needle": ("Needle",),
    ".heads.retrieval_probe": ("RetrievalScores", "retrieval_head_scores"),
    ".similarity.kv_similarity": ("HeadSimilarity", "head_similarity_matrix", "kv_group_similarity",
                       "layer_similarity"),
    ".heads.measure": ("measure_prompt", "stream_head_metrics"),
    ".heads.metrics": ("HeadMetricsReducer", "head_metrics"),
    ".heads.patterns": ("classify_heads", "is_special_token", "segment_ids", "special_token_mask"),
    ".maps.image_maps": ("ImageMaps", "head_image_maps", "layer_image_maps"),
    ".maps.qk_maps": ("QKMap", "layer_maps", "qk_map"),
    ".maps.rollouts": ("rollout",),
    ".stats": ("bootstrap_means", "group_gap", "paired_statistics", "set_statistics"),
}

__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
__all__ = [name for names in _MODULES.values() for name in names]
