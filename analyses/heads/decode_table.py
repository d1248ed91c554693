"""`decode_step_table`: one row per decode step x head of a generation (`probes.capture_decode`)."""

from __future__ import annotations

import pandas as pd
import torch
from einops import rearrange


def decode_step_table(steps) -> pd.DataFrame:
    """Per step (the row that wrote generated token `token` at `position + 1`) and head: the most-attended
    position `top_key`, its token and weight, and the row's entropy in nats (`-sum_k A_k ln A_k`)."""
    group = max(1, steps.spec.num_heads // steps.spec.num_kv_heads)
    frames = []
    for step, row in enumerate(steps.rows):
        row = row.double()
        weight, key = row.max(-1)
        entropy = torch.special.entr(row).sum(-1)
        layers, heads = (rearrange(torch.tensor(v), f"{a} -> {b}") for v, a, b in
                         ((steps.layers, "l", "l 1"), (steps.heads, "h", "1 h")))
        position = steps.prompt_tokens - 1 + step
        frames.append(pd.DataFrame({
            "step": step, "position": position, "token": steps.tokens[position + 1],
            "layer": layers.expand_as(key).reshape(-1).numpy(), "head": heads.expand_as(key).reshape(-1).numpy(),
            "top_key": key.reshape(-1).numpy(), "top_weight": weight.reshape(-1).numpy(),
            "entropy": entropy.reshape(-1).numpy()}))
    table = pd.concat(frames, ignore_index=True)
    table.insert(5, "kv_group", table["head"] // group)
    table.insert(7, "top_key_token", [steps.tokens[k] for k in table["top_key"]])
    return table
