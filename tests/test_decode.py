"""capture_decode: every decode step's rows straight from the kernel, against eager `generate(output_attentions=True)`
step by step, on the dynamic, static, sliding-window and quantized caches; sampling; refusals."""

from __future__ import annotations

import pytest
import torch

from llm_heatmap.errors import InputError
from llm_heatmap.probes.decode import capture_decode, step_key_positions
from tiny_models import VOCAB, tiny_model


class IdTokenizer:
    """Token ids written as numbers: enough for generate() and the cube's token strings."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def __init__(self, ids):
        self.ids = ids

    def __call__(self, text, return_tensors=None):
        return {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids)}

    def convert_ids_to_tokens(self, ids):
        return [str(i) for i in ids]


def prompt(length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def eager_steps(model, ids, new_tokens: int, **options):
    """(sequence, per step the list of each layer's "h k" row) of eager generate with output_attentions: the
    prefill's last row, then each decode step's one row, as the kernel saw its keys."""
    out = model.generate(input_ids=ids, max_new_tokens=new_tokens, output_attentions=True, return_dict_in_generate=True,
                         pad_token_id=0, **options)
    return out.sequences[0], [[layer[0, :, -1] for layer in step] for step in out.attentions]


CASES = {  # family: generate options (a window of 4 in the sliding families, 7 new tokens after 9: past it)
    "llama-dynamic": ("llama", {}),
    "llama-static": ("llama", {"cache_implementation": "static"}),
    "qwen2-dynamic": ("qwen2", {}),
    "mistral-sliding": ("mistral", {}),
    "gemma3-hybrid": ("gemma3", {}),
    "llama-fp8-quantized": ("llama", {"cache_implementation": "quantized", "cache_config": {"backend": "fp8"}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_step_equals_eager_generate(case):
    family, options = CASES[case]
    model, eager = tiny_model(family), tiny_model(family, "eager")
    ids = prompt()
    with torch.no_grad():
        steps = capture_decode(model, IdTokenizer(ids), "p", max_new_tokens=7, do_sample=False, **options)
        sequence, reference = eager_steps(eager, ids, 7, do_sample=False, **options)
    assert torch.equal(steps.sequence, sequence) and steps.num_steps == 7
    for step, (mine, layers) in enumerate(zip(steps.rows, reference)):
        position = ids.shape[-1] - 1 + step
        assert mine.shape[-1] == position + 1
        for layer, theirs in enumerate(layers):
            seen = step_key_positions(position, theirs.shape[-1])
            torch.testing.assert_close(mine[layer][:, seen], theirs[:, :len(seen)], rtol=1e-5, atol=1e-6)
            assert (theirs[:, len(seen):] == 0).all()  # a static cache's empty slots
            outside = torch.ones(position + 1, dtype=torch.bool)
            outside[seen] = False
            assert (mine[layer][:, outside] == 0).all()


def test_a_sliding_window_step_sees_only_the_window_and_the_cube_places_it():
    model = tiny_model("mistral")  # sliding_window=4
    ids = prompt()
    with torch.no_grad():
        steps = capture_decode(model, IdTokenizer(ids), "p", max_new_tokens=6, do_sample=False)
    window = model.config.sliding_window
    seen = (steps.rows[-1] > 0).any(1).any(0).nonzero().flatten()
    assert len(seen) <= window and seen[-1] == len(steps.sequence) - 2
    cube = steps.cube()
    assert cube.pattern.shape == (2, 4, 6, len(steps.sequence))
    assert cube.query_positions.tolist() == list(range(ids.shape[-1] - 1, ids.shape[-1] + 5))
    row = cube.pattern[:, :, -1]
    assert (row[..., :int(seen[0])] == 0).all() and torch.allclose(row.sum(-1), torch.ones(()))
    assert cube.generated.sum() == 6 and steps.top_keys().shape == (6, 2, 4)


def test_quantized_cache_rows_differ_from_a_re_forward_of_the_final_sequence():
    """The fp8 cache quantizes the keys the kernel reads, so what the model looked at is not what a re-forward
    of the same tokens computes: only the per-step capture shows the former."""
    model = tiny_model("llama")
    ids = prompt()
    with torch.no_grad():
        steps = capture_decode(model, IdTokenizer(ids), "p", max_new_tokens=5, do_sample=False,
                               cache_implementation="quantized", cache_config={"backend": "fp8"})
        again = tiny_model("llama", "eager")(input_ids=steps.sequence[None], output_attentions=True).attentions
    re_forward = torch.stack([layer[0, :, ids.shape[-1] + 3, :ids.shape[-1] + 4] for layer in again])
    assert steps.rows[4].shape == re_forward.shape
    # a dynamic cache agrees with the re-forward to 1e-6 (test_sampling_...); fp8 keys move the rows past that
    assert (steps.rows[4] - re_forward).abs().max() > 1e-5


def test_sampling_rows_are_the_rows_of_the_sampled_sequence():
    model = tiny_model("llama")
    ids = prompt()
    torch.manual_seed(3)
    with torch.no_grad():
        steps = capture_decode(model, IdTokenizer(ids), "p", max_new_tokens=6, do_sample=True, temperature=1.5)
        again = tiny_model("llama", "eager")(input_ids=steps.sequence[None], output_attentions=True).attentions
    for step, row in enumerate(steps.rows):  # dynamic cache: a re-forward of the sampled tokens has the same rows
        position = ids.shape[-1] - 1 + step
        expected = torch.stack([layer[0, :, position, :position + 1] for layer in again])
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)


def test_beam_search_and_encoders_are_refused():
    model, ids = tiny_model("llama"), prompt()
    with pytest.raises(InputError, match="beam search"):
        capture_decode(model, IdTokenizer(ids), "p", max_new_tokens=3, num_beams=2)
    with pytest.raises(InputError, match="cannot generate"):
        capture_decode(tiny_model("bert"), IdTokenizer(ids), "p")
    with pytest.raises(InputError, match="max_new_tokens=0"):
        capture_decode(model, IdTokenizer(ids), "p", max_new_tokens=0)
    from transformers import BartConfig, BartForConditionalGeneration

    seq2seq = BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                                      encoder_attention_heads=2, decoder_attention_heads=2,
                                                      encoder_ffn_dim=32, decoder_ffn_dim=32)).eval()
    with pytest.raises(InputError, match="is an encoder-decoder model.*--target"):
        capture_decode(seq2seq, IdTokenizer(ids), "p")


@pytest.mark.slow
def test_smollm2_steps_equal_eager_generate(smollm2, smollm2_eager):
    model, tokenizer, _ = smollm2
    text = "The capital of France is"
    with torch.no_grad():
        steps = capture_decode(model, tokenizer, text, max_new_tokens=4, do_sample=False)
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        sequence, reference = eager_steps(smollm2_eager[0], ids, 4, do_sample=False)
    assert torch.equal(steps.sequence, sequence)
    for mine, layers in zip(steps.rows, reference):
        torch.testing.assert_close(mine, torch.stack(layers), rtol=1e-4, atol=1e-5)


def test_the_step_table_reads_each_row():
    from llm_heatmap.analyses.heads.decode_table import decode_step_table

    model, ids = tiny_model("llama"), prompt()
    with torch.no_grad():
        steps = capture_decode(model, IdTokenizer(ids), "p", max_new_tokens=3, do_sample=False)
    table = decode_step_table(steps)
    assert len(table) == 3 * 2 * 4
    row = table[(table["step"] == 2) & (table["layer"] == 1) & (table["head"] == 3)].iloc[0]
    weights = steps.rows[2][1, 3].double()
    assert row.top_key == int(weights.argmax()) and row.top_weight == pytest.approx(float(weights.max()))
    assert row.entropy == pytest.approx(float(-(weights * weights.log()).sum()), rel=1e-9)
    assert row.position == ids.shape[-1] + 1 and row.token == steps.tokens[ids.shape[-1] + 2] and row.kv_group == 1


def test_the_generate_command_writes_the_table_the_cube_and_the_view(tmp_path, monkeypatch, capsys):
    import pandas as pd

    from llm_heatmap.cli import main
    from llm_heatmap.probes import AttentionCube
    from tiny_models import write_tiny_gguf

    monkeypatch.setenv("LLM_HEATMAP_CACHE", str(tmp_path / "cache"))
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    argv = ["generate", "the sky is", "--max-new-tokens", "4", "--model", str(model), "--out", str(out), "--html",
            "--name", "sky"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "generated 4 tokens" in capsys.readouterr().out
    table = pd.read_csv(out / "sky.steps.csv")
    cube = AttentionCube.load(out / "sky.decode.cube.safetensors")
    assert len(table) == 4 * 2 * 4 and cube.pattern.shape[2] == 4 and int(cube.generated.sum()) == 4
    assert (out / "sky.decode.html").read_text().count('id="dv-data"') == 1
    assert main([*argv, "--do-sample", "--temperature", "0", "--force"]) == 2
    assert "--temperature" in capsys.readouterr().err


def test_steps_stream_to_consumers_and_need_no_rows():
    """Consumers receive each step as it happens; without kept rows the top keys and the step table come from
    them, equal to what the kept rows give."""
    from llm_heatmap.analyses.heads.decode_table import DecodeStepReducer, decode_step_table
    from llm_heatmap.probes.decode import PooledStrip, TopKeys

    model, ids = tiny_model("mistral"), prompt()  # a sliding window: rows past it hold zeros
    with torch.no_grad():
        kept = capture_decode(model, IdTokenizer(ids), "p", max_new_tokens=6, do_sample=False)
        top, reducer, strip = TopKeys(3), DecodeStepReducer(), PooledStrip(ids.shape[-1] + 6, bins=4)
        streamed = capture_decode(model, IdTokenizer(ids), "p", max_new_tokens=6, do_sample=False,
                                  consumers=[top, reducer, strip], keep_rows=False)
    assert streamed.rows == [] and torch.equal(streamed.sequence, kept.sequence)
    assert torch.equal(top.positions[..., 0], kept.top_keys()) and top.positions.shape == (6, 2, 4, 3)
    expected = torch.stack([row.topk(3, dim=-1).values for row in kept.rows])
    torch.testing.assert_close(top.weights, expected)
    import pandas as pd

    pd.testing.assert_frame_equal(reducer.table(streamed), decode_step_table(kept))
    # 15 positions in 4 bins (the downsampler's cut); each bin holds the summed weight of its positions
    cube = kept.cube()
    from llm_heatmap.probes.geometry import bin_edges

    edges = bin_edges(len(kept.sequence), 4)
    expected_strip = torch.stack([cube.pattern[..., a:b].sum(-1) for a, b in zip(edges, edges[1:])], -1)
    torch.testing.assert_close(strip.strip, torch.einsum("lhsb->slhb", expected_strip))
    torch.testing.assert_close(strip.strip.sum(-1), torch.ones(6, 2, 4))
    with pytest.raises(InputError, match="keep_rows=False"):
        streamed.cube()
