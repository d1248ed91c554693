"""Cubes from eager `output_attentions=True` of a real model, and torch's softmax with sinks: the independent
references for captured patterns."""

from __future__ import annotations

import torch

from llm_heatmap.probes import AttentionCube


def eager_cube(loaded, prompt: str, **fields) -> AttentionCube:
    """`loaded` = (model, tokenizer, spec) with the eager kernel; `fields` (source, ...) pass to the cube."""
    model, tokenizer, spec = loaded
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model(**encoded, output_attentions=True)
    ids = encoded["input_ids"][0]
    return AttentionCube.from_pattern(torch.stack(out.attentions, 1)[0].float(), spec, ids,
                                      tokenizer.convert_ids_to_tokens(ids), prompt=prompt, **fields)


def to_eager(model):
    """`model` with every (sub)config set to eager attention, so output_attentions returns weights."""
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"
    return model


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """torch's softmax over the last axis, with `sinks` (broadcast to `"... 1"`) as one more logit per row that
    joins the normaliser and is then dropped, as the kernels of families with attention sinks do."""
    if sinks is None:
        return torch.softmax(scores, -1)
    return torch.softmax(torch.cat([scores, sinks.expand(*scores.shape[:-1], 1)], -1), -1)[..., :-1]
