"""How many layers, query heads and KV heads a model source has, read from its config without building the
model: `--layers` and `--heads` past them are refused before the model loads, and a run over several models
knows their KV grouping before it loads any."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

from .gguf_cache import header_values
from .offline import OFFLINE_MODELS


class AttentionCounts(NamedTuple):
    layers: int
    heads: int
    kv_heads: int


def attention_counts(source) -> AttentionCounts | None:
    """The counts of `source` (an offline name, a Hugging Face directory, a .gguf file, or a hub id in the
    local cache), or None where the config does not say them plainly: a source not found here, or a model
    of several attention sites (encoder-decoder, vision-language), whose layers depend on the site."""
    text = str(source)
    if text in OFFLINE_MODELS:
        path = OFFLINE_MODELS[text].path()
        if path is None:
            return None
        text = str(path)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_counts(path)  # the header, read in milliseconds; transformers is not imported
    return _config_counts(str(path))


def _gguf_counts(path: Path) -> AttentionCounts | None:
    try:
        values = header_values(path, {"block_count", "attention.head_count", "attention.head_count_kv"})
    except (OSError, ValueError, struct.error):
        return None  # the loader says what is wrong with the file
    if "block_count" not in values or "attention.head_count" not in values:
        return None
    heads = int(values["attention.head_count"])
    return AttentionCounts(int(values["block_count"]), heads, int(values.get("attention.head_count_kv", heads)))


def _config_counts(name: str) -> AttentionCounts | None:
    from transformers import AutoConfig

    try:  # no code of the model runs here (False, not None: None would ask on a terminal); a config that needs it says None
        config = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except Exception:  # the loader refuses a broken or missing config with its own sentence
        return None
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "sub_configs", None):
        return None
    layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
    kv_heads = 1 if getattr(config, "multi_query", False) else getattr(config, "num_key_value_heads", None) or heads
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, kv_heads)):
        return None
    return AttentionCounts(layers, heads, kv_heads)
