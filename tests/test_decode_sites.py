"""capture_decode_sites: an encoder-decoder's decode steps, per site (decoder self-attention, cross-attention),
straight from the kernel while `generate` runs with its cache. Against eager `output_attentions` forwards of the
source and each step's decoder prefix (tiny random BART, T5, Whisper); the shipped digit reverser's steps read the
source backwards; the `generate` command on it; the refusals."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from eager_reference import to_eager
from llm_heatmap.analyses.heads.cross_metrics import cross_metrics
from llm_heatmap.cli import main
from llm_heatmap.errors import InputError
from llm_heatmap.probes import AttentionCube
from llm_heatmap.probes.decode import TopKeys
from llm_heatmap.probes.decode_sites import capture_decode_sites

VOCAB = 60
REVERSER = Path(__file__).resolve().parents[1] / "examples" / "toy_models" / "digit-reverser"


def tiny_seq2seq(family: str):
    """A seeded random encoder-decoder in eval mode (sdpa): 2 decoder layers of 4 heads over a source of 7
    tokens (Whisper: 6 frames of 8 mel bins)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=1, eos_token_id=2)
    if family == "t5":
        config = transformers.T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                                       **common)
        return transformers.T5ForConditionalGeneration(config).eval()
    if family == "whisper":
        config = transformers.WhisperConfig(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                            decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                            num_mel_bins=8, max_source_positions=6, max_target_positions=32, **common)
        return transformers.WhisperForConditionalGeneration(config).eval()
    config = transformers.BartConfig(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                     max_position_embeddings=64, **common)
    return transformers.BartForConditionalGeneration(config).eval()


def source_inputs(family: str) -> dict:
    generator = torch.Generator().manual_seed(1)
    if family == "whisper":
        return {"input_features": torch.randn(1, 8, 12, generator=generator)}
    return {"input_ids": torch.randint(3, VOCAB, (1, 7), generator=generator)}


def sampled_steps(model, inputs: dict, new_tokens: int = 6, **options):
    """Sampled (a random model's greedy text repeats one token), so each step's prefix differs from the last;
    Whisper samples only where a temperature is given."""
    torch.manual_seed(3)
    with torch.no_grad():
        return capture_decode_sites(model, None, inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=True, temperature=1.0, **options)


@pytest.mark.parametrize("family", ["bart", "t5", "whisper"])
def test_each_steps_rows_equal_the_last_row_of_an_eager_forward(family):
    model, inputs = tiny_seq2seq(family), source_inputs(family)
    steps = sampled_steps(model, inputs)
    assert steps.num_steps == 6 and steps.prompt_tokens == 1 and len(set(steps.generated.tolist())) > 1
    cubes = steps.cubes()
    assert list(cubes) == ["decoder", "cross"]
    source_length = 6 if family == "whisper" else 7
    assert cubes["cross"].pattern.shape == (2, 4, 6, source_length)
    assert cubes["decoder"].pattern.shape == (2, 4, 6, 7)  # the start token and 6 generated over 6 steps
    to_eager(model)
    for step in range(steps.num_steps):
        prefix = steps.sequence[None, : steps.prompt_tokens + step]
        with torch.no_grad():
            out = model(**inputs, decoder_input_ids=prefix, output_attentions=True)
        for site, attentions in (("cross", out.cross_attentions), ("decoder", out.decoder_attentions)):
            expected = torch.stack(attentions, 1)[0, :, :, -1]  # "l h k": the row of the step's query
            row = cubes[site].pattern[:, :, step]
            torch.testing.assert_close(row[..., : expected.shape[-1]], expected, atol=1e-5, rtol=0,
                                       msg=f"{site} step {step}")
            assert not row[..., expected.shape[-1]:].any(), "a key the step did not see carries no weight"
    cross = cubes["cross"]
    assert cross.query_tokens == [str(int(t)) for t in steps.generated]  # rows: the tokens the steps wrote
    assert cross.query_positions.tolist() == list(range(6)) and cross.spec.site == "cross"
    assert cubes["decoder"].spec.site == "decoder" and int(cubes["decoder"].generated.sum()) == 6
    if family == "whisper":
        assert cross.tokens == [f"f{i}" for i in range(6)] and cross.key_axis.kind == "frames"
    else:
        assert cross.tokens == [str(int(t)) for t in inputs["input_ids"][0]] and cross.key_axis.kind == "text"


def test_one_site_layers_heads_and_streamed_consumers():
    """One site, or some layers and heads, keep exactly those rows; a site's step consumers receive its steps as they
    happen, so nothing needs keeping (TopKeys equals the kept rows' top keys)."""
    model, inputs = tiny_seq2seq("bart"), source_inputs("bart")
    both = sampled_steps(model, inputs)
    cross = sampled_steps(model, inputs, sites="cross", layers=[1], heads=[0, 3])
    assert torch.equal(cross.sequence, both.sequence) and cross.sites == ("cross",)
    torch.testing.assert_close(cross.cube("cross").pattern, both.cube("cross").pattern[1:, [0, 3]], atol=0, rtol=0)
    top = TopKeys(2)
    streamed = sampled_steps(model, inputs, consumers={"cross": [top]}, keep_rows=False)
    assert torch.equal(top.positions[..., 0], torch.stack(both.rows["cross"]).argmax(-1))
    with pytest.raises(InputError, match="kept no rows"):
        streamed.cube("cross")
    with pytest.raises(InputError, match="site='cross' was not captured"):
        sampled_steps(model, inputs, sites="decoder").cube("cross")
    whisper = sampled_steps(tiny_seq2seq("whisper"), source_inputs("whisper"), sites="decoder")
    assert whisper.source_tokens == [] and whisper.cube("decoder").pattern.shape == (2, 4, 6, 7)  # frames unknown


def test_refusals():
    model, inputs = tiny_seq2seq("bart"), source_inputs("bart")
    with pytest.raises(InputError, match="site='encoder' does not step"):
        capture_decode_sites(model, None, inputs, sites="encoder")
    with pytest.raises(InputError, match="beam search"):
        capture_decode_sites(model, None, inputs, num_beams=2)
    with pytest.raises(InputError, match="consumers name the sites decoder"):
        capture_decode_sites(model, None, inputs, sites="cross", consumers={"decoder": [TopKeys()]})
    causal = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(InputError, match="not an encoder-decoder model; capture a decoder-only"):
        capture_decode_sites(causal, None, {"input_ids": inputs["input_ids"]})
    from llm_heatmap.probes.decode import capture_decode

    with pytest.raises(InputError, match="capture_decode_sites"):
        capture_decode(model, None, "12")


@pytest.fixture(scope="module")
def reverser():
    from llm_heatmap.models import load_model

    model, tokenizer, _ = load_model(REVERSER)
    return model.eval(), tokenizer


@pytest.mark.parametrize("digits", ["3141592", "27182", "9081726354"])
def test_the_reversers_steps_read_the_source_backwards(reverser, digits):
    """The step that writes output digit i attends most to source digit n-1-i: the cross-attention step cube of
    the copying layer is anti-diagonal by the alignment metric (-1: the source read back to front)."""
    model, tokenizer = reverser
    steps = capture_decode_sites(model, tokenizer, digits, max_new_tokens=len(digits) + 2, do_sample=False)
    assert tokenizer.decode(steps.generated, skip_special_tokens=True).replace(" ", "") == digits[::-1]
    cross = steps.cube("cross")
    assert cross.tokens == [*digits, "</s>"] and cross.query_tokens == [*digits[::-1], "</s>"]
    n = len(digits)
    written = replace(cross, pattern=cross.pattern[:, :, :n], query_positions=cross.query_positions[:n],
                      query_mask=cross.query_mask[:n], query_tokens=cross.query_tokens[:n])  # the steps writing digits
    table = cross_metrics(written)
    last = table[table.layer == table.layer.max()]
    assert last.alignment.max() < -0.9, table
    head = int(last.loc[last.alignment.idxmin(), "head"])
    assert written.pattern[-1, head].argmax(-1).tolist() == list(range(n - 1, -1, -1))


def run(*argv) -> int:
    return main([*map(str, argv), "--quiet"])


def test_generate_command_on_the_reverser_writes_each_sites_steps(reverser, tmp_path, capsys):
    model, tokenizer = reverser
    assert run("generate", "31415", "--model", REVERSER, "--out", tmp_path, "--name", "rev") == 0
    summary = capsys.readouterr().out
    assert "'5'<-'5', '1'<-'1', '4'<-'4', '1'<-'1', '3'<-'3'" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rev.cross.decode.cube.safetensors", "rev.cross.decode.png",
        "rev.decoder.decode.cube.safetensors", "rev.decoder.decode.png"]
    with torch.no_grad():
        steps = capture_decode_sites(model, tokenizer, "31415", max_new_tokens=20, do_sample=False)
    for site in ("decoder", "cross"):
        written = AttentionCube.load(tmp_path / f"rev.{site}.decode.cube.safetensors")
        torch.testing.assert_close(written.pattern, steps.cube(site).pattern, atol=0, rtol=0)
        assert written.query_tokens == ["5", "1", "4", "1", "3", "</s>"] and written.spec.site == site
        assert (tmp_path / f"rev.{site}.decode.png").stat().st_size > 0
    assert AttentionCube.load(tmp_path / "rev.cross.decode.cube.safetensors").tokens == ["3", "1", "4", "1", "5", "</s>"]
    assert run("generate", "31415", "--model", REVERSER, "--out", tmp_path / "one", "--name", "rev", "--site",
               "cross", "--max-new-tokens", "3") == 0
    one = tmp_path / "one"
    assert sorted(p.name for p in one.iterdir()) == ["rev.cross.decode.cube.safetensors", "rev.cross.decode.png"]
    assert AttentionCube.load(one / "rev.cross.decode.cube.safetensors").pattern.shape == (2, 2, 3, 6)


@pytest.mark.parametrize("argv, message", [
    (["--site", "encoder"], "--site encoder does not step while the model generates"),
    (["--site", "vision"], "--site vision does not step"),
    (["--site", "crosss"], "--site 'crosss' is not an attention site"),
])
def test_generate_refuses_a_site_that_does_not_step_before_loading(argv, message, tmp_path, capsys):
    assert run("generate", "12", "--model", "no-such-model-dir", "--out", tmp_path, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_generate_refusals_after_loading_leave_no_file(tmp_path, capsys, monkeypatch):
    assert run("generate", "12", "--model", REVERSER, "--out", tmp_path, "--html") == 2
    assert "--html and --chat follow a decoder-only model" in capsys.readouterr().err
    from tiny_models import write_tiny_gguf

    monkeypatch.setenv("LLM_HEATMAP_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert run("generate", "the sky", "--model", gguf, "--out", tmp_path / "out", "--site", "cross") == 2
    assert "is a decoder-only model with one site; drop --site" in capsys.readouterr().err
    outputs = [p for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.relative_to(tmp_path).parts]
    assert [p.name for p in outputs] == ["tiny.gguf"]
