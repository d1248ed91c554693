"""Attention sites: the kinds of attention one model runs, each with its own `ModelSpec`.

A site is one stack of attention modules that share their queries' and keys' sequences: the encoder's
self-attention, the decoder's self-attention, the decoder's cross-attention (queries: target tokens,
keys: source tokens), a vision tower, a text tower. A decoder-only language model or a BERT has one
site, "self". Sites are read from the module tree by what families share, not by model name:

- an attention module is a module whose class name holds "Attention" and that holds no other such
  module (the one that calls the attention kernel), not torch's own `nn.MultiheadAttention`, which bypasses
  the kernel registry (SigLIP's pooling head);
- it is cross-attention when its attribute name is one transformers gives cross-attention
  (`encoder_attn`, `EncDecAttention`, `crossattention`, ...) or it says so (`is_cross_attention`);
- otherwise its site is the stack it sits in: under the model's encoder ("encoder") or decoder
  ("decoder") of an encoder-decoder model, under a vision tower ("vision") or a text tower ("text").
"""

from __future__ import annotations

from torch import nn

SELF = "self"
ENCODER, DECODER, CROSS, VISION, TEXT = "encoder", "decoder", "cross", "vision", "text"
SITE_ORDER = (SELF, ENCODER, DECODER, CROSS, VISION, TEXT)
CROSS_NAMES = ("encoder_attn", "EncDecAttention", "crossattention", "cross_attn", "encoder_decoder_attention")
VISION_NAMES = ("vision_model", "vision_tower", "visual", "vision_encoder")
TEXT_NAMES = ("text_model",)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every innermost `*Attention` module, in module order."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if "Attention" not in type(module).__name__ or not name:
            continue
        found = [(n, m) for n, m in found if not name.startswith(n + ".")]
        found.append((name, module))
    return [(n, m) for n, m in found if not type(m).__module__.startswith("torch.")]


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None or target is model:
        return None
    return next((name for name, module in model.named_modules() if module is target), None)


def _under(path: str, prefix: str | None) -> bool:
    return prefix is not None and (path == prefix or path.startswith(prefix + "."))


def site_of(path: str, module: nn.Module, encoder: str | None, decoder: str | None) -> str:
    parts = path.split(".")
    if parts[-1] in CROSS_NAMES or getattr(module, "is_cross_attention", False) or "Cross" in type(module).__name__:
        return CROSS
    if any(p in VISION_NAMES for p in parts):
        return VISION
    if any(p in TEXT_NAMES for p in parts):
        return TEXT
    if _under(path, encoder):
        return ENCODER
    if _under(path, decoder):
        return DECODER
    return SELF


def find_sites(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """Site name -> (path, module) of each of its layers, in layer order, sites in `SITE_ORDER`."""
    config = getattr(model, "config", None)
    encoder = decoder = None
    if getattr(config, "is_encoder_decoder", False):
        encoder = _path_of(model, model.get_encoder() if hasattr(model, "get_encoder") else None)
        decoder = _path_of(model, model.get_decoder() if hasattr(model, "get_decoder") else None)
    sites: dict[str, list[tuple[str, nn.Module]]] = {}
    for path, module in attention_modules(model):
        sites.setdefault(site_of(path, module, encoder, decoder), []).append((path, module))
    for members in sites.values():
        if all(getattr(m, "layer_idx", None) is not None for _, m in members):
            members.sort(key=lambda item: item[1].layer_idx)
    return {name: sites[name] for name in SITE_ORDER if name in sites}
