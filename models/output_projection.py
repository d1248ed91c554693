"""Each layer's attention output projection W_O: the map from the concatenated head outputs to the
residual stream, and its per-head slices W_O^h (what a head writes: `v_j W_O^h`).

Architectures name and place it differently: `o_proj` (Llama, Mistral, Qwen, Gemma, their MoE
variants), `c_proj` (GPT-2's transposed `Conv1D`, GPT-BigCode), `out_proj` (OPT, BART, GPT-J),
`dense` (GPT-NeoX, Falcon, Phi), `o` (T5), `out_lin` (DistilBERT), and for BERT-style encoders
`attention.output.dense`, outside the self-attention module the kernel receives. It is found by
those names inside the attention module, then in its parent, and kept only when its input width is
`num_heads x head_dim`.

The matrix of a plain `nn.Linear` (transposed) or GPT-2's `Conv1D` is its weight; any other module
(bitsandbytes 4/8-bit layers, adapters) is read by calling it on the identity (minus its bias), so
the map is the one the model really applies.
"""

from __future__ import annotations

import torch
from torch import nn

NAMES = ("o_proj", "out_proj", "c_proj", "dense", "o", "out_lin", "wo")
PARENT_NAMES = ("output.dense",)


def _input_width(module: nn.Module) -> int | None:
    for attribute in ("in_features", "nx"):  # nn.Linear (and bitsandbytes' subclasses), Conv1D
        if isinstance(getattr(module, attribute, None), int):
            return getattr(module, attribute)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:
        return weight.shape[0]
    return None


def find_output_projection(model: nn.Module, attention_path: str, width: int) -> str | None:
    """Dotted path of the output projection of the attention module at `attention_path` whose input is
    `width` = heads x head size wide, or None."""
    parent_path = attention_path.rpartition(".")[0]
    candidates = [f"{attention_path}.{name}" for name in NAMES]
    candidates += [f"{parent_path}.{name}" if parent_path else name for name in PARENT_NAMES]
    for path in candidates:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if _input_width(module) == width:
            return path
    return None


@torch.no_grad()
def output_map(projection: nn.Module, width: int) -> torch.Tensor:
    """float32 `"(h d) m"`: the linear map the projection applies to a row of concatenated head outputs
    (its bias left out)."""
    if type(projection) is nn.Linear:
        return projection.weight.detach().float().T
    if type(projection).__name__ == "Conv1D":
        return projection.weight.detach().float()
    weight = next(iter(projection.parameters()))
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    identity = torch.eye(width, dtype=dtype, device=weight.device)
    zero = torch.zeros(1, width, dtype=dtype, device=weight.device)
    return (projection(identity) - projection(zero)).float()


def head_maps(projection: nn.Module, num_heads: int, head_dim: int) -> torch.Tensor:
    """float32 `"h d m"`: W_O^h of every head (`"(h d) m -> h d m"`)."""
    return output_map(projection, num_heads * head_dim).reshape(num_heads, head_dim, -1)
