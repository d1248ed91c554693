"""Every column of `head_metrics`, streamed during a capture and from a kept cube, against the float64
reference of `metrics_reference.py`, on the tiny families and both real models.

Tolerance: |ours - reference| <= 1e-5 + 1e-5 * |reference| for every numeric column (a block of rows
is reduced in float32, so long-range sums such as `mean_distance`, hundreds at long prompts, are
good to float32's relative precision); integer and label columns are equal.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from llm_heatmap.analyses import HeadMetricsReducer, head_metrics
from llm_heatmap.analyses.heads.metrics import COLUMNS, NORM_COLUMNS
from llm_heatmap.probes import capture
from metrics_reference import ReferenceHeadMetrics, reference_head_metrics
from tiny_models import FAMILIES, SDPA_UNSUPPORTED, VOCAB, tiny_model

ATOL = RTOL = 1e-5
EXACT = ["layer", "head", "kv_group", "sink_head", "vertical_key", "pattern_class", "n_rows"]
NUMERIC = [c for c in COLUMNS if c not in EXACT]


def assert_matches_reference(table: pd.DataFrame, reference: pd.DataFrame) -> float:
    """Compare every column; return the largest absolute deviation of the numeric ones."""
    assert list(table.columns) == list(COLUMNS) + [c for c in NORM_COLUMNS if c in table.columns]  # tests/test_value_norms.py
    for column in EXACT:
        assert table[column].tolist() == reference[column].tolist(), column
    ours, expected = table[NUMERIC].to_numpy(float), reference[NUMERIC].to_numpy(float)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL)
    return float(np.abs(ours - expected).max())


def repeated_ids(length: int, seed: int) -> torch.Tensor:
    """Random tokens with a repeated stretch, so duplicate-token and induction pairs exist."""
    generator = torch.Generator().manual_seed(seed)
    half = torch.randint(0, VOCAB, (length // 2,), generator=generator)
    return torch.cat([half, half, torch.randint(0, VOCAB, (length - 2 * len(half),), generator=generator)])[None]


def assert_streamed_and_kept_match(model, ids, attention_mask=None, **options) -> None:
    """One forward pass: the table streamed to a reducer during the capture against the reference
    fed the same parts, and `head_metrics` of the kept cube against the reference of that cube."""
    reducer, reference = HeadMetricsReducer(**options), ReferenceHeadMetrics(**options)
    with torch.no_grad(), capture(model, consumers=[reducer, reference], chunk_rows=5) as probe:
        model(input_ids=ids, attention_mask=attention_mask)
    assert_matches_reference(reducer.table(), reference.table())
    cube = probe.cube(ids, attention_mask)
    assert_matches_reference(head_metrics(cube, **options), reference_head_metrics(cube, **options))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_families_streamed_and_kept_equal_the_reference(family):
    model = tiny_model(family, "eager" if family in SDPA_UNSUPPORTED else "sdpa")
    assert_streamed_and_kept_match(model, repeated_ids(23, seed=1))


@pytest.mark.parametrize("options", [{"exclude_bos": True}, {"exclude_current_token": True},
                                     {"exclude_bos": True, "exclude_current_token": True}])
def test_head_detector_exclusions_equal_the_reference(options):
    assert_streamed_and_kept_match(tiny_model("qwen2", "sdpa"), repeated_ids(20, seed=2), **options)


def test_left_padded_sequence_equals_the_reference():
    ids = repeated_ids(18, seed=3)
    mask = torch.ones_like(ids)
    mask[:, :4] = 0
    assert_streamed_and_kept_match(tiny_model("llama", "sdpa"), ids, attention_mask=mask)


def test_a_cube_with_weight_outside_its_mask_counts_only_the_mask():
    """Weights on cells no row may attend (junk, or a mask the model applied differently) are left out."""
    model = tiny_model("mistral", "sdpa")  # sliding window 5: both corners of a block can be outside
    ids = repeated_ids(16, seed=4)
    with torch.no_grad(), capture(model) as probe:
        model(input_ids=ids)
    cube = probe.cube(ids)
    cube.pattern = cube.pattern + 0.01
    reference = reference_head_metrics(cube)
    assert_matches_reference(head_metrics(cube, row_block=3), reference)


PROMPT = ("The cat sat on the mat. The dog sat on the rug. The cat saw the dog, and the dog saw the cat; "
          "then the cat sat on the rug and the dog sat on the mat.")


@pytest.mark.slow
@pytest.mark.parametrize("loaded", ["smollm2", "minilm"])
def test_real_models_streamed_and_kept_equal_the_reference(loaded, request):
    model, tokenizer, _ = request.getfixturevalue(loaded)
    encoded = tokenizer(PROMPT, return_tensors="pt")
    assert_streamed_and_kept_match(model, encoded["input_ids"], encoded["attention_mask"])


@pytest.mark.slow
def test_long_smollm2_prompt_streamed_equals_the_reference(smollm2):
    """At 1024 tokens float32 rounding accumulates over long rows; still inside the tolerance."""
    model, tokenizer, _ = smollm2
    ids = tokenizer(PROMPT * 40, return_tensors="pt")["input_ids"][:, :1024]
    reducer = HeadMetricsReducer()
    with torch.no_grad(), capture(model, consumers=[reducer], layers=[0, 7, 29]) as probe:
        model(input_ids=ids)
    assert_matches_reference(reducer.table(), reference_head_metrics(probe.cube(ids)))
