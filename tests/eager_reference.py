"""Cubes from eager `output_attentions=True` of a real model: the independent reference for captured patterns."""

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
