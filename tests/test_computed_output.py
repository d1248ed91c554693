"""The computed mode (capture(compute_output=True)): the probe's own blockwise attention output
replaces the kernel's, and must equal the model's kernel within fp32 rounding (the tolerance below
is the one SDPA and eager meet against each other on these models)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llm_heatmap import InputError
from llm_heatmap.probes import capture

from tiny_models import EXTRA_FAMILIES, FAMILIES, SDPA_UNSUPPORTED, tiny_gpt_oss, tiny_model

TOLERANCE = dict(atol=1e-5, rtol=1e-5)
FAMILY_KERNELS = [(family, kernel) for family in [*FAMILIES, *EXTRA_FAMILIES] for kernel in ("sdpa", "eager")
                  if not (kernel == "sdpa" and family in SDPA_UNSUPPORTED)]


def _ids(length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _outputs(model, ids, mask=None, **capture_options):
    with torch.no_grad():
        if not capture_options:
            return model(ids, attention_mask=mask, output_hidden_states=True), None
        with capture(model, **capture_options) as probe:
            out = model(ids, attention_mask=mask, output_hidden_states=True)
        return out, probe


def _assert_same_forward(expected, actual):
    head = "logits" if "logits" in expected else "last_hidden_state"
    torch.testing.assert_close(actual[head], expected[head], **TOLERANCE)
    for mine, theirs in zip(actual.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, **TOLERANCE)


@pytest.mark.parametrize("family, kernel", FAMILY_KERNELS)
def test_computed_output_equals_the_models_kernel(family, kernel):
    model, ids = tiny_model(family, kernel), _ids()
    plain, _ = _outputs(model, ids)
    computed, probe = _outputs(model, ids, compute_output=True)
    untouched, untouched_probe = _outputs(model, ids, compute_output=False)
    _assert_same_forward(plain, computed)
    torch.testing.assert_close(probe.cube(ids).pattern, untouched_probe.cube(ids).pattern, atol=1e-5, rtol=0)
    # the untouched mode runs the model's kernel: bit-identical
    head = "logits" if "logits" in plain else "last_hidden_state"
    assert torch.equal(untouched[head], plain[head])


def test_padded_batch():
    model = tiny_model("llama")
    ids = _ids(10).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the padded rows see no key at all
    plain, _ = _outputs(model, ids, mask)
    computed, probe = _outputs(model, ids, mask, compute_output=True)
    real = mask.bool()
    torch.testing.assert_close(computed.logits[real], plain.logits[real], **TOLERANCE)
    _, untouched = _outputs(model, ids, mask, compute_output=False)
    torch.testing.assert_close(probe.cube(ids, mask).pattern, untouched.cube(ids, mask).pattern, atol=1e-5, rtol=0)


class _Recorder:
    takes_trimmed_parts = False

    def __init__(self):
        self.parts = []

    def consume(self, part):
        self.parts.append((part.layers, part.stream.row_start, part.pattern.clone(),
                           None if part.output_norms is None else part.output_norms.clone()))

    def finish(self):
        pass


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_streaming_subset_and_last_rows_equal_the_untouched_mode(family):
    """Streaming with a head subset, the last rows only and small chunks: the same parts (patterns and
    output norms) as the untouched mode, and the model's own output."""
    kernel = "eager" if family in SDPA_UNSUPPORTED else "sdpa"
    model, ids = tiny_model(family, kernel), _ids(16)
    options = dict(heads=[1, 3], last_queries=7, chunk_rows=3, keep=False)
    untouched, computed = _Recorder(), _Recorder()
    plain, _ = _outputs(model, ids)
    _outputs(model, ids, consumers=[untouched], **options)
    out, _ = _outputs(model, ids, consumers=[computed], compute_output=True, **options)
    _assert_same_forward(plain, out)
    assert len(computed.parts) == len(untouched.parts) > 0
    for (layers, start, pattern, norms), (layers_u, start_u, pattern_u, norms_u) in zip(computed.parts, untouched.parts):
        assert (layers, start) == (layers_u, start_u)
        torch.testing.assert_close(pattern, pattern_u, atol=1e-5, rtol=0)  # later layers see rounded inputs
        if norms_u is not None:
            torch.testing.assert_close(norms, norms_u, atol=1e-5, rtol=1e-5)


def test_attention_sinks_gpt_oss():
    """gpt-oss adds a learned sink logit per head (s_aux) to every softmax."""
    model = tiny_gpt_oss()
    ids = _ids(12)
    plain, _ = _outputs(model, ids)
    computed, _ = _outputs(model, ids, compute_output=True)
    _assert_same_forward(plain, computed)


def test_dropout_in_training_mode_is_refused():
    config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, attention_dropout=0.5)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    with pytest.raises(InputError, match="dropout"), capture(model, compute_output=True):
        model(_ids())


def test_one_computer_per_module():
    model = tiny_model("llama")
    with capture(model, compute_output=True), pytest.raises(InputError, match="already"):
        with capture(model, compute_output=True):
            pass


class _Drop:
    def consume(self, part) -> None:
        pass


def test_the_default_computes_when_streaming_and_leaves_the_kernel_otherwise():
    """compute_output=None: computed for a streaming capture of a model in eval mode (faster there); untouched
    when a cube is kept, in training mode, or when an outer capture already computes the layers."""
    from llm_heatmap.probes import tap

    model = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    with capture(model, consumers=[_Drop()], keep=False) as probe:
        assert probe.compute_output and tap.is_computed(attention)
        with capture(model, consumers=[_Drop()], keep=False) as inner:
            assert not inner.compute_output
            _outputs(model, _ids())
    with capture(model) as probe:
        assert not probe.compute_output and not tap.is_computed(attention)
    assert not capture(model.train(), consumers=[_Drop()], keep=False).compute_output


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "minilm"])
def test_real_models(name, request):
    """Through 30 (6) layers the fp32 rounding adds up, so the bound is what the model's own eager kernel
    differs from its SDPA kernel on the same input (twice that, and at least 1e-5)."""
    model, tokenizer, _ = request.getfixturevalue(name)
    eager_model = request.getfixturevalue(f"{name}_eager")[0]
    encoded = tokenizer(["Attention heads attend to the previous token and to the first one, mostly."],
                        return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    plain, _ = _outputs(model, ids, mask)
    eager, _ = _outputs(eager_model, ids, mask)
    computed, _ = _outputs(model, ids, mask, compute_output=True, consumers=[_Recorder()], keep=False, chunk_rows=5)
    head = "logits" if "logits" in plain else "last_hidden_state"
    for what, mine, theirs, other in [(head, computed[head], plain[head], eager[head]),
                                       *(("hidden", *states) for states in zip(computed.hidden_states,
                                                                               plain.hidden_states, eager.hidden_states))]:
        bound = max(1e-5, 2 * (other - theirs).abs().max().item())
        assert (mine - theirs).abs().max().item() <= bound, what


@pytest.mark.parametrize("command", ["metrics", "grid"])
def test_the_cli_flag_picks_who_computes_the_output(command, tmp_path, monkeypatch):
    """--attention-output: 'auto' computes when streaming (metrics streams; grid keeps a short prompt's cube),
    'computed' and 'model' force either; the tables agree within fp32 rounding."""
    import pandas as pd

    from llm_heatmap import cli
    from llm_heatmap.probes.capture import Probe
    from tiny_models import write_tiny_gguf

    monkeypatch.setenv("LLM_HEATMAP_CACHE", str(tmp_path / "cache"))
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    modes = []
    enter = Probe.__enter__

    def recording_enter(probe):
        modes.append(probe.compute_output)
        return enter(probe)

    monkeypatch.setattr(Probe, "__enter__", recording_enter)
    tables = {}
    for flag in ("auto", "computed", "model"):
        out = tmp_path / flag
        argv = [command, "the cat sat on the mat", "--model", str(model), "--attention-output", flag, "--quiet"]
        argv += ["--out", str(out / "t.csv")] if command == "metrics" else ["--out", str(out), "--name", "g", "--no-cube"]
        modes.clear()
        assert cli.main(argv) == 0
        assert modes == [{"auto": command == "metrics", "computed": True, "model": False}[flag]]
        tables[flag] = pd.read_csv(out / "t.csv" if command == "metrics" else out / "g.metrics.csv")
    numbers = [t.select_dtypes("number").to_numpy(float) for t in tables.values()]
    for other in numbers[1:]:
        assert abs(other - numbers[0]).max() < 1e-4
