"""Metrics over an `AttentionCube`: per-head tables, TransformerLens head scores, KV-group similarity,
rollout, comparisons of prompts and prompt sets."""

from .compare import compare_cubes, compare_sets
from .head_detector import detection_patterns, head_detector_scores, repeated_random_tokens
from .induction_probe import induction_probe_scores
from .kv_similarity import HeadSimilarity, group_gap, head_similarity_matrix, kv_group_similarity, layer_similarity
from .metrics import HeadMetricsReducer, head_metrics
from .patterns import classify_heads, is_special_token, segment_ids, special_token_mask
from .rollout import rollout

__all__ = ["HeadMetricsReducer", "HeadSimilarity", "classify_heads", "compare_cubes", "compare_sets",
           "detection_patterns", "group_gap", "head_detector_scores", "head_metrics", "head_similarity_matrix",
           "induction_probe_scores", "is_special_token", "kv_group_similarity", "layer_similarity",
           "repeated_random_tokens", "rollout", "segment_ids", "special_token_mask"]
