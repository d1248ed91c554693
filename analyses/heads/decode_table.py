"""Per decode step and head, what a head did while the model generated (`probes.capture_decode`).

    reducer = DecodeStepReducer()
    steps = capture_decode(model, tokenizer, prompt, consumers=[reducer], keep_rows=False)   # bounded memory
    reducer.table(steps)            # or decode_step_table(steps) when the rows were kept

Columns, one row per step x head: `step`, `position` (of the query row; it wrote the token at position + 1),
`token` (the one it wrote), `layer`, `head`, `kv_group`, `top_key` (the most-attended position), `top_key_token`,
`top_weight`, `entropy` (nats, `-sum_k A_k ln A_k` over the row), `first_token_mass` (the weight on position 0).
"""

from __future__ import annotations

import pandas as pd
import torch
from einops import rearrange

from llm_heatmap.errors import InputError
from llm_heatmap.probes.decode import StepConsumer


class DecodeStepReducer(StepConsumer):
    """The module's columns, computed as each step arrives; keeps a few numbers per step and head."""

    def __init__(self):
        self._steps: list[tuple[int, int, torch.Tensor]] = []

    def consume_step(self, step: int, position: int, rows: torch.Tensor) -> None:
        rows = rows.double()
        weight, key = rows.max(-1)
        values = torch.stack([key.double(), weight, torch.special.entr(rows).sum(-1), rows[..., 0]])
        self._steps.append((step, position, values))

    def table(self, steps) -> pd.DataFrame:
        """The table, with the tokens, layers and heads of `steps` (the `DecodeSteps` this reducer listened to)."""
        if len(self._steps) != steps.num_steps:
            raise InputError(f"this reducer saw {len(self._steps)} steps and the generation has {steps.num_steps}; "
                             "use a new DecodeStepReducer for each capture_decode.")
        layers, heads = torch.tensor(steps.layers), torch.tensor(steps.heads)
        frames = []
        for step, position, values in self._steps:
            key, weight, entropy, first = (rearrange(v, "l h -> (l h)").numpy() for v in values)
            frames.append(pd.DataFrame({
                "step": step, "position": position, "token": steps.tokens[position + 1],
                "layer": layers.repeat_interleave(len(heads)).numpy(), "head": heads.repeat(len(layers)).numpy(),
                "top_key": key.astype(int), "top_weight": weight, "entropy": entropy, "first_token_mass": first}))
        table = pd.concat(frames, ignore_index=True)
        table.insert(5, "kv_group", table["head"] // steps.spec.group_size)
        table.insert(7, "top_key_token", [steps.tokens[k] for k in table["top_key"]])
        return table


def decode_step_table(steps) -> pd.DataFrame:
    """The module's table from the rows a capture kept (`DecodeStepReducer` replayed over them)."""
    reducer = DecodeStepReducer()
    for step, rows in enumerate(steps.kept_rows()):
        reducer.consume_step(step, steps.prompt_tokens - 1 + step, rows)
    return reducer.table(steps)
