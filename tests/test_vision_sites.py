"""Vision sites: CLIP and SigLIP (vision and text towers), DeiT and Dinov2-with-registers captured exactly,
against eager `output_attentions`, on tiny random models; their special tokens labelled."""

from __future__ import annotations

import pytest
import torch
import transformers

from eager_reference import to_eager
from llm_heatmap.models import site_specs
from llm_heatmap.probes import capture_sites

VISION = dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=32)
TEXT = dict(vocab_size=60, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
PATCHES = ["r0,c0", "r0,c1", "r1,c0", "r1,c1"]


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, 8, 8, generator=generator), torch.randint(3, 60, (1, 6), generator=generator)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_both_towers_of_a_dual_encoder_equal_eager(family):
    torch.manual_seed(0)
    config_class, model_class = {"clip": (transformers.CLIPConfig, transformers.CLIPModel),
                                 "siglip": (transformers.SiglipConfig, transformers.SiglipModel)}[family]
    model = model_class(config_class(vision_config=VISION, text_config=TEXT)).eval()
    specs = site_specs(model)
    assert {site: (spec.num_layers, spec.num_heads) for site, spec in specs.items()} == {"vision": (2, 4), "text": (3, 2)}
    pixels, ids = _inputs()
    with torch.no_grad(), capture_sites(model) as probe:
        model(pixel_values=pixels, input_ids=ids)
    cubes = probe.cubes(ids)
    with torch.no_grad():
        out = to_eager(model)(pixel_values=pixels, input_ids=ids, output_attentions=True)
    references = {"vision": out.vision_model_output.attentions, "text": out.text_model_output.attentions}
    for site, reference in references.items():
        torch.testing.assert_close(cubes[site].pattern, torch.stack(reference, 1)[0], atol=1e-5, rtol=0, msg=site)
    special = ["[CLS]"] if family == "clip" else []  # SigLIP has no class token (it pools with a head)
    assert cubes["vision"].tokens == special + PATCHES
    assert len(cubes["text"].tokens) == 6


def test_siglip_pooling_head_is_not_a_layer():
    """SigLIP's pooling head runs torch's nn.MultiheadAttention, which bypasses the kernel registry."""
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION))
    (spec,) = site_specs(model).values()
    assert spec.num_layers == 2


@pytest.mark.parametrize("family", ["deit", "dinov2"])
def test_distillation_and_register_tokens_are_labelled(family):
    torch.manual_seed(0)
    if family == "deit":
        model = transformers.DeiTModel(transformers.DeiTConfig(**VISION))
        special = ["[CLS]", "[DIST]"]
    else:
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**VISION, num_register_tokens=3))
        special = ["[CLS]", "[REG 0]", "[REG 1]", "[REG 2]"]
    model.eval()
    pixels, _ = _inputs()
    with torch.no_grad(), capture_sites(model) as probe:
        model(pixel_values=pixels)
    (cube,) = probe.cubes().values()
    with torch.no_grad():
        out = to_eager(model)(pixel_values=pixels, output_attentions=True)
    torch.testing.assert_close(cube.pattern, torch.stack(out.attentions, 1)[0], atol=1e-5, rtol=0)
    assert cube.tokens == special + PATCHES
    axis = cube.key_axis
    assert axis.kind == "patches" and axis.patch_grid == (2, 2) and axis.special == dict(enumerate(special))
    assert axis.patch_cells().tolist() == [[-1, -1, -1]] * len(special) + [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]


def test_llava_vision_tower_and_language_model_equal_eager():
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(**VISION)
    text = transformers.LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=59, image_seq_length=4,
                                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = transformers.LlavaForConditionalGeneration(config).eval()
    specs = site_specs(model)
    assert {site: (s.num_layers, s.num_heads, s.num_kv_heads, s.causal) for site, s in specs.items()} == {
        "self": (3, 4, 2, True), "vision": (2, 4, 4, False)}
    ids = torch.tensor([[1, 5] + [59] * 4 + [7, 8, 9]])  # 4 image tokens: one per patch ("default" drops CLS)
    pixels, _ = _inputs()
    with torch.no_grad(), capture_sites(model) as probe:
        model(input_ids=ids, pixel_values=pixels)
    cubes = probe.cubes(ids)
    with torch.no_grad():
        out = to_eager(model)(input_ids=ids, pixel_values=pixels, output_attentions=True)
        tower = model.model.vision_tower(pixel_values=pixels, output_attentions=True)
    torch.testing.assert_close(cubes["self"].pattern, torch.stack(out.attentions, 1)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(cubes["vision"].pattern, torch.stack(tower.attentions, 1)[0], atol=1e-5, rtol=0)
    assert cubes["vision"].tokens == ["[CLS]"] + PATCHES and cubes["self"].num_keys == 9
    language = cubes["self"].key_axis  # the 4 image tokens are the tower's 2 x 2 patches, CLS dropped
    assert language.is_image.tolist() == [False] * 2 + [True] * 4 + [False] * 3 and language.patch_grid == (2, 2)
