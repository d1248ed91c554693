"""Tiny random-initialised models of every architecture family we claim, built locally (no download)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

VOCAB = 128

# family -> (model_type, config overrides); sizes are small but keep GQA, MoE and sliding windows real.
FAMILIES = {
    "bert": ("bert", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=64)),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
    "llama": ("llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, max_position_embeddings=64)),
    "mistral": ("mistral", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                intermediate_size=64, max_position_embeddings=64, sliding_window=5)),
    "qwen2": ("qwen2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, max_position_embeddings=64)),
    "qwen3": ("qwen3", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, intermediate_size=64, max_position_embeddings=64)),
    "qwen3_moe": ("qwen3_moe", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                    moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                    max_position_embeddings=64)),
    "gemma2": ("gemma2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, intermediate_size=64, max_position_embeddings=64, sliding_window=4,
                              attn_logit_softcapping=5.0, query_pre_attn_scalar=16)),
    "gemma3": ("gemma3_text", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=16, intermediate_size=64, max_position_embeddings=64, sliding_window=4,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                   query_pre_attn_scalar=16)),
}

ENCODERS = {"bert"}
# transformers refuses sdpa for these (softcap): they run eager only.
SDPA_UNSUPPORTED = {"gemma2"}


def tiny_config(family: str):
    model_type, overrides = FAMILIES[family]
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, **overrides)


def tiny_model(family: str, attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A seeded random model of `family` in eval mode, with the given attention kernel."""
    config = tiny_config(family)
    torch.manual_seed(seed)
    auto = AutoModel if family in ENCODERS else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()
