"""`ModelSpec`: what a model's attention looks like, read from its config and modules."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from llm_heatmap.errors import InputError

from .gguf_cache import gguf_type_of
from .output_projection import find_output_projection
from .sites import CROSS, DECODER, ENCODER, SELF, TEXT, VISION, find_sites

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class ModelSpec:
    """The attention geometry of one model, never typed in by hand.

    `attention_modules` holds the dotted module path of each layer's attention module (the
    module the attention kernel receives), so probes can find them again with
    `model.get_submodule(path)`; `output_projections` the path of each layer's output projection
    W_O ("" where none was found; see `output_projection.py`).

    `causal` and `bidirectional_blocks` say what the kernel applies: a capture reads them from the
    kernel call of its forward pass (`probes.geometry.kernel_causality`), so a cube's spec holds what
    ran. `bidirectional_blocks` are (first, last) key positions, inclusive, of runs whose positions all
    see each other in a causal model (Gemma 3's image tokens); they belong to one input sequence.
    `segments` (per layer, empty where none) are the bounds of the segments a packed layer attends within
    (`cu_seqlens`: Qwen2-VL's tower with several images, Qwen2.5-VL's windows): a position sees only its
    own segment's. A capture reads them from the layer's call, for the sequence it captured.
    """

    model_type: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    layer_types: tuple[str, ...]
    sliding_window: int | None = None
    num_experts: int | None = None
    experts_per_token: int | None = None
    quantization: str | None = None
    max_positions: int | None = None
    attn_softcap: float | None = None
    site: str | None = None
    bidirectional_blocks: tuple[tuple[int, int], ...] = field(default=(), compare=False)
    segments: tuple[tuple[int, ...], ...] = field(default=(), compare=False)
    attention_modules: tuple[str, ...] = field(default=(), compare=False)
    output_projections: tuple[str, ...] = field(default=(), compare=False)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def attention_kind(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        if self.num_kv_heads == 1:
            return "MQA"
        return "GQA"

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    def kv_group(self, head: int) -> int:
        """The KV head that query head `head` reads (transformers' `repeat_kv` order)."""
        return head // self.group_size

    def kv_groups(self) -> torch.Tensor:
        return torch.arange(self.num_heads) // self.group_size

    def layer_segments(self, layer: int) -> tuple[int, ...]:
        """The bounds of the segments `layer` attends within, `(0, s1, ..., n)`, or () for one sequence."""
        return self.segments[layer] if layer < len(self.segments) else ()

    def window(self, layer: int) -> int | None:
        """Sliding-window size of `layer`, or None for full attention."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @property
    def summary(self) -> str:
        """One line, e.g. `dense decoder, GQA 9q:3kv x 30 layers, GGUF Q4_1`."""
        body = "MoE" if self.is_moe else "dense"
        role = self.site or ("decoder" if self.causal else "encoder")
        parts = [f"{body} {role}", f"{self.attention_kind} {self.num_heads}q:{self.num_kv_heads}kv x {self.num_layers} layers"]
        if self.is_moe:
            parts.append(f"{self.num_experts} experts, top-{self.experts_per_token}")
        sliding = sum(t == SLIDING for t in self.layer_types)
        if sliding:
            parts.append(f"{sliding}/{self.num_layers} layers sliding window {self.sliding_window}")
        if self.attn_softcap:
            parts.append(f"softcap {self.attn_softcap:g}")
        if self.quantization:
            parts.append(self.quantization)
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        data = dict(data)
        for key in ("layer_types", "attention_modules", "output_projections"):
            data[key] = tuple(data.get(key, ()))
        for key in ("bidirectional_blocks", "segments"):
            data[key] = tuple(tuple(int(p) for p in block) for block in data.get(key, ()))
        return cls(**data)


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of each layer's self-attention module, in layer order.

    The attention module is the innermost module named `*Attention` that carries a
    `layer_idx` (transformers passes exactly that module to the attention kernel);
    cross-attention modules are left out.
    """
    found = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if "Attention" not in cls or "Cross" in cls or getattr(module, "layer_idx", None) is None:
            continue
        if getattr(module, "is_cross_attention", False):
            continue
        found = [(n, m) for n, m in found if not name.startswith(n + ".")]
        found.append((name, module))
    found.sort(key=lambda item: item[1].layer_idx)
    return found


def quantization_label(quant, gguf_type: str | None) -> str | None:
    """How the weights in memory are stored, from a `quantization_config` and the GGUF type they were
    converted from: bitsandbytes first (it re-quantizes whatever was loaded, a dequantized GGUF
    included), then the GGUF type."""
    if quant is not None:
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        if quant.get("load_in_4bit"):
            return f"4-bit {str(quant.get('bnb_4bit_quant_type', 'nf4')).upper()}"
        if quant.get("load_in_8bit"):
            return "8-bit LLM.int8"
        return str(quant.get("quant_method", "quantized"))
    return f"GGUF {gguf_type}" if gguf_type else None


def config_quantization(config) -> str | None:
    """The quantization label of a transformers config: its `quantization_config`, and the GGUF type of
    the file it was converted from when it was loaded from llm-heatmap's GGUF cache."""
    gguf_type = gguf_type_of(Path(config.name_or_path)) if getattr(config, "name_or_path", None) else None
    return quantization_label(getattr(config, "quantization_config", None), gguf_type)


def layer_types(config, num_layers: int, modules: list[nn.Module] = (), declared=None) -> tuple[tuple[str, ...], int | None]:
    """(full or sliding for each layer, the window) from a transformers config: `layer_types` (or
    `declared`), `sliding_window`, `use_sliding_window`; an attention module's own `sliding_window` wins."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = declared or getattr(config, "layer_types", None)
    if types is None:
        types = [SLIDING if window else FULL] * num_layers
    types = [SLIDING if t == SLIDING and window else FULL for t in types]
    for i, module in enumerate(modules):
        if hasattr(module, "sliding_window"):
            module_window = module.sliding_window
            types[i] = SLIDING if module_window else FULL
            window = module_window or window
    return tuple(types), (window if SLIDING in types else None)


def _module_heads(module: nn.Module) -> tuple[int | None, int | None, int | None]:
    """(query heads, KV heads, head size) an attention module states itself, None where it does not."""
    heads = _first(module, "num_heads", "n_heads", "num_attention_heads")
    groups = _first(module, "num_key_value_groups")
    kv = heads // groups if heads and groups else _first(module, "num_key_value_heads", "num_kv_heads")
    head_dim = _first(module, "head_dim", "key_value_proj_dim", "attention_head_size")
    return heads, kv, head_dim


def spec_from_model(model: nn.Module, site: str | None = None) -> ModelSpec:
    """Read a `ModelSpec` from a transformers model's config and attention modules.

    A model with several attention sites (`sites.find_sites`: encoder, decoder, cross, vision, text)
    has one spec per site; `site` names it (default: the model's first site)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise InputError(
            f"model {name} has no Hugging Face config, so its attention cannot be described; "
            "pass a transformers model (from load_model or from_pretrained/from_config)."
        )
    sites = find_sites(model)
    attention = find_attention_modules(model) if site is None and set(sites) <= {SELF} else []
    if not attention:
        if site is not None and site not in sites:
            raise InputError(f"site={site!r} is not a site of {name}; its sites are {', '.join(sites) or 'none'}.")
        site = site or next(iter(sites), None)
        attention = sites.get(site, [])
    if not attention:
        raise InputError(
            f"model {name} has no attention modules that llm-heatmap can find; "
            "pass a transformer model whose attention runs through modules named *Attention."
        )
    modules = [m for _, m in attention]
    site_config = config.get_text_config() if site in (None, SELF) and hasattr(config, "get_text_config") else config
    if site == VISION and getattr(config, "vision_config", None) is not None:
        site_config = config.vision_config
    elif site == TEXT and getattr(config, "text_config", None) is not None:
        site_config = config.text_config
    own_heads, own_kv, own_dim = _module_heads(modules[0])
    num_heads = own_heads or _first(site_config, "num_attention_heads", "n_head", "num_heads")
    if num_heads is None:
        raise InputError(
            f"model {name} has attention modules but its config names no head count; "
            "pass a transformers model whose config sets num_attention_heads."
        )
    num_kv_heads = own_kv or _first(site_config, "num_key_value_heads", "num_kv_heads", default=num_heads)
    if getattr(site_config, "multi_query", False):
        num_kv_heads = 1
    hidden = _first(site_config, "hidden_size", "n_embd", "d_model")
    head_dim = own_dim or _first(site_config, "head_dim", default=hidden // num_heads)
    types, window = layer_types(site_config, len(modules), modules)
    if site in (ENCODER, CROSS, VISION):
        causal = False
    elif site == DECODER:
        causal = True
    else:
        causal = bool(getattr(modules[0], "is_causal", getattr(site_config, "is_decoder", False)))
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    return ModelSpec(
        model_type=str(getattr(site_config, "model_type", "unknown")),
        architecture=architecture,
        num_layers=len(modules),
        num_heads=int(num_heads),
        num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim),
        causal=causal,
        layer_types=types,
        sliding_window=window,
        num_experts=_first(site_config, "num_experts", "num_local_experts", "n_routed_experts"),
        experts_per_token=_first(site_config, "num_experts_per_tok", "moe_topk", "num_experts_per_token"),
        quantization=config_quantization(config),
        max_positions=_first(site_config, "max_position_embeddings", "n_positions"),
        attn_softcap=_first(site_config, "attn_logit_softcapping"),
        site=None if site in (None, SELF) else site,
        attention_modules=tuple(name for name, _ in attention),
        output_projections=tuple(find_output_projection(model, name, int(num_heads) * int(head_dim)) or ""
                                 for name, _ in attention),
    )


def site_specs(model: nn.Module) -> dict[str, ModelSpec]:
    """Site name -> `ModelSpec` of every attention site of the model (one entry, "self", for a decoder
    LLM or a BERT)."""
    sites = find_sites(model)
    if set(sites) <= {SELF}:
        return {SELF: spec_from_model(model)}
    return {site: spec_from_model(model, site) for site in sites}
