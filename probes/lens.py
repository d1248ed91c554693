"""TransformerLens models into an `AttentionCube`, read from their `blocks.{l}.attn.hook_pattern` hook points.

TransformerLens 4.x: `TransformerBridge` is the model class. It wraps a Hugging Face model in place
(bridge components replace its submodules) and fires `hook_pattern` with the softmaxed pattern,
GQA key heads already expanded to query heads, so a cube from a bridge and one from the
transformers capture of the same weights line up head for head. Building one without a hub:

- `TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer)` wraps a loaded
  model and never downloads as long as `tokenizer` is given (without it the bridge fetches the
  tokenizer of `name` from the hub). `boot_transformers(local_dir, tokenizer=tokenizer)` loads a
  `save_pretrained` folder the same way. Both switch the wrapped model to eager attention.
- `build_bridge_from_module(model, "LlamaForCausalLM", hf_config=model.config)` (from
  `transformer_lens.model_bridge.sources._bridge_builder`) wraps a model without any tokenizer.
- `TransformerBridge.boot_native(TransformerBridgeConfig(...))` builds a small random
  TransformerLens-native model from a config, the 4.x replacement of `HookedTransformer(cfg)`.

`HookedTransformer` was removed in TransformerLens 4.0. `capture_lens` still accepts one, since it
has the same `hooks()` / `hook_dict` / `cfg` surface: that support is for TransformerLens 3.x-style
models.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec
from llm_heatmap.models.spec import FULL, SLIDING, config_quantization, layer_types

from .capture import library_versions, select_indices, token_strings
from .cube import AttentionCube

PATTERN_HOOK = "blocks.{layer}.attn.hook_pattern"


def is_lens_model(model) -> bool:
    """True for a TransformerLens model (4.x `TransformerBridge`, 3.x `HookedTransformer`)."""
    return all(hasattr(model, name) for name in ("cfg", "hooks", "hook_dict"))


def capture_lens(
    model,
    input,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
    prompt: str | None = None,
    source: str | None = None,
) -> AttentionCube:
    """Run a TransformerLens model once and return its attention patterns as an `AttentionCube`.

    `input` is a string, a token sequence (`[T]`, or `[B, T]` for a batch of unpadded sequences
    of equal length) or a list of token ids. A string is tokenized by `tokenizer` when one is
    given (Hugging Face convention: `tokenizer(text)`, the same ids the transformers capture
    gets), otherwise by the model's own `to_tokens` (TransformerLens convention: prepends BOS
    when `cfg.default_prepend_bos`). Token strings come from `tokenizer` or the model's
    tokenizer through `convert_ids_to_tokens` (as the transformers capture labels them, so
    "Ġcat" rather than `to_str_tokens`' " cat"); without either they are the ids as text.

    The patterns are read from the `blocks.{l}.attn.hook_pattern` hook points of `layers`
    (default all), keeping `heads` (default all), cast to `dtype` and moved to the CPU as each
    layer fires. The hooks live only inside the model's `hooks()` context, so nothing stays
    attached afterwards, also when the forward raises. When only low layers are asked for, the
    forward stops after the last of them.

    HookedTransformer support is for TransformerLens 3.x-style models; TransformerLens 4.x has
    only `TransformerBridge`.
    """
    if not is_lens_model(model):
        raise InputError(
            f"capture_lens needs a TransformerLens model (TransformerBridge or HookedTransformer), got "
            f"{type(model).__name__}; for a transformers model use llm_heatmap.probes.capture_prompt."
        )
    spec = lens_spec(model)
    layers = list(select_indices(layers, spec.num_layers, "layer"))
    heads = list(select_indices(heads, spec.num_heads, "head"))
    token_ids = _token_ids(model, input, tokenizer)
    names = [PATTERN_HOOK.format(layer=layer) for layer in layers]
    missing = [name for name in names if name not in model.hook_dict]
    if missing:
        raise InputError(
            f"model {type(model).__name__} has no hook point {missing[0]}; capture_lens reads attention "
            "from TransformerLens hook_pattern hook points, so pass a model that has them."
        )

    head_index = torch.tensor(heads)
    captured: dict[int, torch.Tensor] = {}

    def keep(pattern: torch.Tensor, hook, *, layer: int) -> None:
        kept = pattern.detach().index_select(1, head_index.to(pattern.device))
        captured[layer] = kept.to(device="cpu", dtype=dtype)

    fwd_hooks = [(name, partial(keep, layer=layer)) for name, layer in zip(names, layers)]
    options = {"return_type": None}
    if max(layers) + 1 < spec.num_layers:
        options["stop_at_layer"] = max(layers) + 1
    device = getattr(model.cfg, "device", None)
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        model(token_ids.to(device) if device else token_ids, **options)

    silent = [layer for layer in layers if layer not in captured]
    if silent:
        raise InputError(
            f"hook_pattern of layer {silent[0]} never fired; the wrapped model probably runs an sdpa/flash "
            "kernel that returns no weights: call model.original_model.set_attn_implementation('eager') "
            "or build the bridge with boot_transformers, which switches it to eager."
        )
    # "b l h q k": one hook tensor per layer is "b h q k"
    pattern = torch.stack([captured[layer] for layer in layers], dim=1)
    batch, length = token_ids.shape
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    strings = [token_strings(row, tokenizer) for row in token_ids]
    masks = torch.ones(batch, length, dtype=torch.bool)
    single = batch == 1
    if isinstance(input, str) and prompt is None:
        prompt = input
    return AttentionCube(
        pattern=pattern[0] if single else pattern,
        spec=spec,
        tokens=strings[0] if single else strings,
        token_ids=token_ids[0] if single else token_ids,
        layers=tuple(layers),
        heads=tuple(heads),
        query_positions=torch.arange(length),
        key_mask=masks[0] if single else masks,
        query_mask=(masks[0] if single else masks).clone(),  # its own storage: safetensors refuses shared tensors
        prompt=prompt,
        source=source or _model_name(model),
        metadata={
            "versions": {**library_versions(), "transformer-lens": _lens_version()},
            "capture": "transformer_lens",
            "kernel": PATTERN_HOOK,
            "lens_class": type(model).__name__,
            "cube_dtype": str(dtype).removeprefix("torch."),
        },
    )


def lens_spec(model) -> ModelSpec:
    """A `ModelSpec` read from a TransformerLens model's `cfg`.

    Geometry (layers, heads, KV heads, head size, causal from `attention_dir`, softcap from
    `attn_scores_soft_cap` when positive, context from `n_ctx`) comes from `cfg`. Local
    attention comes from `cfg.attn_types` ("global"/"local") with `cfg.window_size`
    (HookedTransformer, native models); a bridge over a transformers model keeps its window in
    the wrapped model's config (`layer_types`, `sliding_window`), which is read from there.
    `model_type` is "transformer_lens"; `architecture` is the original architecture.
    """
    cfg = model.cfg
    num_layers, num_heads = int(cfg.n_layers), int(cfg.n_heads)
    hf_config = _hf_config(model)
    types, window = _layer_types(cfg, hf_config, num_layers)
    softcap = getattr(cfg, "attn_scores_soft_cap", None)
    architecture = (
        getattr(cfg, "original_architecture", None)
        or getattr(cfg, "architecture", None)
        or type(model).__name__
    )
    return ModelSpec(
        model_type="transformer_lens",
        architecture=str(architecture),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or num_heads),
        head_dim=int(cfg.d_head),
        causal=getattr(cfg, "attention_dir", "causal") == "causal",
        layer_types=types,
        sliding_window=window,
        num_experts=getattr(cfg, "num_experts", None),
        experts_per_token=getattr(cfg, "experts_per_token", None),
        quantization=_quantization(cfg, hf_config),
        max_positions=getattr(cfg, "n_ctx", None),
        attn_softcap=float(softcap) if softcap and softcap > 0 else None,
        attention_modules=tuple(f"blocks.{layer}.attn" for layer in range(num_layers)),
    )


def _layer_types(cfg, hf_config, num_layers: int) -> tuple[tuple[str, ...], int | None]:
    """TransformerLens's own `attn_types` ("global"/"local") with `window_size`, else the wrapped
    transformers config's layer types."""
    window = getattr(cfg, "window_size", None)
    attn_types = getattr(cfg, "attn_types", None)
    if attn_types and window:
        types = tuple(SLIDING if kind == "local" else FULL for kind in attn_types)
        return types, (int(window) if SLIDING in types else None)
    if hf_config is not None:
        return layer_types(hf_config, num_layers, declared=getattr(cfg, "layer_types", None))
    return (FULL,) * num_layers, None


def _wrapped(model):
    """The module a bridge wraps, or None (HookedTransformer; a remote vLLM bridge raises AttributeError)."""
    return getattr(model, "original_model", None)


def _hf_config(model):
    """The transformers config of the model a bridge wraps, or None (native, HookedTransformer)."""
    from transformers import PretrainedConfig

    config = getattr(_wrapped(model), "config", None)
    if not isinstance(config, PretrainedConfig):
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _quantization(cfg, hf_config) -> str | None:
    label = config_quantization(hf_config) if hf_config is not None else None
    return label or ("4-bit" if getattr(cfg, "load_in_4bit", False) else None)


def _token_ids(model, input, tokenizer) -> torch.Tensor:
    """Token ids as `[B, T]` (int64, CPU)."""
    if isinstance(input, str):
        if tokenizer is not None:
            return tokenizer(input, return_tensors="pt")["input_ids"].cpu()
        if getattr(model, "tokenizer", None) is None:
            raise InputError(
                "input is a string but the model has no tokenizer; pass tokenizer=... or token ids."
            )
        return model.to_tokens(input).cpu()
    ids = input if isinstance(input, torch.Tensor) else torch.as_tensor(input)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.ndim not in (1, 2) or ids.numel() == 0:
        raise InputError(
            f"input must be a string or integer token ids shaped [T] or [B, T], got {ids.dtype} {tuple(ids.shape)}."
        )
    return (ids[None] if ids.ndim == 1 else ids).long().cpu()


def _model_name(model) -> str | None:
    name = getattr(model.cfg, "model_name", None)
    return str(name) if name else None


def _lens_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        return "unknown"
