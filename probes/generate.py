"""`capture_generate`: the attention cube of a generated continuation, generated tokens marked."""

from __future__ import annotations

import torch
from torch import nn

from llm_heatmap.errors import InputError

from .capture import capture, encode_prompt, forward_kwargs
from .cube import AttentionCube


def capture_generate(model: nn.Module, tokenizer, prompt, *, max_new_tokens: int = 20, do_sample: bool = False,
                     chat: bool = False, source: str | None = None, **capture_options) -> AttentionCube:
    """Generate from `prompt`, then capture the patterns of the whole final sequence.

    The model first generates as usual (no probe attached); one captured forward pass over
    prompt + generated tokens then gives every row. For a causal model row t of that pass is
    the pattern the model computed when it produced token t+1 during generation (up to the
    rounding of the KV-cached kernel), so the cube holds every generation step at once.
    `cube.generated` marks the generated positions.
    """
    if not getattr(model.config, "is_decoder", False) and not hasattr(model, "generate"):
        raise InputError(f"{type(model).__name__} cannot generate text; pass a causal language model.")
    if isinstance(prompt, (list, tuple)) and not chat:
        raise InputError("capture_generate takes one prompt string; call it once per prompt.")
    if int(max_new_tokens) < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    input_ids, attention_mask = encode_prompt(tokenizer, prompt, chat=chat)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        sequence = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  max_new_tokens=int(max_new_tokens), do_sample=do_sample, pad_token_id=pad)
    sequence = sequence[:1].cpu()
    mask = torch.ones_like(sequence)
    probe = capture(model, tokenizer=tokenizer, **capture_options)
    with torch.no_grad(), probe:
        model(**forward_kwargs(model, sequence, mask))
    cube = probe.cube(sequence, mask, tokenizer=tokenizer, prompt=prompt, source=source)
    cube.generated = torch.arange(sequence.shape[-1]) >= input_ids.shape[-1]
    cube.metadata["generation"] = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample),
                                   "prompt_tokens": int(input_ids.shape[-1]),
                                   "generated_tokens": int(sequence.shape[-1] - input_ids.shape[-1])}
    return cube
