"""Attention sites: every site of encoder-decoder and vision models captured exactly, against eager
`output_attentions` (encoder, decoder and cross-attention; a vision tower), on tiny random models."""

from __future__ import annotations

import pytest
import torch
import transformers

from llm_heatmap.errors import InputError
from llm_heatmap.models import site_specs, spec_from_model
from llm_heatmap.probes import AttentionCube, capture_sites

VOCAB = 60


def _seq2seq(family: str):
    common = dict(vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=1, eos_token_id=2)
    if family == "t5":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4, **common))
    if family == "whisper":
        return transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
            d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=6, max_target_positions=32,
            **common))
    config_class, model_class = {
        "bart": (transformers.BartConfig, transformers.BartForConditionalGeneration),
        "mbart": (transformers.MBartConfig, transformers.MBartForConditionalGeneration),
        "marian": (transformers.MarianConfig, transformers.MarianMTModel),
        "pegasus": (transformers.PegasusConfig, transformers.PegasusForConditionalGeneration),
    }[family]
    return model_class(config_class(d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                                    decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                    max_position_embeddings=64, **common))


def _eager(model):
    model.config._attn_implementation = "eager"
    for module in model.modules():
        if hasattr(module, "config") and module.config is not model.config:
            module.config._attn_implementation = "eager"
    return model


@pytest.mark.parametrize("family", ["bart", "mbart", "marian", "pegasus", "t5", "whisper"])
def test_every_site_of_an_encoder_decoder_equals_eager(family):
    torch.manual_seed(0)
    model = _seq2seq(family).eval()
    generator = torch.Generator().manual_seed(1)
    target = torch.randint(3, VOCAB, (1, 5), generator=generator)
    if family == "whisper":
        inputs = {"input_features": torch.randn(1, 8, 12, generator=generator)}
        source = None
    else:
        source = torch.randint(3, VOCAB, (1, 7), generator=generator)
        inputs = {"input_ids": source}
    with torch.no_grad(), capture_sites(model) as probe:
        model(**inputs, decoder_input_ids=target)
    cubes = probe.cubes(source, decoder_input_ids=target)
    assert list(cubes) == ["encoder", "decoder", "cross"]
    with torch.no_grad():
        out = _eager(model)(**inputs, decoder_input_ids=target, output_attentions=True)
    references = {"encoder": out.encoder_attentions, "decoder": out.decoder_attentions, "cross": out.cross_attentions}
    for site, reference in references.items():
        expected = torch.stack(reference, 1)[0]
        assert cubes[site].pattern.shape == expected.shape, site
        torch.testing.assert_close(cubes[site].pattern, expected, atol=1e-5, rtol=0, msg=site)
        # the captured spec's geometry (causality read from the kernel call) is the model's own mask
        assert torch.equal(cubes[site].attendable(), expected.gt(0).all(1)), site
        assert cubes[site].key_axis.kind == ("frames" if site != "decoder" and family == "whisper" else "text"), site
    cross = cubes["cross"]
    assert cross.num_queries == 5 and cross.num_keys == cubes["encoder"].num_keys, "cross-attention is rectangular"
    assert cross.spec.site == "cross" and not cross.spec.causal and cubes["decoder"].spec.causal
    assert len(cross.query_labels()) == 5 and len(cross.tokens) == cross.num_keys
    assert torch.equal(cubes["decoder"].attendable()[0], torch.ones(5, 5, dtype=torch.bool).tril())
    assert cross.attendable().all()
    if family == "whisper":
        assert cubes["encoder"].tokens[0] == "f0"


def test_site_specs_read_each_stack():
    model = _seq2seq("bart")
    specs = site_specs(model)
    assert [specs[s].num_layers for s in specs] == [2, 3, 3]
    assert [specs[s].num_heads for s in specs] == [4, 2, 2]
    assert specs["cross"].attention_modules[0].endswith("encoder_attn")
    assert spec_from_model(model).site == "encoder" and spec_from_model(model, "cross").site == "cross"
    with pytest.raises(InputError, match="site='vision' is not a site of BartForConditionalGeneration"):
        spec_from_model(model, "vision")


def test_a_single_site_model_keeps_its_spec():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    assert list(site_specs(model)) == ["self"]
    assert spec_from_model(model).site is None and spec_from_model(model).num_kv_heads == 2


def test_vit_is_captured_exactly_with_patch_labels():
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=32)
    model = transformers.ViTModel(config).eval()
    pixels = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    spec = spec_from_model(model)
    assert (spec.num_layers, spec.num_heads, spec.causal) == (2, 4, False)
    with torch.no_grad(), capture_sites(model) as probe:
        model(pixel_values=pixels)
    cubes = probe.cubes()
    (site,) = cubes
    with torch.no_grad():
        out = _eager(model)(pixel_values=pixels, output_attentions=True)
    torch.testing.assert_close(cubes[site].pattern, torch.stack(out.attentions, 1)[0], atol=1e-5, rtol=0)
    assert cubes[site].tokens == ["[CLS]", "r0,c0", "r0,c1", "r1,c0", "r1,c1"]


def test_a_cross_attention_cube_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = _seq2seq("bart").eval()
    source, target = torch.randint(3, VOCAB, (1, 6)), torch.randint(3, VOCAB, (1, 9))  # more rows than keys
    with torch.no_grad(), capture_sites(model, sites="cross") as probe:
        model(input_ids=source, decoder_input_ids=target)
    cube = probe.cubes(source, decoder_input_ids=target)["cross"]
    loaded = AttentionCube.load(cube.save(tmp_path / "cross.safetensors"))
    assert torch.equal(loaded.pattern, cube.pattern) and loaded.query_tokens == cube.query_tokens
    assert loaded.spec.site == "cross" and loaded.pattern.shape[-2:] == (9, 6)


def test_a_version_1_cube_file_still_loads(tmp_path):
    """Files written before sites existed (format version 1, no spec.site) load unchanged."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    spec = spec_from_model(transformers.LlamaForCausalLM(config))
    pattern = torch.softmax(torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(3)), -1)
    path = AttentionCube.from_pattern(pattern, spec, torch.arange(3)).save(tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["llm_heatmap"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    header["version"] = 1
    del header["spec"]["site"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"llm_heatmap": json.dumps(header)})
    old = AttentionCube.load(tmp_path / "old.safetensors")
    assert old.spec.site is None and torch.equal(old.pattern, pattern)


def test_cubes_name_a_missing_decoder_input():
    model = _seq2seq("bart").eval()
    source, target = torch.randint(3, VOCAB, (1, 6)), torch.randint(3, VOCAB, (1, 4))
    with torch.no_grad(), capture_sites(model) as probe:
        model(input_ids=source, decoder_input_ids=target)
    with pytest.raises(InputError, match="decoder_input_ids"):
        probe.cubes(source)
    with pytest.raises(InputError, match="site='vision' is not a site"):
        capture_sites(model, sites="vision")
