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

# More shapes for models/ tests, kept out of FAMILIES so suites parametrized over FAMILIES do not grow:
# Qwen2 mixing full and sliding layers through max_window_layers, and GPT-BigCode's multi-query attention.
EXTRA_FAMILIES = {
    "qwen2_sliding": ("qwen2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=64, max_position_embeddings=64, use_sliding_window=True,
                                    sliding_window=3, max_window_layers=1)),
    "gpt_bigcode": ("gpt_bigcode", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True,
                                        bos_token_id=0, eos_token_id=0)),
}

ENCODERS = {"bert"}
# transformers refuses sdpa for these (softcap): they run eager only.
SDPA_UNSUPPORTED = {"gemma2"}


def tiny_config(family: str):
    model_type, overrides = FAMILIES[family] if family in FAMILIES else EXTRA_FAMILIES[family]
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, **overrides)


def tiny_model(family: str, attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A seeded random model of `family` in eval mode, with the given attention kernel."""
    config = tiny_config(family)
    torch.manual_seed(seed)
    auto = AutoModel if family in ENCODERS else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def tiny_gpt_oss(seed: int = 0):
    """A seeded random gpt-oss (eager) whose learned sink logits per head (s_aux) are large enough to matter."""
    config = AutoConfig.for_model("gpt_oss", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=32,
                                  num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                  max_position_embeddings=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2)
    return model


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 single-byte tokens of a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tiny_gguf(path, arch: str = "llama", *, layers: int = 2, hidden: int = 32, heads: int = 4,
                    kv_heads: int = 2, ffn: int = 64, context: int = 64, seed: int = 0):
    """Write a seeded random Llama-layout GGUF (F32 tensors, byte-level BPE tokenizer of 257 tokens).

    Converting it takes about a second, so GGUF cache behaviour can be tested without the real
    model. `arch` only changes the declared architecture (an unknown one makes an unsupported file).
    """
    import gguf
    import numpy as np

    tokens = _byte_level_alphabet() + ["<|endoftext|>"]
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(context)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_embedding_length(hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)

    def random(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    random("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        random(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        random(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        random(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        random(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        random(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        random(f"blk.{i}.ffn_up.weight", ffn, hidden)
        random(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_llava(folder, words: list[str], tokenizer, vision: dict, *, text_layers: int) -> None:
    """Save a tiny random LLaVA with its processor to `folder`: a CLIP tower (`vision`: a CLIPVisionConfig's
    fields, its [CLS] dropped), a Llama of `text_layers` layers with 4 heads on 2 KV heads over `words` plus
    "<image>" (one image token per patch), and `tokenizer` (for `words`) taught the image token."""
    import transformers

    torch.manual_seed(0)
    words = words + ["<image>"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    text = transformers.LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2)
    config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**vision), text_config=text,
                                      image_token_index=words.index("<image>"), image_seq_length=patches,
                                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    transformers.LlavaForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    side = vision["image_size"]
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
                                vision_feature_select_strategy="default", image_token="<image>",
                                num_additional_image_tokens=1).save_pretrained(folder)


def write_tiny_vit(folder, vision: dict) -> None:
    """Save a tiny random ViT (`vision`: a ViTConfig's fields) with an image processor resizing to its input size."""
    import transformers

    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(**vision)).save_pretrained(folder)
    side = vision["image_size"]
    transformers.ViTImageProcessor(size={"height": side, "width": side}).save_pretrained(folder)


# Qwen2-VL / Qwen2.5-VL: token ids of the image and vision markers, and a language model with M-RoPE.
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 70, 71, 72, 73
QWEN_TEXT = dict(vocab_size=80, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 0]})
QWEN_MARKERS = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
                    vision_end_token_id=QWEN_END, bos_token_id=0, eos_token_id=1)


def tiny_qwen2_vl(seed: int = 0):
    """A seeded random Qwen2-VL in eval mode: a 2-layer tower of 2x2-pixel patches merged 2x2, a 2-layer language model."""
    import transformers

    torch.manual_seed(seed)
    vision = dict(depth=2, embed_dim=16, hidden_size=16, num_heads=4, mlp_ratio=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    config = transformers.Qwen2VLConfig(vision_config=vision, text_config=QWEN_TEXT, **QWEN_MARKERS)
    return transformers.Qwen2VLForConditionalGeneration(config).eval()


def tiny_qwen2_5_vl(seed: int = 0, *, depth: int = 2, full_layers=(1,)):
    """A seeded random Qwen2.5-VL in eval mode: a tower of 2x2-pixel patches merged 2x2 whose layers attend within
    8-pixel windows (2x2 merged tokens) except `full_layers`, and a 2-layer language model."""
    import transformers

    torch.manual_seed(seed)
    vision = dict(depth=depth, hidden_size=16, out_hidden_size=16, intermediate_size=32, num_heads=4, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=8,
                  fullatt_block_indexes=list(full_layers))
    config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=QWEN_TEXT, **QWEN_MARKERS)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_image_inputs(grids: list[tuple[int, int]], text_before=(5, 6), text_after=(7, 8), seed: int = 1) -> dict:
    """Model inputs with one image per (rows, cols) patch grid (single frames, rows and cols even), built by hand as
    the processor would (it needs torchvision): seeded random patches, and per image START, one image token per
    2x2 merged patches, END."""
    grid = torch.tensor([[1, rows, cols] for rows, cols in grids])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(seed))
    ids = list(text_before)
    for rows, cols in grids:
        ids += [QWEN_START] + [QWEN_IMAGE] * (rows * cols // 4) + [QWEN_END]
    ids = torch.tensor([ids + list(text_after)])
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids == QWEN_IMAGE).int())


IDEFICS3_WORDS = ["<unk>", "<pad>", "look", "at", "and", "this", "<fake_token_around_image>", "<image>",
                  "<end_of_utterance>", "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def tiny_idefics3(seed: int = 0):
    """A seeded random Idefics3 (SmolVLM's architecture) in eval mode and its processor: tiles of 16 x 16 pixels in
    4 x 4 patches, shuffled 2x2 into 4 image tokens; an image is resized to 48 pixels on its long side and split
    into tiles, each tile's tokens after a <row_I_col_J> token and the global view's after <global-img>."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(IDEFICS3_WORDS)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>")
    images = transformers.Idefics3ImageProcessorPil(size={"longest_edge": 48}, max_image_size={"longest_edge": 16},
                                                    do_image_splitting=True)
    processor = transformers.Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4)
    torch.manual_seed(seed)
    vision = dict(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=32)
    text = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    config = transformers.Idefics3Config(vision_config=vision, text_config=text.to_dict(),
                                         image_token_id=vocab["<image>"], scale_factor=2)
    return transformers.Idefics3ForConditionalGeneration(config).eval(), processor
