"""Head ablation on one prompt (Michel et al. 2019): replace chosen heads' outputs by zero or by a given mean
and measure the change in the target's log-probability.

A head's output row `o_h` is its slice of the output projection's input (`"(h d)"`), so a forward pre-hook on
the projection swaps that slice before `W_O` applies; the kernel itself is untouched. The mean over a prompt
set (`mean_head_outputs`) and the per-prompt function are here; runs over prompt sets belong on the shared run
engine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from llm_heatmap.errors import InputError


@contextlib.contextmanager
def heads_replaced(model: nn.Module, spec, heads: dict[int, tuple[int, ...]], means: torch.Tensor | None = None):
    """Inside the block, the outputs of `heads` ({layer: (head, ...)}) are zero, or `means` (`"l h d"`) where given."""
    for layer, chosen in heads.items():
        if not 0 <= layer < spec.num_layers or any(not 0 <= h < spec.num_heads for h in chosen):
            raise InputError(f"ablation of layer {layer}, heads {list(chosen)} is outside the model's "
                             f"{spec.num_layers} layers x {spec.num_heads} heads.")
        if not spec.output_projections[layer]:
            raise InputError(f"layer {layer} of {spec.architecture} has no output projection llm-heatmap can find, "
                             "so its heads cannot be ablated.")
    if means is not None and tuple(means.shape) != (spec.num_layers, spec.num_heads, spec.head_dim):
        raise InputError(f"means has shape {tuple(means.shape)}; pass one mean output per layer, head and head "
                         f"dimension, shape {(spec.num_layers, spec.num_heads, spec.head_dim)}.")

    def replace(layer: int, chosen: list[int]):
        def hook(module, args):
            rows = rearrange(args[0], "... (h d) -> ... h d", h=spec.num_heads).clone()
            rows[..., chosen, :] = 0 if means is None else means[layer, chosen].to(rows)
            return (rearrange(rows, "... h d -> ... (h d)"), *args[1:])
        return hook

    with contextlib.ExitStack() as stack:
        for layer, chosen in heads.items():
            projection = model.get_submodule(spec.output_projections[layer])
            stack.callback(projection.register_forward_pre_hook(replace(layer, list(chosen))).remove)
        yield model


@torch.no_grad()
def mean_head_outputs(model: nn.Module, prompts: list[torch.Tensor], spec) -> torch.Tensor:
    """float32 `"l h d"`: every head's output row averaged over all tokens of `prompts` (each `[1, T]` ids)."""
    if not prompts:
        raise InputError("mean ablation needs at least one prompt to average head outputs over.")
    sums = torch.zeros(spec.num_layers, spec.num_heads, spec.head_dim, dtype=torch.float64)
    count = 0

    def add(layer: int):
        def hook(module, args):
            sums[layer] += rearrange(args[0][0].double().cpu(), "t (h d) -> t h d", h=spec.num_heads).sum(0)
        return hook

    with contextlib.ExitStack() as stack:
        for layer, path in enumerate(spec.output_projections):
            stack.callback(model.get_submodule(path).register_forward_pre_hook(add(layer)).remove)
        device = next(model.parameters()).device
        for ids in prompts:
            model(input_ids=ids.to(device), use_cache=False)
            count += ids.shape[-1]
    return (sums / count).float()


@dataclass
class AblationEffect:
    target_id: int
    log_prob: float
    ablated_log_prob: float

    @property
    def change(self) -> float:
        return self.ablated_log_prob - self.log_prob


@torch.no_grad()
def ablation_effect(model: nn.Module, input_ids: torch.Tensor, heads: dict[int, tuple[int, ...]], *, spec,
                    means: torch.Tensor | None = None, position: int = -1, target: int | None = None) -> AblationEffect:
    """The change in log p(target) at `position` when `heads` are zero-ablated (or mean-ablated with `means`)."""
    length = input_ids.shape[-1]
    if not -length <= position < length:
        raise InputError(f"position {position} is outside the prompt's {length} tokens; pass -{length} to {length - 1}.")
    device = next(model.parameters()).device

    def log_probs():
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits[0, position]
        return torch.log_softmax(logits.double(), -1).cpu()

    clean = log_probs()
    target_id = int(clean.argmax()) if target is None else int(target)
    with heads_replaced(model, spec, heads, means):
        ablated = log_probs()
    return AblationEffect(target_id, float(clean[target_id]), float(ablated[target_id]))
