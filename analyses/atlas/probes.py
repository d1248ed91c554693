"""The atlas's probes of one model on the site it characterises: the induction probe (TransformerLens's scores on
BOS + R + R) and the retrieval probe (needle prompts), where the site's table row (`sites.ATLAS_SITES`) says they
apply; the note of the asked-for probes that do not run comes from the same row (`sites.skipped_probes`).

On the decoder site of an encoder-decoder the probe's sequence is the decoder's input, teacher forced, with the
decoder start token in the BOS place, and the same sequence is the source: the scores are those of the decoder's
self-attention over BOS + R + R, whatever the cross-attention reads.
"""

from __future__ import annotations

import pandas as pd
import torch

from .sites import DECODER, atlas_site


def site_probe_scores(model, tokenizer, resolved, *, probe_length: int, retrieval_lengths: tuple[int, ...]) -> pd.DataFrame:
    """One row per head of `resolved` (a `runs.sites.ResolvedSite`) with the `probe_*` columns of the probes that run
    on it; columns layer and head alone where none does."""
    row = atlas_site(resolved.name)
    probe = pd.DataFrame(columns=["layer", "head"])
    if probe_length > 0 and row.induction_probe is None:
        probe = _induction(model, tokenizer, resolved, probe_length).drop(columns=["kv_group"])
    if retrieval_lengths and row.retrieval_probe is None:
        from llm_heatmap.analyses.heads.retrieval_probe import retrieval_head_scores

        retrieval = retrieval_head_scores(model, tokenizer, spec=resolved.spec, context_lengths=retrieval_lengths)
        retrieval = retrieval.heads.drop(columns=["kv_group"])
        probe = retrieval if probe.empty else probe.merge(retrieval, on=["layer", "head"])
    return probe


def _induction(model, tokenizer, resolved, length: int) -> pd.DataFrame:
    from llm_heatmap.analyses.heads.induction_probe import induction_probe_scores

    if resolved.name != DECODER:
        return induction_probe_scores(model, tokenizer, spec=resolved.spec, length=length)
    from llm_heatmap.analyses.heads.head_detector import SCORE_COLUMNS, head_detector_scores, repeated_random_tokens
    from llm_heatmap.probes import capture

    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        from llm_heatmap.errors import InputError

        raise InputError(f"{type(model).__name__} names no decoder_start_token_id in its config, so the induction probe "
                         "cannot build its decoder input; set it in config.json, or pass probe_length=0.")
    ids = repeated_random_tokens(tokenizer, length, 0)
    decoder_ids = ids.clone()
    decoder_ids[:, 0] = start
    device = next(model.parameters()).device
    with torch.no_grad(), capture(model, spec=resolved.spec, tokenizer=tokenizer) as probe:
        model(input_ids=ids.to(device), decoder_input_ids=decoder_ids.to(device), use_cache=False)
    scores = head_detector_scores(probe.cube(decoder_ids, tokenizer=tokenizer), exclude_bos=True)
    return scores.rename(columns={name: f"probe_{name}" for name in SCORE_COLUMNS})
