"""Vision-language sites on tiny random models, every site against an independent reference within 1e-5:
Qwen2-VL (M-RoPE, 2x2 patch merge, dynamic resolution; its tower's `output_attentions` records nothing, so
the tower is checked against its attention recomputed from the module's inputs), Idefics3 / SmolVLM (image
tiles), Gemma 3 (bidirectional image block in the spec and the geometry); and CLIP's text tower causal as its
kernel call says. Several images in one Qwen2-VL pass and Qwen2.5-VL's windowed tower: test_vlm_packed.py."""

from __future__ import annotations

import torch
import transformers
from transformers.models.qwen2_vl import modeling_qwen2_vl

from eager_reference import to_eager
from llm_heatmap.analyses.heads.image_share import image_share
from llm_heatmap.models import site_specs
from llm_heatmap.probes import AttentionCube, capture_sites
from tiny_models import QWEN_END as END, QWEN_IMAGE as IMAGE, QWEN_START as START, tiny_qwen2_vl

def _vision_reference(model, pixels, grid):
    """softmax(q k^T * scaling) of every tower layer, q and k rebuilt from each attention module's inputs
    with the tower's own rotary embedding (one image: one attention block over all its patches)."""
    seen = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        q, k, _ = module.qkv(hidden).reshape(hidden.shape[0], 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = modeling_qwen2_vl.apply_rotary_pos_emb_vision(q, k, cos, sin)
        scores = torch.einsum("qhd,khd->hqk", q, k) * module.scaling
        seen.append(scores.softmax(-1))

    handles = [block.attn.register_forward_pre_hook(record, with_kwargs=True) for block in model.model.visual.blocks]
    try:
        with torch.no_grad():
            model.model.visual(pixels, grid_thw=grid)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(seen)


def test_qwen2_vl_language_model_and_vision_tower_equal_their_references():
    model = tiny_qwen2_vl()
    specs = site_specs(model)
    assert {site: (s.num_layers, s.num_heads, s.num_kv_heads, s.causal) for site, s in specs.items()} == {
        "self": (2, 4, 2, True), "vision": (2, 4, 4, False)}
    grid = torch.tensor([[1, 4, 6]])  # one frame of 4 x 6 patches (dynamic resolution: not square)
    patches = int(grid.prod())
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(patches, 3 * 2 * 2 * 2, generator=generator)
    ids = torch.tensor([[5, 6, START] + [IMAGE] * (patches // 4) + [END, 7, 8]])  # a 2x2 merge: 4 patches a token
    inputs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids == IMAGE).int())
    with torch.no_grad(), capture_sites(model) as probe:
        model(**inputs)
    cubes = probe.cubes(ids)
    with torch.no_grad():
        out = to_eager(model)(**inputs, output_attentions=True)
    torch.testing.assert_close(cubes["self"].pattern, torch.stack(out.attentions, 1)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(cubes["vision"].pattern, _vision_reference(model, pixels, grid), atol=1e-5, rtol=0)
    assert cubes["self"].num_keys == 12 and cubes["vision"].num_keys == patches
    # the tower's patches come in 2x2 merge windows: window (0, 0) first, then window (0, 1) from column 2
    vision = cubes["vision"].key_axis
    assert vision.kind == "patches" and vision.patch_grid == (4, 6) and vision.merge == 1  # a position: one patch
    assert vision.patch_cells()[:6].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [0, 0, 2], [0, 0, 3]]
    assert sorted(map(tuple, vision.patch_cells()[:, 1:].tolist())) == [(r, c) for r in range(4) for c in range(6)]
    assert cubes["vision"].tokens[4] == "r0,c2"
    # the language model's 6 image tokens are the merged 2 x 3 grid, each standing for 2x2 patches
    language = cubes["self"].key_axis
    assert language.kind == "mixed" and language.patch_grid == (2, 3) and language.merge == 2
    assert language.is_image.tolist() == [False] * 3 + [True] * 6 + [False] * 3
    assert language.patch_cells()[3:9, 1:].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert language.patch_cells()[0].tolist() == [-1, -1, -1]


VISION = dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=32)


def test_gemma3_image_tokens_see_each_other_in_the_spec_and_the_geometry(tmp_path):
    """Gemma 3's language model is causal except among one image's tokens: the captured spec holds that
    block, and the attendable cells are exactly where the model's own eager weights are positive."""
    torch.manual_seed(0)
    text = transformers.Gemma3TextConfig(vocab_size=80, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=4, sliding_window=3,
                                         layer_types=["sliding_attention", "full_attention"])
    config = transformers.Gemma3Config(vision_config=transformers.SiglipVisionConfig(**VISION).to_dict(),
                                       text_config=text.to_dict(), mm_tokens_per_image=4, image_token_index=70,
                                       boi_token_index=71, eoi_token_index=72)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    ids = torch.tensor([[5, 6, 71] + [70] * 4 + [72, 7, 8]])
    pixels = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == 70).long())
    declared = site_specs(model)
    assert declared["self"].causal and declared["self"].bidirectional_blocks == ()
    with torch.no_grad(), capture_sites(model) as probe:
        model(**inputs)
    cubes = probe.cubes(ids)
    with torch.no_grad():
        out = to_eager(model)(**inputs, output_attentions=True)
        tower = model.model.vision_tower(pixel_values=pixels, output_attentions=True)
    reference = torch.stack(out.attentions, 1)[0]
    torch.testing.assert_close(cubes["self"].pattern, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(cubes["vision"].pattern, torch.stack(tower.attentions, 1)[0], atol=1e-5, rtol=0)
    spec = cubes["self"].spec
    assert spec.causal and spec.bidirectional_blocks == ((3, 6),)
    mask = cubes["self"].attendable()
    assert torch.equal(mask, reference.gt(0).any(1)) and torch.equal(mask, reference.gt(0).all(1))
    assert mask[1, 3, 6] and not mask[1, 2, 3], "the image block is bidirectional, the text before it causal"
    assert mask[0, 3, 6] and not mask[0, 6, 3], "on a sliding layer the window still cuts the block"
    loaded = AttentionCube.load(cubes["self"].save(tmp_path / "gemma3.cube.safetensors"))
    assert loaded.spec.bidirectional_blocks == ((3, 6),) and torch.equal(loaded.attendable(), mask)
    assert cubes["self"].key_axis.is_image.tolist() == [False] * 3 + [True] * 4 + [False] * 3
    assert cubes["self"].key_axis.patch_grid == (2, 2) and cubes["vision"].key_axis.patch_grid == (2, 2)
    assert loaded.key_axis == cubes["self"].key_axis
    # text rows after the image: 7 and 8 reach it on the sliding layer (window 3), 7, 8 and 9 on the full one
    on_image = reference[..., 3:7].sum(-1).double()  # "l h q"
    table = image_share(cubes["self"])
    assert table["text_rows"].tolist() == [2] * 4 + [3] * 4
    expected = torch.cat([on_image[0, :, 7:9].mean(-1), on_image[1, :, 7:10].mean(-1)])
    torch.testing.assert_close(torch.tensor(table["image_share"].values), expected, atol=1e-6, rtol=0)


def test_clip_text_tower_is_causal_as_its_kernel_call_says():
    """CLIP's text attention module says is_causal=False but calls the kernel with is_causal=True: the
    captured spec follows the call, under both kernels (SDPA gets no mask, eager a causal one)."""
    torch.manual_seed(0)
    text = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=VISION, text_config=text)).eval()
    ids = torch.randint(3, 60, (1, 6), generator=torch.Generator().manual_seed(1))
    pixels = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for kernel in ("sdpa", "eager"):
        for module in model.modules():
            if hasattr(module, "config"):
                module.config._attn_implementation = kernel
        with torch.no_grad(), capture_sites(model) as probe:
            model(pixel_values=pixels, input_ids=ids)
        cubes = probe.cubes(ids)
        assert cubes["text"].spec.causal and not cubes["vision"].spec.causal, kernel
        pattern = cubes["text"].pattern
        assert torch.equal(cubes["text"].attendable(), pattern.gt(0).all(1)), kernel


def test_idefics3_tiles_are_one_vision_sequence_each_and_the_text_model_equals_eager():
    """Idefics3 / SmolVLM split an image into tiles that the vision tower runs as a batch: the vision cube
    holds one sequence per tile, each equal to eager; the text model's pattern over the image tokens too."""
    torch.manual_seed(0)
    text = transformers.LlamaConfig(vocab_size=80, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    config = transformers.Idefics3Config(vision_config=VISION, text_config=text.to_dict(), image_token_id=70,
                                         scale_factor=2)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    assert {site: (s.num_layers, s.num_heads, s.causal) for site, s in site_specs(model).items()} == {
        "vision": (2, 4, False), "text": (2, 4, True)}
    tiles = torch.randn(1, 3, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # one image in 3 tiles
    ids = torch.tensor([[5, 6] + [70] * 3 + [7]])  # 4 patches a tile, merged 2x2 (scale_factor 2): a token each
    with torch.no_grad(), capture_sites(model) as probe:
        model(input_ids=ids, pixel_values=tiles)
    cubes = probe.cubes(ids)
    with torch.no_grad():
        out = to_eager(model)(input_ids=ids, pixel_values=tiles, output_attentions=True)
        tower = model.model.vision_model(pixel_values=tiles[0], output_attentions=True)
    torch.testing.assert_close(cubes["text"].pattern, torch.stack(out.attentions, 1)[0], atol=1e-5, rtol=0)
    vision = cubes["vision"]
    assert vision.batched and len(vision) == 3
    torch.testing.assert_close(vision.pattern, torch.stack(tower.attentions, 1), atol=1e-5, rtol=0)
    assert vision.item(2).tokens == ["r0,c0", "r0,c1", "r1,c0", "r1,c1"]
    assert vision.key_axis.patch_grid == (2, 2) and vision.key_axis.special == {}
    assert cubes["text"].key_axis.is_image.tolist() == [False, False, True, True, True, False]
