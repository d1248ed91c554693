"""Token-to-token contributions through whole layers (Kobayashi et al. 2021; ALTI, Ferrando et al. 2022).

The attention block of a layer, with its residual (and, where the model has one, the norm around it), turns
the layer's input rows x_j into output rows y_i that split exactly into one vector per input token:

    pre-norm decoders (Llama, GPT-2, ...):  z_ij = [i = j] x_j + sum_h alpha^h_ij v^h_j W_O^h
    post-norm encoders (BERT):              z_ij = LN_i([i = j] x_j + sum_h alpha^h_ij v^h_j W_O^h)

with y_i = sum_j z_ij + a constant (biases), v^h_j the value the kernel received (the pre-attention norm of
a pre-norm model is inside it), and LN_i the norm around the block with its scale frozen at row i's observed
value (`FrozenNorm`). Gemma's post-attention norm is frozen the same way on the attention part. The MLP works
on each row alone, so it moves nothing between tokens.

Two measures of how much token j feeds row i, each row normalised to sum to 1:
  "norm" (Kobayashi 2021): ||z_ij||_2;
  "alti" (Ferrando 2022):  max(0, ||y_i||_1 - ||y_i - z_ij||_1).
The rollout multiplies the per-layer matrices, first layer first: R_l = C_l R_{l-1}.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from einops import einsum, rearrange
from torch import nn

from llm_heatmap.errors import InputError
from llm_heatmap.models.output_projection import head_maps

from .attribution import FrozenNorm, has_sandwich_norms

MEASURES = ("alti", "norm")


@dataclass
class TokenContributions:
    """Per-layer contribution matrices and their rollout (float64 `"l i j"`, rows sum to 1)."""

    tokens: list[str]
    measure: str
    per_layer: torch.Tensor
    rollout: torch.Tensor
    spec: object

    def input_attribution(self, position: int = -1) -> torch.Tensor:
        """`"j"`: how much each input token feeds `position` after the last layer."""
        return self.rollout[-1, position]


def _post_norm(model: nn.Module, spec, layer: int) -> nn.Module | None:
    """The LayerNorm a BERT-style layer applies to its attention output plus residual, or None (pre-norm)."""
    return getattr(model.get_submodule(spec.output_projections[layer].rpartition(".")[0]), "LayerNorm", None)


ROW_BLOCK = 32  # rows of `"i j m"` vectors held at once: 32 x T x width float64 (32 x 4096 x 576: 600 MB)


@dataclass
class LayerBlock:
    """What one layer's attention block needs to split its output rows into per-token vectors."""

    x: torch.Tensor  # "j m": the layer's input rows (the residual)
    pattern: torch.Tensor  # "h i j" (as captured, float32)
    writes: torch.Tensor  # "j h m": v^h_j W_O^h
    bias: torch.Tensor  # "m": the output projection's bias
    sandwich: FrozenNorm | None  # Gemma's post-attention norm (on the attention part)
    post: FrozenNorm | None  # BERT's LayerNorm after the residual sum

    def vectors(self, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(z `"r j m"`, y `"r m"`) for the rows `rows`: y_i = sum_j z_ij + biases."""
        # z_ij = sum_h A^h_ij w^h_j: for each key j a product of "r h" and "h m" (one batched matmul over j)
        by_key = rearrange(self.pattern[:, rows].double(), "h r j -> j r h")
        vectors = rearrange(torch.bmm(by_key, self.writes), "j r m -> r j m")
        bias = self.bias.expand(vectors.shape[0], -1)
        if self.sandwich is not None:
            vectors, bias = _frozen_rows(self.sandwich, vectors, bias, rows)
        diagonal = torch.arange(self.x.shape[0])[rows]
        vectors[torch.arange(len(diagonal)), diagonal] += self.x[diagonal]  # the residual: x_i on the diagonal
        if self.post is not None:
            vectors, bias = _frozen_rows(self.post, vectors, bias, rows)
        return vectors, vectors.sum(1) + bias


def _frozen_rows(norm: FrozenNorm, vectors: torch.Tensor, bias: torch.Tensor, rows: slice):
    """`"r j m"` vectors and `"r m"` biases through `norm` frozen at the statistics of rows `rows`."""
    scale = norm.scale[rows]
    return (norm.center(vectors) * scale[:, None] * norm.gain,
            norm.center(bias) * scale * norm.gain + norm.bias)


def contribution_matrix(vectors: torch.Tensor, output: torch.Tensor, measure: str) -> torch.Tensor:
    """`"i j"` row-normalised contributions of the `"i j m"` vectors to the `"i m"` outputs."""
    if measure == "norm":
        scores = vectors.norm(dim=-1)
    else:
        distance = (output[:, None, :] - vectors).abs().sum(-1)
        scores = (output.abs().sum(-1, keepdim=True) - distance).clamp(min=0)
    return scores / scores.sum(-1, keepdim=True).clamp(min=1e-300)


@torch.no_grad()
def token_contributions(model: nn.Module, tokenizer=None, prompt=None, *, input_ids: torch.Tensor | None = None,
                        measure: str = "alti", spec=None) -> TokenContributions:
    """Contributions of every token to every row, per layer and rolled out, from one forward pass."""
    from llm_heatmap.models import spec_from_model
    from llm_heatmap.probes.capture import encode_prompt

    if measure not in MEASURES:
        raise InputError(f"measure {measure!r} is not one of {', '.join(MEASURES)}.")
    spec = spec or spec_from_model(model)
    if input_ids is None:
        input_ids, _ = encode_prompt(tokenizer, prompt)
    length = input_ids.shape[-1]
    per_layer = torch.stack([
        torch.cat([contribution_matrix(*block.vectors(slice(start, start + ROW_BLOCK)), measure)
                   for start in range(0, length, ROW_BLOCK)])
        for block in layer_blocks(model, input_ids, spec)])
    rollout = torch.empty_like(per_layer)
    current = None
    for index in range(spec.num_layers):
        current = per_layer[index] if current is None else per_layer[index] @ current
        rollout[index] = current
    ids = input_ids[0].tolist()
    tokens = [tokenizer.decode([i]) for i in ids] if tokenizer is not None else [str(i) for i in ids]
    return TokenContributions(tokens=tokens, measure=measure, per_layer=per_layer, rollout=rollout, spec=spec)


@torch.no_grad()
def layer_blocks(model: nn.Module, input_ids: torch.Tensor, spec) -> list[LayerBlock]:
    """One forward pass; per layer, what splits the attention block's output rows into per-token vectors."""
    from llm_heatmap.probes import capture, tap

    if not all(spec.output_projections):
        raise InputError(f"some layers of {spec.architecture} have no output projection llm-heatmap can find, so "
                         "head writes cannot be split into token contributions.")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InputError(f"input_ids has shape {tuple(input_ids.shape)}; token contributions take one prompt, "
                         "shape [1, tokens].")

    attention = [model.get_submodule(path) for path in spec.attention_modules]
    layers = [model.get_submodule(path.rpartition(".")[0]) for path in spec.attention_modules]
    post_norms = [_post_norm(model, spec, index) for index in range(spec.num_layers)]
    seen: dict = {}

    def keep_values(module, key, query, key_states, value, mask, arguments, output):
        seen[("values", attention.index(module))] = value[0].detach()

    def keep_input(name):
        def hook(module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"])[0].detach()
        return hook

    with contextlib.ExitStack() as stack:
        for index, (module, layer) in enumerate(zip(attention, layers)):
            tap.listen(module, keep_values)
            stack.callback(tap.unlisten, module, keep_values)
            stack.callback(layer.register_forward_pre_hook(keep_input(("x", index)), with_kwargs=True).remove)
            if post_norms[index] is not None:  # BERT: the norm's input is the residual plus the attention output
                stack.callback(post_norms[index].register_forward_pre_hook(
                    keep_input(("post", index)), with_kwargs=True).remove)
            elif has_sandwich_norms(layer):
                stack.callback(layer.post_attention_layernorm.register_forward_pre_hook(
                    keep_input(("sandwich", index)), with_kwargs=True).remove)
        probe = stack.enter_context(capture(model, spec=spec, value_norms=False))
        device = next(model.parameters()).device
        model(input_ids=input_ids.to(device), **({"use_cache": False} if spec.causal else {}))
    cube = probe.cube(input_ids, torch.ones_like(input_ids))

    blocks = []
    for index in range(spec.num_layers):
        projection = model.get_submodule(spec.output_projections[index])
        maps = head_maps(projection, spec.num_heads, spec.head_dim).double().cpu()
        values = seen[("values", index)].double().cpu().repeat_interleave(spec.group_size, 0)  # "g j d" -> "h j d"
        x = seen[("x", index)].double().cpu()
        bias = getattr(projection, "bias", None)
        sandwich = layers[index].post_attention_layernorm if has_sandwich_norms(layers[index]) else None
        blocks.append(LayerBlock(
            x=x, pattern=cube.pattern[index], writes=einsum(values, maps, "h j d, h d m -> j h m").contiguous(),
            bias=torch.zeros(x.shape[-1], dtype=torch.float64) if bias is None else bias.detach().double().cpu(),
            sandwich=None if sandwich is None else FrozenNorm(sandwich, seen[("sandwich", index)].cpu()),
            post=None if post_norms[index] is None else FrozenNorm(post_norms[index], seen[("post", index)].cpu())))
    return blocks
