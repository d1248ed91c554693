"""`capture_decode`: what every head looked at while the model generated each token, from the kernel itself.

    steps = capture_decode(model, tokenizer, "The capital of France is", max_new_tokens=8)
    steps.rows[s]            # "l h k": step s's query row over positions 0..p (p = its query's position)
    steps.cube()             # "l h s T": the steps' rows over every position, an AttentionCube

`generate()` runs with the model's own cache (dynamic, static, sliding-window, quantized: whatever
`generate_options` choose) while the probe listens to each kernel call, keeping only the last query row
of each forward pass: the prefill's last row produced the first new token, each decode forward's one row
the next. Nothing T x T is held: a step costs `layers x heads x keys` numbers, and with `keep_rows=False`
nothing at all beyond what the step consumers keep as the steps arrive (`TopKeys(k)`, `PooledStrip(length, bins)`,
`analyses.heads.decode_table.DecodeStepReducer`).

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
from llm_heatmap.models import ModelSpec, spec_from_model
from llm_heatmap.models.offline import source_name

from .capture import capture, encode_prompt, select_indices, token_strings
from .cube import AttentionCube
from .geometry import bin_edges, edges_index


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


class StepConsumer:
    """What receives decode steps as they happen (`capture_decode(consumers=[...])`): `consume_step(step,
    position, rows)` with `rows` `"l h k"` over positions 0..`position` (module docstring), then `finish()`."""

    def consume_step(self, step: int, position: int, rows: torch.Tensor) -> None: ...

    def finish(self) -> None: ...


class TopKeys(StepConsumer):
    """Per step, each head's `k` most-attended positions and their weights: `positions` and `weights`
    `"s l h k"` (fewer than `k` where a step saw fewer keys: position -1, weight 0), memory k per head and step."""

    def __init__(self, k: int = 5):
        if int(k) < 1:
            raise InputError(f"k={k} must be at least 1 key per head.")
        self.k, self._positions, self._weights = int(k), [], []

    def consume_step(self, step: int, position: int, rows: torch.Tensor) -> None:
        weights, positions = rows.float().topk(min(self.k, rows.shape[-1]), dim=-1)
        missing = self.k - weights.shape[-1]
        self._weights.append(torch.nn.functional.pad(weights, (0, missing)))
        self._positions.append(torch.nn.functional.pad(positions, (0, missing), value=-1))

    @property
    def positions(self) -> torch.Tensor:
        return torch.stack(self._positions)

    @property
    def weights(self) -> torch.Tensor:
        return torch.stack(self._weights)


class PooledStrip(StepConsumer):
    """Each step's rows area-pooled onto at most `bins` bins of the positions 0..`length` - 1 (the bins the
    cube's downsampling cuts, `geometry.bin_edges`): `strip` `"s l h b"` holds each bin's summed weight, so a
    generation of any length is a fixed-width strip per head (`length`: prompt plus new tokens, or more)."""

    def __init__(self, length: int, bins: int = 256):
        if int(length) < 1 or int(bins) < 1:
            raise InputError(f"length={length} and bins={bins} must be positive.")
        self.edges = bin_edges(int(length), int(bins))
        self._index = edges_index(self.edges)
        self._rows: list[torch.Tensor] = []

    def consume_step(self, step: int, position: int, rows: torch.Tensor) -> None:
        if rows.shape[-1] > len(self._index):
            raise InputError(f"step {step} sees {rows.shape[-1]} positions, past the strip's length {len(self._index)}; "
                             "give PooledStrip a length of at least the prompt plus the new tokens.")
        pooled = rows.new_zeros(*rows.shape[:-1], len(self.edges) - 1)
        self._rows.append(pooled.index_add_(-1, self._index[:rows.shape[-1]], rows))

    @property
    def strip(self) -> torch.Tensor:
        return torch.stack(self._rows)


class _Steps:
    """The probe's consumer during generate(): each forward's last row of every captured layer (parts arrive layer
    by layer, first captured layer first), placed over positions 0..p once the pass is complete (`place`: the
    layers' rows and p -> `"l h k"`) and handed to the step consumers (and kept, with `keep`)."""

    def __init__(self, num_layers: int, prompt_tokens: int, consumers: list, keep: bool, dtype: torch.dtype,
                 place=placed_rows):
        self.num_layers, self.prompt_tokens, self.consumers, self.keep, self.dtype, self.place = \
            num_layers, prompt_tokens, consumers, keep, dtype, place
        self.rows: list[torch.Tensor] = []
        self._layers: list[torch.Tensor] = []

    def consume(self, part: AttentionCube) -> None:
        info = part.stream
        if info.row_stop != info.num_queries:
            return  # a block of prefill rows before the last one
        self._layers.append(part.pattern.reshape(-1, *part.pattern.shape[-2:])[:, -1].to("cpu", self.dtype))
        if len(self._layers) < self.num_layers:
            return
        step = info.pass_index
        position = self.prompt_tokens - 1 + step
        rows, self._layers = self.place(self._layers, position), []
        for consumer in self.consumers:
            consumer.consume_step(step, position, rows)
        if self.keep:
            self.rows.append(rows)

    def finish(self) -> None:
        for consumer in self.consumers:
            consumer.finish()


class Generated:
    """The steps of one generated `sequence` after its `prompt_tokens` (a decode capture's result)."""

    sequence: torch.Tensor
    prompt_tokens: int

    @property
    def num_steps(self) -> int:
        return len(self.sequence) - self.prompt_tokens

    @property
    def generated(self) -> torch.Tensor:
        return self.sequence[self.prompt_tokens:]


@dataclass
class DecodeSteps(Generated):
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

    def __repr__(self) -> str:
        return (f"DecodeSteps({self.num_steps} steps after {self.prompt_tokens} prompt tokens, "
                f"{len(self.layers)} layers x {len(self.heads)} heads, {self.source or self.spec.model_type})")

    def _repr_html_(self) -> str:
        from llm_heatmap.viz.decode import decode_view

        return decode_view(self)._repr_html_()

    def kept_rows(self) -> list[torch.Tensor]:
        """`rows`, refused in one sentence when the capture kept none (`keep_rows=False`)."""
        if not self.rows and self.num_steps:
            raise InputError("this generation kept no rows (keep_rows=False); capture again with keep_rows=True, or "
                             "pass the consumers you need (TopKeys, DecodeStepReducer) to capture_decode.")
        return self.rows

    def top_keys(self) -> torch.Tensor:
        """long `"s l h"`: the sequence position of each head's most-attended key at each step."""
        return torch.stack([row.argmax(-1) for row in self.kept_rows()])

    def cube(self) -> AttentionCube:
        """`"l h s T"`: every step's row placed over the whole final sequence (keys a step did not see are 0);
        query row s stands at position `prompt_tokens - 1 + s`, the one that produced generated token s."""
        length = len(self.sequence)
        pattern = torch.zeros(len(self.layers), len(self.heads), self.num_steps, length, dtype=torch.float32)
        for step, row in enumerate(self.kept_rows()):
            pattern[:, :, step, :row.shape[-1]] = row.float()
        query_positions = torch.arange(self.num_steps) + self.prompt_tokens - 1
        generated = torch.arange(length) >= self.prompt_tokens
        return AttentionCube(pattern=pattern, spec=self.spec, tokens=self.tokens, token_ids=self.sequence,
                             layers=self.layers, heads=self.heads, query_positions=query_positions,
                             key_mask=torch.ones(length, dtype=torch.bool),
                             query_mask=torch.ones(self.num_steps, dtype=torch.bool), generated=generated,
                             prompt=self.prompt, source=self.source, metadata=self.metadata)


def check_generation(max_new_tokens: int, generate_options: dict) -> None:
    """One generated sequence whose steps each belong to it: at least one new token, no beam search."""
    if int(max_new_tokens) < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    if int(generate_options.get("num_beams", 1) or 1) > 1:
        raise InputError("beam search (num_beams > 1) reorders the cache between hypotheses, so a step's attention "
                         "belongs to no single output; generate greedily or by sampling (num_beams=1).")
    if int(generate_options.get("num_return_sequences", 1) or 1) > 1:
        raise InputError("capture_decode follows one generated sequence; pass num_return_sequences=1.")


def capture_decode(model: nn.Module, tokenizer, prompt, *, max_new_tokens: int = 20, chat: bool = False,
                   spec: ModelSpec | None = None, layers=None, heads=None, dtype: torch.dtype = torch.float32,
                   source: str | None = None, consumers=(), keep_rows: bool = True, **generate_options) -> DecodeSteps:
    """Generate from `prompt` (one string) and keep every decode step's attention rows (module docstring).

    `generate_options` go to `model.generate` (do_sample, temperature, cache_implementation, ...); beam
    search (num_beams > 1) is refused: its steps reorder the cache between hypotheses, so a step's row
    belongs to no single output. `dtype` stores the rows (float16 halves the memory). `consumers`
    (`StepConsumer`s: `TopKeys`, `analyses.heads.decode_table.DecodeStepReducer`, your own) receive each step
    as it happens; with `keep_rows=False` no row is kept, so memory stays bounded however long the generation
    (`rows` is then empty)."""
    if not hasattr(model, "generate") or model.get_output_embeddings() is None:
        raise InputError(f"{type(model).__name__} cannot generate text; pass a causal language model with an LM head.")
    if getattr(model.config, "is_encoder_decoder", False):
        raise InputError(f"{type(model).__name__} is an encoder-decoder model, and capture_decode follows the steps of a "
                         "decoder-only model over its own prompt; capture its decoder and cross-attention steps with "
                         "capture_decode_sites (CLI: generate SOURCE), or a given target's with capture_sites (CLI: "
                         "grid SOURCE --target TEXT).")
    if not isinstance(prompt, str) and not chat:
        raise InputError("capture_decode takes one prompt string; call it once per prompt.")
    check_generation(max_new_tokens, generate_options)
    input_ids, attention_mask = encode_prompt(tokenizer, prompt, chat=chat)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    spec = spec or spec_from_model(model)
    recorder = _Steps(len(select_indices(layers, spec.num_layers, "layer")), input_ids.shape[-1], list(consumers),
                      keep_rows, dtype)
    probe = capture(model, spec=spec, layers=layers, heads=heads, last_queries=1, keep=False, compute_output=False,
                    value_norms=False, consumers=[recorder])
    with torch.no_grad(), probe:
        sequence = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                  max_new_tokens=int(max_new_tokens), pad_token_id=pad, **generate_options)
    sequence = sequence[0].cpu()
    prompt_tokens = input_ids.shape[-1]
    steps = len(sequence) - prompt_tokens
    return DecodeSteps(sequence=sequence, prompt_tokens=prompt_tokens, rows=recorder.rows[:steps],
                       spec=probe.spec, layers=probe.layers, heads=probe.heads,
                       tokens=token_strings(sequence, tokenizer), prompt=prompt if isinstance(prompt, str) else None,
                       source=source or source_name(model), metadata={"generation": {"max_new_tokens": int(max_new_tokens),
                                                               "prompt_tokens": int(prompt_tokens),
                                                               "generated_tokens": int(steps),
                                                               **{k: repr(v) for k, v in generate_options.items()}}})
