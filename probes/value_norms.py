"""What each head writes: norms through the output projection (Kobayashi et al. 2020).

Head h of a layer adds `sum_j alpha_ij f_h(x_j)` to row i of the residual stream, with
`f_h(x_j) = v_j W_O^h`: the value of key j (from the KV head h reads) through the head's slice of
the output projection. `||alpha_ij f_h(x_j)|| = alpha_ij ||f_h(x_j)||`, so one norm per (head, key)
gives the whole norm-weighted pattern; the head's output per row is the kernel's own output
`o_ih = sum_j alpha_ij v_j` through the same slice.

Both norms are quadratic forms of the head's Gram matrix `G_h = W_O^h W_O^h^T` (`"h d d"`, built
once per layer in float32: a relative error near 4e-7, and half the set-up time of float64): `||v W_O^h||^2 = v G_h v^T`, d x d work per vector instead of d x model width.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_heatmap.errors import InputError
from llm_heatmap.models.output_projection import head_maps


class HeadWriters:
    """The output maps of the chosen heads of one layer, as Gram matrices."""

    def __init__(self, projection: nn.Module, spec, heads: tuple[int, ...]):
        maps = head_maps(projection, spec.num_heads, spec.head_dim)  # "h d m", float32
        self.every_head = tuple(heads) == tuple(range(spec.num_heads))
        chosen = torch.tensor(heads)
        if not self.every_head:
            maps = maps[chosen]
        self.grams = maps @ maps.mT  # "h d d"
        self.group_size = spec.group_size
        self.kv_heads = chosen // spec.group_size  # the KV head each chosen head reads

    @classmethod
    def for_layer(cls, model: nn.Module, spec, layer: int, heads: tuple[int, ...]) -> "HeadWriters":
        path = spec.output_projections[layer] if layer < len(spec.output_projections) else ""
        if not path:
            raise InputError(
                f"layer {layer} of {spec.architecture} has no output projection llm-heatmap can find (it looks for "
                "o_proj, out_proj, c_proj, dense, o, out_lin, wo and attention.output.dense), so value norms "
                "cannot be computed; capture with value_norms=False."
            )
        return cls(model.get_submodule(path), spec, heads)

    def value_norms(self, value: torch.Tensor) -> torch.Tensor:
        """`"b g k d"` values as the kernel got them -> `"b h k"`: ||v_j W_O^h|| for every chosen head."""
        grams = self.grams.to(value.device)
        if not self.every_head:
            return _quadratic_norms(value.index_select(1, self.kv_heads.to(value.device)).float(), grams)
        # every head: each KV head's values meet its group's Gram matrices without being repeated
        # ("b g k d" as "b g 1 k d" against "(g r) d d" as "g r d d" -> "b g r k" -> "b (g r) k")
        values = value.float().unsqueeze(2)
        squared = torch.linalg.vecdot(values @ grams.unflatten(0, (-1, self.group_size)), values)
        return squared.flatten(1, 2).clamp_min(0).sqrt()

    def output_norms(self, output: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """`"b q h d"` kernel output (every head) -> `"b h q"`: the norm of what each chosen head writes per row."""
        if not self.every_head:
            output = output.index_select(2, heads.to(output.device))
        return _quadratic_norms(output.float().transpose(1, 2), self.grams.to(output.device))


def _quadratic_norms(vectors: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """`"b h n d"` -> `"b h n"`: sqrt(v G_h v^T) for each head's own Gram matrix."""
    return torch.linalg.vecdot(vectors @ grams, vectors).clamp_min(0).sqrt()
