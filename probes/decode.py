"""`capture_decode`: what every head looked at while the model generated each token, from the kernel itself.

    steps = capture_decode(model, tokenizer, "The capital of France is", max_new_tokens=8)
    steps.rows[s]            # "l h k": step s's query row over positions 0..p (p = its query's position)
    steps.cube()             # "l h s T": the steps' rows over every position, an AttentionCube

`generate()` runs with the model's own cache (dynamic, static, sliding-window, quantized: whatever
`generate_options` choose) while the probe listens to each kernel call, keeping only the last query row
of each forward pass: the prefill's last row produced the first new token, each decode forward's one row
the next. Nothing T x T is held: a step costs `layers x heads x keys` numbers.

Key positions: a layer whose kernel saw k keys at a step whose query stands at position p saw positions
0..p when its cache holds every earlier key (dynamic cache; a static cache's slots past p are empty and
dropped), and the last k positions p-k+1..p when it keeps a window (sliding-window layers keep the most
recent keys, oldest first). Each layer's row is placed at those positions, so the layers of a hybrid
model (Gemma 3: sliding and full layers) share one axis; a key a layer did not see has weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec
from llm_heatmap.models.offline import source_name

from .capture import capture, encode_prompt, token_strings
from .cube import AttentionCube


def step_key_positions(position: int, keys: int) -> torch.Tensor:
    """The sequence positions of the `keys` keys a step at `position` saw (module docstring)."""
    if keys >= position + 1:
        return torch.arange(position + 1)
    return torch.arange(position - keys + 1, position + 1)


def placed_rows(layer_rows: list[torch.Tensor], position: int) -> torch.Tensor:
    """`"l h k"` over positions 0..`position`: each layer's `"h k_l"` row placed at the positions it saw."""
    placed = layer_rows[0].new_zeros(len(layer_rows), layer_rows[0].shape[0], position + 1)
    for layer, row in enumerate(layer_rows):
        positions = step_key_positions(position, row.shape[-1])
        placed[layer, :, positions] = row[:, :len(positions)]  # a static cache's slots past `position` are empty
    return placed


class _LastRows:
    """A consumer keeping, per forward pass, the last query row of every captured layer (`"l h k"`)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.passes: dict[int, list[torch.Tensor]] = {}

    def consume(self, part: AttentionCube) -> None:
        info = part.stream
        if info.row_stop != info.num_queries:
            return  # a block of prefill rows before the last one
        # parts of one pass arrive layer by layer, first captured layer first; "... h q k" -> "h k"
        row = part.pattern.reshape(-1, *part.pattern.shape[-2:])[:, -1]
        self.passes.setdefault(info.pass_index, []).append(row.to("cpu", self.dtype))

    def finish(self) -> None:
        pass


@dataclass
class DecodeSteps:
    """The decode steps of one generation (module docstring): `sequence` (prompt then generated ids),
    `prompt_tokens`, per step `rows` ("l h k" over positions 0..p), the captured `layers` and `heads`."""

    sequence: torch.Tensor
    prompt_tokens: int
    rows: list[torch.Tensor]
    spec: ModelSpec
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    tokens: list[str]
    prompt: str | None = None
    source: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.rows)

    @property
    def generated(self) -> torch.Tensor:
        return self.sequence[self.prompt_tokens:]

    def __repr__(self) -> str:
        return (f"DecodeSteps({self.num_steps} steps after {self.prompt_tokens} prompt tokens, "
                f"{len(self.layers)} layers x {len(self.heads)} heads, {self.source or self.spec.model_type})")

    def _repr_html_(self) -> str:
        from llm_heatmap.viz.decode import decode_view

        return decode_view(self)._repr_html_()

    def top_keys(self) -> torch.Tensor:
        """long `"s l h"`: the sequence position of each head's most-attended key at each step."""
        return torch.stack([row.argmax(-1) for row in self.rows])

    def cube(self) -> AttentionCube:
        """`"l h s T"`: every step's row placed over the whole final sequence (keys a step did not see are 0);
        query row s stands at position `prompt_tokens - 1 + s`, the one that produced generated token s."""
        length = len(self.sequence)
        pattern = torch.zeros(len(self.layers), len(self.heads), self.num_steps, length, dtype=torch.float32)
        for step, row in enumerate(self.rows):
            pattern[:, :, step, :row.shape[-1]] = row.float()
        query_positions = torch.arange(self.num_steps) + self.prompt_tokens - 1
        generated = torch.arange(length) >= self.prompt_tokens
        return AttentionCube(pattern=pattern, spec=self.spec, tokens=self.tokens, token_ids=self.sequence,
                             layers=self.layers, heads=self.heads, query_positions=query_positions,
                             key_mask=torch.ones(length, dtype=torch.bool),
                             query_mask=torch.ones(self.num_steps, dtype=torch.bool), generated=generated,
                             prompt=self.prompt, source=self.source, metadata=self.metadata)


def capture_decode(model: nn.Module, tokenizer, prompt, *, max_new_tokens: int = 20, chat: bool = False,
                   spec: ModelSpec | None = None, layers=None, heads=None, dtype: torch.dtype = torch.float32,
                   source: str | None = None, **generate_options) -> DecodeSteps:
    """Generate from `prompt` (one string) and keep every decode step's attention rows (module docstring).

    `generate_options` go to `model.generate` (do_sample, temperature, cache_implementation, ...); beam
    search (num_beams > 1) is refused: its steps reorder the cache between hypotheses, so a step's row
    belongs to no single output. `dtype` stores the rows (float16 halves the memory)."""
    if not hasattr(model, "generate") or model.get_output_embeddings() is None:
        raise InputError(f"{type(model).__name__} cannot generate text; pass a causal language model with an LM head.")
    if not isinstance(prompt, str) and not chat:
        raise InputError("capture_decode takes one prompt string; call it once per prompt.")
    if int(max_new_tokens) < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    if int(generate_options.get("num_beams", 1) or 1) > 1:
        raise InputError("beam search (num_beams > 1) reorders the cache between hypotheses, so a step's attention "
                         "belongs to no single output; generate greedily or by sampling (num_beams=1).")
    if int(generate_options.get("num_return_sequences", 1) or 1) > 1:
        raise InputError("capture_decode follows one generated sequence; pass num_return_sequences=1.")
    input_ids, attention_mask = encode_prompt(tokenizer, prompt, chat=chat)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    recorder = _LastRows(dtype)
    probe = capture(model, spec=spec, layers=layers, heads=heads, last_queries=1, keep=False, compute_output=False,
                    value_norms=False, consumers=[recorder])
    with torch.no_grad(), probe:
        sequence = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  max_new_tokens=int(max_new_tokens), pad_token_id=pad, **generate_options)
    sequence = sequence[0].cpu()
    prompt_tokens = input_ids.shape[-1]
    steps = len(sequence) - prompt_tokens
    passes = [recorder.passes[index] for index in sorted(recorder.passes)][:steps]
    rows = [placed_rows(layers_rows, prompt_tokens - 1 + step) for step, layers_rows in enumerate(passes)]
    return DecodeSteps(sequence=sequence, prompt_tokens=prompt_tokens, rows=rows,
                       spec=probe.spec, layers=probe.layers, heads=probe.heads,
                       tokens=token_strings(sequence, tokenizer), prompt=prompt if isinstance(prompt, str) else None,
                       source=source or source_name(model), metadata={"generation": {"max_new_tokens": int(max_new_tokens),
                                                               "prompt_tokens": int(prompt_tokens),
                                                               "generated_tokens": int(steps),
                                                               **{k: repr(v) for k, v in generate_options.items()}}})
