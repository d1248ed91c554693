"""Direct logit attribution: what each component writes straight into one logit.

A pre-norm decoder's last residual row is a sum of writes: the embeddings, then per layer what the
attention block and the MLP add. The logit of token t at position p is `N(x_p) . u_t (+ b_t)`, with N
the final norm and u_t the unembedding row. Freezing N's per-row statistics at the values this forward
observed makes N linear (LayerNorm's centering is linear too), so the logit splits exactly into one
share per write: each head's `o_h W_O^h`, each layer's output-projection bias, each MLP, the embeddings,
and a constant (the final norm's bias and the unembedding bias). Models that normalise a block's output
before adding it (Gemma's post-attention norm) get that norm frozen the same way. The shares add up to
the pre-softcap logit; nothing is fitted.

Post-norm encoders (BERT) renormalise the whole residual stream after every block, so no component
writes directly to the output there; they are refused in one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from einops import rearrange
from torch import nn

from llm_heatmap.errors import InputError
from llm_heatmap.models.output_projection import head_maps

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm")


class FrozenNorm:
    """A LayerNorm or RMSNorm made linear: its per-row scale (and for LayerNorm its centering) taken from
    the rows it saw, applied to any part of those rows. `__call__` leaves the norm's bias out; `bias` has it."""

    def __init__(self, module: nn.Module, rows: torch.Tensor):
        self.centered = isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__
        eps = next((getattr(module, n) for n in ("eps", "variance_epsilon") if isinstance(getattr(module, n, None), float)),
                   None)
        if eps is None:
            raise InputError(f"the norm {type(module).__name__} names no epsilon (eps or variance_epsilon), so its "
                             "scale cannot be frozen; direct logit attribution supports LayerNorm and RMSNorm.")
        self.eps = eps
        self.gain, self.bias = self._affine(module, rows.shape[-1])
        rows = rows.double()
        self.scale = (self._statistic(rows) + eps).rsqrt()  # "... 1"

    def _statistic(self, rows: torch.Tensor) -> torch.Tensor:
        if self.centered:
            return rows.var(-1, unbiased=False, keepdim=True)
        return rows.pow(2).mean(-1, keepdim=True)

    def center(self, values: torch.Tensor) -> torch.Tensor:
        return values - values.mean(-1, keepdim=True) if self.centered else values

    @torch.no_grad()
    def _affine(self, module: nn.Module, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gain, bias) as the module applies them (Gemma's `1 + w` included), read by calling it on a
        vector of known statistics and on zero."""
        weight = next(module.parameters(), None)
        dtype = weight.dtype if weight is not None and weight.dtype.is_floating_point else torch.float32
        device = weight.device if weight is not None else "cpu"
        probe = torch.ones(width, dtype=torch.float64)
        probe[1::2] = -1
        zero = module(torch.zeros(1, width, dtype=dtype, device=device)).double().cpu()[0]
        image = module(probe.to(dtype=dtype, device=device)[None]).double().cpu()[0]
        centered = self.center(probe)
        gain = (image - zero) * (self._statistic(probe) + self.eps).sqrt() / centered
        return gain, zero

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """`"... m"` parts of the observed rows (the row axis next to last, or one row) through the frozen norm."""
        return self.center(values.double()) * self.scale * self.gain


@dataclass
class LogitAttribution:
    """Every component's direct share of one logit (float64 shares, the model's own logit beside them)."""

    tokens: list[str]
    position: int
    target_id: int
    target: str
    logit: float  # the model's logit (after any final softcap)
    softcap: float | None
    embeddings: float
    heads: torch.Tensor  # "l h"
    attention_bias: torch.Tensor  # "l": output-projection bias (and a post-attention norm's bias)
    mlps: torch.Tensor  # "l"
    bias: float  # final norm bias and unembedding bias
    spec: object

    @property
    def total(self) -> float:
        """The sum of the shares: the logit before any final softcap."""
        return float(self.embeddings + self.heads.sum() + self.attention_bias.sum() + self.mlps.sum() + self.bias)

    @property
    def reconstructed_logit(self) -> float:
        """The sum of the shares through the model's final softcap, comparable with `logit`."""
        if self.softcap is None:
            return self.total
        return float(torch.tanh(torch.tensor(self.total / self.softcap, dtype=torch.float64)) * self.softcap)

    def table(self) -> pd.DataFrame:
        """One row per component: component, layer, head, share (layer and head empty where they do not apply)."""
        layers, heads = self.heads.shape
        rows = [("embeddings", None, None, self.embeddings)]
        for layer in range(layers):
            rows += [("head", layer, head, float(self.heads[layer, head])) for head in range(heads)]
            rows.append(("attention bias", layer, None, float(self.attention_bias[layer])))
            rows.append(("mlp", layer, None, float(self.mlps[layer])))
        rows.append(("bias", None, None, self.bias))
        table = pd.DataFrame(rows, columns=["component", "layer", "head", "share"])
        table[["layer", "head"]] = table[["layer", "head"]].astype("Int64")
        return table

    def head_table(self) -> pd.DataFrame:
        """Per-head table (layer, head, kv_group, share) for the all-heads map."""
        table = self.table()
        table = table[table.component == "head"].drop(columns="component").astype({"layer": int, "head": int})
        table.insert(2, "kv_group", table["head"] // self.spec.group_size)
        return table.reset_index(drop=True)


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _final_norm(model: nn.Module, layer_paths: list[str]) -> nn.Module:
    for path, module in model.named_modules():
        if path.rpartition(".")[2] in FINAL_NORM_NAMES and not any(path.startswith(p + ".") for p in layer_paths) \
                and next(module.parameters(), None) is not None:
            return module
    raise InputError(f"{type(model).__name__} has no final norm llm-heatmap can find (it looks for "
                     f"{', '.join(FINAL_NORM_NAMES)} outside the layers), so logits cannot be split; "
                     "pass a pre-norm decoder with an LM head.")


def _refuse_unsupported(model: nn.Module, spec) -> nn.Module:
    """The unembedding module, or one sentence saying why this model has no direct logit attribution."""
    from .outputs import check_one_stack_language_model

    check_one_stack_language_model(model, "direct logit attribution splits a logit of")
    unembedding = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not spec.causal or unembedding is None:
        raise InputError(f"{spec.architecture} is an encoder without an LM head (post-norm: every layer renormalises "
                         "the residual stream, so no component writes directly to an output); direct logit "
                         "attribution needs a decoder with an LM head.")
    if not all(spec.output_projections):
        raise InputError(f"some layers of {spec.architecture} have no output projection llm-heatmap can find, so "
                         "head writes cannot be split; direct logit attribution needs o_proj-style projections.")
    return unembedding


def has_sandwich_norms(layer: nn.Module) -> bool:
    """Gemma 2/3 layers normalise the attention and MLP outputs before adding them to the residual."""
    return all(hasattr(layer, name) for name in ("post_attention_layernorm", "pre_feedforward_layernorm",
                                                  "post_feedforward_layernorm"))


@torch.no_grad()
def logit_attribution(model: nn.Module, tokenizer=None, prompt=None, *, input_ids: torch.Tensor | None = None,
                      position: int = -1, target: int | str | None = None, spec=None,
                      chat: bool = False) -> LogitAttribution:
    """Split the logit of `target` (default: the token the model predicts) at `position` into every
    component's direct share. Pass a prompt with its tokenizer (`chat`: through its chat template), or
    `input_ids` of shape [1, T]."""
    from llm_heatmap.models import spec_from_model
    from llm_heatmap.probes.capture import encode_prompt

    spec = spec or spec_from_model(model)
    unembedding = _refuse_unsupported(model, spec)
    if input_ids is None:
        input_ids, _ = encode_prompt(tokenizer, prompt, chat=chat)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InputError(f"input_ids has shape {tuple(input_ids.shape)}; direct logit attribution takes one prompt, "
                         "shape [1, tokens].")
    length = input_ids.shape[1]
    if not -length <= position < length:
        raise InputError(f"position {position} is outside the prompt's {length} tokens; pass -{length} to {length - 1}.")
    position %= length

    layer_paths = [path.rpartition(".")[0] for path in spec.attention_modules]
    layers = [model.get_submodule(path) for path in layer_paths]
    projections = [model.get_submodule(path) for path in spec.output_projections]
    final_norm = _final_norm(model, layer_paths)
    seen: dict = {}

    def keep_input(key):
        def hook(module, args, kwargs):
            seen[key] = (args[0] if args else kwargs["hidden_states"])[0, position].detach()
        return hook

    def keep_output(key):
        def hook(module, args, output):
            seen[key] = _first_tensor(output)[0, position].detach()
        return hook

    handles = [layers[0].register_forward_pre_hook(keep_input("embeddings"), with_kwargs=True),
               final_norm.register_forward_pre_hook(keep_input("final"), with_kwargs=True)]
    for index, (layer, projection) in enumerate(zip(layers, projections)):
        handles.append(projection.register_forward_pre_hook(keep_input(("heads", index)), with_kwargs=True))
        if has_sandwich_norms(layer):
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
                keep_input(("attention", index)), with_kwargs=True))
            handles.append(layer.post_feedforward_layernorm.register_forward_hook(keep_output(("mlp", index))))
        else:
            handles.append(layer.mlp.register_forward_hook(keep_output(("mlp", index))))
    try:
        device = next(model.parameters()).device
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits[0, position].detach().float().cpu()
    finally:
        for handle in handles:
            handle.remove()

    target_id = _target_id(target, logits, tokenizer)
    unembed = unembedding.weight[target_id].detach().double().cpu()  # "m"
    unembed_bias = 0.0 if getattr(unembedding, "bias", None) is None else float(unembedding.bias[target_id])
    final = FrozenNorm(final_norm, seen["final"].cpu())

    def through_final(writes: torch.Tensor) -> torch.Tensor:
        return final(writes) @ unembed

    heads, attention_bias, mlps = [], [], []
    for index, (layer, projection) in enumerate(zip(layers, projections)):
        maps = head_maps(projection, spec.num_heads, spec.head_dim).double().cpu()  # "h d m"
        outputs = rearrange(seen[("heads", index)].double().cpu(), "(h d) -> h d", h=spec.num_heads)
        writes = torch.einsum("hd,hdm->hm", outputs, maps)
        bias = getattr(projection, "bias", None)
        bias = torch.zeros(writes.shape[-1], dtype=torch.float64) if bias is None else bias.detach().double().cpu()
        if has_sandwich_norms(layer):
            post = FrozenNorm(layer.post_attention_layernorm, seen[("attention", index)].cpu())
            writes, bias = post(writes), post(bias) + post.bias
        heads.append(through_final(writes))
        attention_bias.append(through_final(bias))
        mlps.append(through_final(seen[("mlp", index)].cpu()))

    ids = input_ids[0].tolist()
    token_list = [tokenizer.decode([i]) for i in ids] if tokenizer is not None else [str(i) for i in ids]
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return LogitAttribution(
        tokens=token_list, position=position, target_id=target_id,
        target=tokenizer.decode([target_id]) if tokenizer is not None else str(target_id),
        logit=float(logits[target_id]), softcap=softcap,
        embeddings=float(through_final(seen["embeddings"].cpu())),
        heads=torch.stack(heads), attention_bias=torch.stack(attention_bias), mlps=torch.stack(mlps),
        bias=float(final.bias @ unembed) + unembed_bias, spec=spec,
    )


def _target_id(target, logits: torch.Tensor, tokenizer) -> int:
    if target is None:
        return int(logits.argmax())
    if isinstance(target, str):
        if tokenizer is None:
            raise InputError("a target given as text needs the tokenizer; pass it, or give the target as a token id.")
        ids = tokenizer.encode(target, add_special_tokens=False)
        if len(ids) != 1:
            raise InputError(f"target {target!r} is {len(ids)} tokens; pass text that is one token (often with a "
                             "leading space, e.g. ' Paris') or a token id.")
        return ids[0]
    if not 0 <= int(target) < logits.shape[0]:
        raise InputError(f"target id {target} is outside the vocabulary of {logits.shape[0]} tokens.")
    return int(target)
