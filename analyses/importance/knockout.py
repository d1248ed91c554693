"""Attention knockout (Geva et al. 2023): cut chosen edges (query position -> key position, in chosen layers
and heads) inside the model's own attention kernel, and measure what the prediction loses.

The cut is made where the kernel reads its scores: for the duration of a `with knocked_out(...)` block the
model runs under a kernel key of ours, registered through transformers' public registries
(`AttentionInterface` for the kernel, `AttentionMaskInterface` for the mask). The mask function is the
model's own with the causal-skip shortcut turned off, so every layer receives a mask tensor; the kernel sets
the chosen cells of that mask to "blocked" for the chosen layers and heads and calls the model's original
kernel (sdpa, eager, or a tap wrapping them) with it. No eager fallback: an sdpa model stays on sdpa.
Both functions are registered once per process and act only for the block that is running; on exit the
model's own key is set back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from llm_heatmap.errors import InputError

KEY = "llm_heatmap_knockout"


@dataclass(frozen=True)
class Edges:
    """Edges from every query position in `queries` to every key position in `keys`, cut in `layers` and
    `heads` (None: all of them). Positions count from 0; negative ones from the end of the prompt."""

    queries: tuple[int, ...]
    keys: tuple[int, ...]
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None


def _blocked(edges: list[Edges], layer: int, num_heads: int, num_queries: int, num_keys: int) -> torch.Tensor | None:
    """`"h q k"` bool: the cells cut in `layer`, or None where nothing is cut there."""
    blocked = None
    for edge in edges:
        if edge.layers is not None and layer not in edge.layers:
            continue
        if blocked is None:
            blocked = torch.zeros(num_heads, num_queries, num_keys, dtype=torch.bool)
        heads = list(range(num_heads)) if edge.heads is None else list(edge.heads)
        rows = torch.tensor([q % num_queries for q in edge.queries])
        columns = torch.tensor([k % num_keys for k in edge.keys])
        blocked[torch.tensor(heads)[:, None, None], rows[None, :, None], columns[None, None, :]] = True
    return blocked


def _check_edges(edges: list[Edges], spec, length: int | None) -> None:
    """One sentence for an empty edge set or an index outside the model (and the prompt, where its length is known)."""
    for edge in edges:
        if not edge.queries or not edge.keys:
            raise InputError("a knockout edge set needs at least one query and one key position.")
        positions = () if length is None else (
            ("query position", edge.queries, -length, length, f"the prompt's {length} tokens"),
            ("key position", edge.keys, -length, length, f"the prompt's {length} tokens"))
        ranges = (*positions,
                  ("layer", edge.layers or (), 0, spec.num_layers, f"the model's {spec.num_layers} layers"),
                  ("head", edge.heads or (), 0, spec.num_heads, f"the model's {spec.num_heads} heads per layer"))
        for name, values, low, size, what in ranges:
            bad = [v for v in values if not low <= v < size]
            if bad:
                raise InputError(f"knockout {name} {bad[0]} is outside {what}; pass {low} to {size - 1}.")


def _cut(mask: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """The kernel's mask (`"b 1 q k"` or `"b h q k"`, bool "may attend" or additive float) with the blocked
    cells of `"h q k"` cut, widened to every head."""
    blocked = blocked.to(mask.device)
    batch, heads = mask.shape[0], blocked.shape[0]
    mask = mask[..., -blocked.shape[1]:, : blocked.shape[2]].expand(batch, heads, *blocked.shape[1:])
    if mask.dtype == torch.bool:
        cut = mask & ~blocked
        visible = cut.any(-1)
    else:
        cut = mask.masked_fill(blocked, torch.finfo(mask.dtype).min)
        visible = (cut > torch.finfo(mask.dtype).min / 2).any(-1)
    if not bool(visible.all()):
        raise InputError("the knockout cuts every key a query position may see, which leaves its attention "
                         "undefined; keep at least one key visible to each query (e.g. the first token).")
    return cut


@dataclass
class _Plan:
    """The knockout of the running `with knocked_out(...)` block."""

    original: str  # the model's own kernel key
    original_mask: object
    layer_of: dict
    edges: list[Edges]
    cache: dict


_active: _Plan | None = None  # set only inside a `with knocked_out(...)` block


def _mask_with_every_cell(*args, **kwargs):
    """The model's own mask function, told not to skip the mask (so the kernel always receives one)."""
    for shortcut in ("allow_is_causal_skip", "allow_is_bidirectional_skip"):
        if shortcut in kwargs:
            kwargs[shortcut] = False
    return _active.original_mask(*args, **kwargs)


def _knockout_attention(module, query, key, value, attention_mask, *args, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from llm_heatmap.probes.tap import eager_default

    plan = _active
    kernel = ALL_ATTENTION_FUNCTIONS.get(plan.original) or eager_default(module)
    layer = plan.layer_of.get(module)
    if layer is not None:
        shape = (layer, query.shape[1], query.shape[2], key.shape[2])
        if shape not in plan.cache:
            plan.cache[shape] = _blocked(plan.edges, *shape)
        if plan.cache[shape] is not None:
            if attention_mask is None:
                raise InputError(f"layer {layer} received no attention mask, so its edges cannot be cut; load the "
                                 "model with attn_implementation='sdpa' or 'eager'.")
            attention_mask = _cut(attention_mask, plan.cache[shape])
    return kernel(module, query, key, value, attention_mask, *args, **kwargs)


def _register() -> None:
    """Put our kernel and mask function in transformers' registries under KEY (once per process; they act
    only inside a `with knocked_out(...)` block, which is the only time a model runs under KEY)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if AttentionInterface().get(KEY) is not _knockout_attention:
        AttentionInterface.register(KEY, _knockout_attention)
    if AttentionMaskInterface().get(KEY) is not _mask_with_every_cell:
        AttentionMaskInterface.register(KEY, _mask_with_every_cell)


@contextlib.contextmanager
def knocked_out(model: nn.Module, edges: list[Edges], spec=None):
    """Run `model` inside the block with `edges` cut in its attention kernel."""
    global _active
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from llm_heatmap.models import spec_from_model

    spec = spec or spec_from_model(model)
    _check_edges(list(edges), spec, None)
    original = model.config._attn_implementation
    if _active is not None or original == KEY:
        raise InputError("a knockout is already running in this process; run knockouts one after another, not nested.")
    if original not in ALL_MASK_ATTENTION_FUNCTIONS or original.startswith(("flash", "paged")):
        raise InputError(f"the {original} kernel receives no score mask that a knockout can edit; load the model "
                         "with attn_implementation='sdpa' or 'eager'.")
    _register()
    layer_of = {model.get_submodule(path): layer for layer, path in enumerate(spec.attention_modules)}
    _active = _Plan(original, ALL_MASK_ATTENTION_FUNCTIONS[original], layer_of, list(edges), {})
    try:
        model.set_attn_implementation(KEY)
        yield model
    finally:
        model.set_attn_implementation(original)
        _active = None


@dataclass
class KnockoutEffect:
    """The target's log-probability at `position` with and without the cut edges."""

    target_id: int
    target: str
    position: int
    log_prob: float
    knocked_log_prob: float

    @property
    def change(self) -> float:
        return self.knocked_log_prob - self.log_prob

    @property
    def relative_probability_change(self) -> float:
        """Geva et al.'s measure: (p_knocked - p) / p."""
        return float(torch.tensor(self.change, dtype=torch.float64).exp() - 1)


def _log_probs(model: nn.Module, input_ids: torch.Tensor, position: int) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), use_cache=False).logits[0, position]
    return torch.log_softmax(logits.double(), -1).cpu()


def _encoded(model, tokenizer, prompt, input_ids, spec):
    from llm_heatmap.models import spec_from_model
    from llm_heatmap.probes.capture import encode_prompt

    from .outputs import check_one_stack_language_model

    check_one_stack_language_model(model, "a knockout cuts attention edges and scores")
    spec = spec or spec_from_model(model)
    if not spec.causal or model.get_output_embeddings() is None:
        raise InputError(f"{spec.architecture} has no LM head, so a knockout has no next-token probability to "
                         "change; pass a decoder with an LM head.")
    if input_ids is None:
        input_ids, _ = encode_prompt(tokenizer, prompt)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InputError(f"input_ids has shape {tuple(input_ids.shape)}; a knockout takes one prompt, shape [1, tokens].")
    return input_ids, spec


@torch.no_grad()
def knockout_effect(model: nn.Module, tokenizer=None, prompt=None, edges: list[Edges] = (), *,
                    input_ids: torch.Tensor | None = None, position: int = -1, target: int | None = None,
                    spec=None) -> KnockoutEffect:
    """Cut `edges` and report the change in log p(target) at `position` (target: default the predicted token)."""
    input_ids, spec = _encoded(model, tokenizer, prompt, input_ids, spec)
    length = input_ids.shape[1]
    if not -length <= position < length:
        raise InputError(f"position {position} is outside the prompt's {length} tokens; pass -{length} to {length - 1}.")
    _check_edges(list(edges), spec, length)
    clean = _log_probs(model, input_ids, position)
    target_id = int(clean.argmax()) if target is None else int(target)
    with knocked_out(model, list(edges), spec):
        knocked = _log_probs(model, input_ids, position)
    return KnockoutEffect(target_id=target_id, target=tokenizer.decode([target_id]) if tokenizer else str(target_id),
                          position=position % length, log_prob=float(clean[target_id]),
                          knocked_log_prob=float(knocked[target_id]))


@torch.no_grad()
def knockout_scan(model: nn.Module, tokenizer=None, prompt=None, *, input_ids: torch.Tensor | None = None,
                  spans: dict[str, tuple[int, ...]] | None = None, position: int = -1, window: int = 9,
                  target: int | None = None, spec=None) -> pd.DataFrame:
    """Geva et al.'s scan: for every layer l and every key span, cut the edges from `position` to the span in
    the `window` layers centred on l, one forward each. `spans` maps a name to key positions (default: each
    earlier token on its own, the first token left out so every query keeps a key). Columns: layer, span,
    log_prob, knocked_log_prob, change, relative_probability_change."""
    input_ids, spec = _encoded(model, tokenizer, prompt, input_ids, spec)
    length = input_ids.shape[1]
    if window < 1:
        raise InputError(f"window {window} must be at least 1 layer.")
    if not -length <= position < length:
        raise InputError(f"position {position} is outside the prompt's {length} tokens; pass -{length} to {length - 1}.")
    query = position % length
    if spans is None:
        spans = {f"{k}:{tokenizer.decode([int(input_ids[0, k])]) if tokenizer else int(input_ids[0, k])}": (k,)
                 for k in range(1, query + 1)}
    clean = _log_probs(model, input_ids, query)
    target_id = int(clean.argmax()) if target is None else int(target)
    rows = []
    for layer in range(spec.num_layers):
        start = layer - window // 2  # the window centred on the layer, clipped at both ends of the model
        layers = tuple(range(max(0, start), min(spec.num_layers, start + window)))
        for name, keys in spans.items():
            edges = [Edges(queries=(query,), keys=tuple(keys), layers=layers)]
            _check_edges(edges, spec, length)
            with knocked_out(model, edges, spec):
                knocked = float(_log_probs(model, input_ids, query)[target_id])
            rows.append((layer, name, float(clean[target_id]), knocked))
    table = pd.DataFrame(rows, columns=["layer", "span", "log_prob", "knocked_log_prob"])
    table["change"] = table.knocked_log_prob - table.log_prob
    table["relative_probability_change"] = table.change.map(lambda c: float(torch.tensor(c).exp() - 1))
    return table
