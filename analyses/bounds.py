"""The bounds of the analyses' numeric options and the names of their measures, each rule once: the functions that take an option check it
here, and the CLI calls the same checks before it loads anything (this module imports nothing heavy).
Every message names the API parameter (`n_resamples=0 ...`), which the CLI shows as its flag."""

from __future__ import annotations

import math

from llm_heatmap.choices import PROJECTIONS
from llm_heatmap.errors import InputError

MEASURES = ("js", "cosine", "pearson")  # KV-group similarity of the heads that share a KV head
HEAD_MEASURES = ("js", "hellinger")  # all-heads divergence of the atlas
PSEUDO_GROUP_SIZE = 3  # consecutive heads per pseudo-group of an MHA model when no GQA model gives a group size
# the columns of a head-metrics table (analyses.metrics builds its table in this order; the value-norm ones
# follow where value norms were captured), named here so that the CLI checks --metric without importing torch
METRIC_TABLE_COLUMNS = (
    "layer", "head", "kv_group", "entropy", "norm_entropy", "effective_keys", "effective_keys_frac", "max_weight",
    "sink_score", "sink_score_no_q0", "sink_head", "prev_token_mass", "current_token_mass", "next_token_mass",
    "mean_distance", "distance_ratio", "special_mass", "local_mass", "diagonal_score", "block_score",
    "vertical_score", "vertical_key", "previous_token_score", "duplicate_token_score", "induction_score",
    "pattern_class", "n_rows")
METRIC_NORM_COLUMNS = ("norm_sink_score", "norm_sink_score_no_q0", "noop_sink", "norm_weighted_entropy", "output_norm")
# the columns of a site's table (heads.measure.site_metrics): a cross-attention site's instead of the head metrics,
# a patch site's (vision metrics) and a VLM language model's (image share) beside them
CROSS_METRIC_COLUMNS = ("alignment", "monotonicity", "coverage", "source_entropy")
SITE_METRIC_COLUMNS = (*CROSS_METRIC_COLUMNS, "attention_distance", "attention_distance_px", "spatial_entropy",
                       "cls_mass", "register_mass", "patch_share", "image_share", "text_rows")
DETECTOR_SCORES = ("previous_token_score", "duplicate_token_score", "induction_score")
RETRIEVAL_SCORES = ("retrieval_score", "retrieval_copies")  # the retrieval probe's columns, as probe_*
MIN_NEEDLE_CONTEXT = 32  # tokens: shorter, a needle is most of its haystack
PROJECTION_PACKAGES = {"tsne": ("scikit-learn", "sklearn"), "umap": ("umap-learn", "umap")}  # (pip name, import name)


def metric_choices(*, probe: bool = False, retrieval: bool = False, sites: bool = False) -> list[str]:
    """Every column a head-metrics table can hold besides its keys (with value norms, as the CLI computes
    it; `probe`: also the induction probe's `probe_*` scores; `retrieval`: the retrieval probe's; `sites`: a
    site's columns), for checking metric names before any work."""
    probe_columns = [f"probe_{name}" for name in DETECTOR_SCORES] if probe else []
    probe_columns += [f"probe_{name}" for name in RETRIEVAL_SCORES] if retrieval else []
    site_columns = list(SITE_METRIC_COLUMNS) if sites else []
    return [c for c in (*METRIC_TABLE_COLUMNS, *METRIC_NORM_COLUMNS) if c not in ("layer", "head", "kv_group")] + \
        probe_columns + site_columns


def check_needle_grid(context_lengths, depths) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The retrieval probe's grid: context lengths of at least `MIN_NEEDLE_CONTEXT` tokens, depths in 0..1."""
    lengths, depths = tuple(int(n) for n in context_lengths), tuple(float(d) for d in depths)
    if not lengths or not depths:
        raise InputError("the retrieval probe needs at least one context length and one needle depth.")
    if min(lengths) < MIN_NEEDLE_CONTEXT:
        raise InputError(f"context length {min(lengths)} is too short for a needle in a haystack; use "
                         f"{MIN_NEEDLE_CONTEXT} tokens or more.")
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise InputError(f"needle depths {list(depths)} must lie in 0..1 (0: the document's start, 1: its end).")
    return lengths, depths


def check_projection(method) -> None:
    """A query-key map projection that is known and whose package is installed."""
    import importlib.util

    if method not in PROJECTIONS:
        raise InputError(f"method={method!r} is not a projection; use one of {', '.join(PROJECTIONS)}.")
    package = PROJECTION_PACKAGES.get(method)
    if package is not None and importlib.util.find_spec(package[1]) is None:
        raise InputError(f"method={method!r} needs {package[0]}, which is not installed; "
                         "pip install 'llm-heatmap[maps]', or use method='pca'.")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_DRAWS = 100_000  # bootstrap resamples or permutations: each draw is one row of a (draws, prompts) array
MAX_INDEX = 2**16 - 1  # the largest layer or head index an option may name (before any model says how many)


def at_least(name: str, value, low: int, meaning: str = "", *, high: int | None = None) -> None:
    """`value` is a whole number of at least `low` (and at most `high`)."""
    if not _whole(value) or value < low:
        raise InputError(f"{name}={value!r} must be a whole number of at least {low}{meaning}.")
    if high is not None and value > high:
        raise InputError(f"{name}={value!r} must be a whole number between {low} and {high}{meaning}.")


def check_confidence(confidence) -> None:
    ok = isinstance(confidence, (int, float)) and not isinstance(confidence, bool) and math.isfinite(confidence)
    if not ok or not 0 < confidence < 1:
        raise InputError(f"confidence={confidence!r} must lie between 0 and 1 (both excluded), e.g. 0.95.")


def check_statistics(*, n_resamples=None, n_permutations=None, confidence=None, seed=None) -> None:
    """Bootstrap resamples and label permutations (1 to `MAX_DRAWS` each: checked before their arrays are
    made), the interval's confidence level (between 0 and 1) and the random seed (a whole number of at
    least 0); an argument left None is not checked."""
    if n_resamples is not None:
        at_least("n_resamples", n_resamples, 1, high=MAX_DRAWS)
    if n_permutations is not None:
        at_least("n_permutations", n_permutations, 1, high=MAX_DRAWS)
    if confidence is not None:
        check_confidence(confidence)
    if seed is not None:
        at_least("seed", seed, 0)


def check_pseudo_group_size(pseudo_group_size) -> None:
    """None (the default grouping) or pseudo-groups of at least 2 heads (a group of one has no pairs)."""
    if pseudo_group_size is not None:
        at_least("pseudo_group_size", pseudo_group_size, 2, " (a group of one head has no pair to compare)")


def pseudo_group_size_of(head_counts, chosen: int | None = None) -> int:
    """`chosen`, else the group size of the first GQA model among `head_counts` ((query heads, KV heads) per
    model, in order), else `PSEUDO_GROUP_SIZE`."""
    if chosen is not None:
        return chosen
    return next((heads // kv for heads, kv in head_counts if 1 < kv < heads), PSEUDO_GROUP_SIZE)


def check_head_measure(measure) -> None:
    """One of `HEAD_MEASURES`."""
    if measure not in HEAD_MEASURES:
        raise InputError(f"measure={measure!r} is not known; use one of {', '.join(HEAD_MEASURES)}.")
