"""TransformerLens head scores measured where they are defined: on a repeated-random-token sequence."""

from __future__ import annotations

import pandas as pd
import torch

from llm_heatmap.probes import capture
from llm_heatmap.probes.capture import forward_kwargs

from llm_heatmap.analyses.heads.head_detector import SCORE_COLUMNS, head_detector_scores, repeated_random_tokens


def induction_probe_scores(model, tokenizer, *, spec=None, length: int = 50, seed: int = 0,
                           exclude_bos: bool = True) -> pd.DataFrame:
    """Previous-token, duplicate-token and induction scores of every head on BOS + R + R.

    R is `length` random tokens of the model's own vocabulary (`repeated_random_tokens`), so the
    second half can only be predicted by copying: an induction head scores near 1 there, whatever
    the prompt. Columns: layer, head, kv_group, probe_previous_token_score,
    probe_duplicate_token_score, probe_induction_score.
    """
    ids = repeated_random_tokens(tokenizer, length, seed)
    with torch.no_grad(), capture(model, spec=spec, tokenizer=tokenizer) as probe:
        model(**forward_kwargs(model, ids, torch.ones_like(ids)))
    scores = head_detector_scores(probe.cube(ids, tokenizer=tokenizer), exclude_bos=exclude_bos)
    return scores.rename(columns={name: f"probe_{name}" for name in SCORE_COLUMNS})
