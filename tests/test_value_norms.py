"""Value norms (Kobayashi et al. 2020): what each head writes, against a direct computation from the model's own
modules (forward hooks on the value and output projections of an eager forward, weights read from the modules)."""

from __future__ import annotations

import pytest
import torch

from llm_heatmap.errors import InputError
from llm_heatmap.models import spec_from_model
from llm_heatmap.probes import capture, capture_prompt
from tiny_models import EXTRA_FAMILIES, FAMILIES, VOCAB, tiny_model


def value_projection(model, attention_path: str, spec):
    """(module whose output holds the values, function: its output -> `"b k g d"` values)."""
    attention = model.get_submodule(attention_path)
    g, d = spec.num_kv_heads, spec.head_dim
    for name in ("v_proj", "value"):
        if hasattr(attention, name):
            return getattr(attention, name), lambda out: out.unflatten(-1, (g, d))
    width = spec.num_heads * d  # GPT-2 / GPT-BigCode: one c_attn for q, k and v; the values come last
    return attention.c_attn, lambda out: out[..., width + g * d:].unflatten(-1, (g, d))


def output_weight(projection) -> torch.Tensor:
    """`"(h d) m"` from the module's weight: nn.Linear stores it transposed (a 4-bit one packed, dequantized
    here with bitsandbytes' own function), GPT-2's Conv1D does not. A 4-bit weight must be read before the
    layer's first CPU forward, which may repack it in place (`four_bit_output_weights`)."""
    if type(projection).__name__ == "Linear4bit":
        import bitsandbytes as bnb

        assert not getattr(projection.weight.quant_state, "packing_format_for_cpu", False), "read after a repack"
        return bnb.functional.dequantize_4bit(projection.weight.data, projection.weight.quant_state).float().T
    return projection.weight.T if isinstance(projection, torch.nn.Linear) else projection.weight


def direct_norms(model, spec, ids, weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(value norms `"l h k"`, output norms `"l h q"`) computed from hooked module inputs and outputs;
    with `weights` ({layer: output projection weight read before the forward}), those layers only, in that order."""
    values, inputs, hooks = {}, {}, []
    for layer, path in enumerate(spec.attention_modules):
        module, to_values = value_projection(model, path, spec)
        hooks.append(module.register_forward_hook(
            lambda m, a, out, layer=layer, to_values=to_values: values.__setitem__(layer, to_values(out)[0])))
        projection = model.get_submodule(spec.output_projections[layer])
        hooks.append(projection.register_forward_hook(lambda m, a, out, layer=layer: inputs.__setitem__(layer, a[0][0])))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    d, group = spec.head_dim, spec.group_size
    value_norms, output_norms = [], []
    for layer in weights or range(spec.num_layers):
        weight = (weights[layer] if weights else output_weight(model.get_submodule(spec.output_projections[layer])))
        weight = weight.double()
        per_head = weight.unflatten(0, (spec.num_heads, d))  # "h d m"
        v = values[layer].double()  # "k g d"
        value_norms.append(torch.stack([(v[:, h // group] @ per_head[h]).norm(dim=-1) for h in range(spec.num_heads)]))
        o = inputs[layer].double().unflatten(-1, (spec.num_heads, d))  # "q h d"
        output_norms.append(torch.stack([(o[:, h] @ per_head[h]).norm(dim=-1) for h in range(spec.num_heads)]))
    return torch.stack(value_norms), torch.stack(output_norms)


@pytest.mark.parametrize("family", [*FAMILIES, *EXTRA_FAMILIES])
def test_tiny_family_value_and_output_norms_equal_the_direct_computation(family):
    model = tiny_model(family, "eager")
    spec = spec_from_model(model)
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), capture(model, value_norms=True) as probe:
        model(input_ids=ids)
    cube = probe.cube(ids)
    value_norms, output_norms = direct_norms(model, spec, ids)
    torch.testing.assert_close(cube.value_norms.double(), value_norms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cube.output_norms.double(), output_norms, atol=1e-5, rtol=1e-5)
    weighted = cube.norm_weighted()
    assert weighted.weighting == "norms"
    torch.testing.assert_close(weighted.pattern.double(), cube.pattern.double() * value_norms[:, :, None, :],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(3, 0), (1,), (0, 1, 2, 3)], ids=["two-groups-reordered", "one", "every"])
def test_a_head_subset_gets_the_norms_of_its_heads(heads):
    """A GQA model (4 heads on 2 KV heads) captured for some heads: each head's norms are its own, in the order
    asked for (the every-head path meets each KV head's values without repeating them; a subset indexes them)."""
    model = tiny_model("llama", "eager")
    spec = spec_from_model(model)
    assert spec.num_heads == 4 and spec.num_kv_heads == 2
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), capture(model, heads=heads, value_norms=True) as probe:
        model(input_ids=ids)
    cube = probe.cube(ids)
    value_norms, output_norms = direct_norms(model, spec, ids)
    chosen = torch.tensor(heads)
    torch.testing.assert_close(cube.value_norms.double(), value_norms[:, chosen], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cube.output_norms.double(), output_norms[:, chosen], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2_eager", "minilm_eager"])
def test_real_models_value_and_output_norms_equal_the_direct_computation(fixture, request):
    model, tokenizer, spec = request.getfixturevalue(fixture)
    prompt = "The cat sat on the mat because it was warm."
    cube = capture_prompt(model, tokenizer, prompt, value_norms=True)
    value_norms, output_norms = direct_norms(model, spec, tokenizer(prompt, return_tensors="pt")["input_ids"])
    torch.testing.assert_close(cube.value_norms.double(), value_norms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cube.output_norms.double(), output_norms, atol=1e-5, rtol=1e-5)


def has_avx512_bf16() -> bool:
    import bitsandbytes as bnb

    return bool(bnb.functional.has_avx512bf16())


@pytest.mark.slow
@pytest.mark.parametrize("repack", [False, True], ids=["plain-4bit-kernel", "avx512bf16-repack"])
def test_a_4bit_model_writes_through_its_dequantized_projection(repack):
    """bitsandbytes repacks a 4-bit weight in place on the layer's first CPU forward when the CPU has
    AVX512-BF16 (the layer's `support_avx512bf16_for_cpu`), and then multiplies with another kernel. Both
    paths are forced here through that flag, whatever this CPU has; the reference weights are dequantized
    before any forward, so a repack cannot change them under the test. The packed kernel exists only as
    AVX512-BF16 code: without the feature, that case has nothing that could run it."""
    from llm_heatmap.models import load_model

    if repack and not has_avx512_bf16():
        pytest.skip("this CPU has no AVX512-BF16, the only code bitsandbytes has for its repacked 4-bit layout")
    model, tokenizer, spec = load_model("smollm2-135m", quantize="4bit")
    four_bit = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert type(model.get_submodule(spec.output_projections[0])).__name__ == "Linear4bit"
    for module in four_bit:
        module.support_avx512bf16_for_cpu = repack
    weights = {layer: output_weight(model.get_submodule(spec.output_projections[layer])) for layer in (0, 29)}
    prompt = "The capital of France is Paris."
    cube = capture_prompt(model, tokenizer, prompt, value_norms=True, layers=[0, 29])
    assert {getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit} == {repack}
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    value_norms, output_norms = direct_norms(model, spec, ids, weights)
    rtol = 4e-3 if repack else 1e-4  # the repacked layout's kernel multiplies in bfloat16 (8 bits of mantissa)
    torch.testing.assert_close(cube.value_norms.double(), value_norms, atol=1e-4, rtol=rtol)
    torch.testing.assert_close(cube.output_norms.double(), output_norms, atol=1e-4, rtol=rtol)


def test_streamed_parts_carry_the_norms_of_their_layer_and_rows():
    model = tiny_model("gemma3", "sdpa")
    ids = torch.randint(1, VOCAB, (1, 11), generator=torch.Generator().manual_seed(5))
    parts = []

    class Keep:
        def consume(self, part):
            parts.append(part)

    with torch.no_grad(), capture(model, consumers=[Keep()], chunk_rows=4, queries_and_keys=True) as probe:
        model(input_ids=ids)
    cube = probe.cube(ids)
    for part in parts:
        slot, rows = cube.layers.index(part.layers[0]), slice(part.stream.row_start, part.stream.row_stop)
        torch.testing.assert_close(part.value_norms[0].cpu(), cube.value_norms[slot])
        torch.testing.assert_close(part.output_norms[0].cpu(), cube.output_norms[slot, :, rows])
        torch.testing.assert_close(part.queries[0].cpu(), cube.queries[slot, :, rows])
        torch.testing.assert_close(part.keys[0].cpu(), cube.keys[slot])


@pytest.mark.parametrize("compute_output", [False, True])
def test_a_stream_that_no_consumer_reads_norms_from_computes_none(compute_output):
    """Norms are computed for a kept cube or a consumer that may read them (no `takes_value_norms = False`),
    and for value_norms=True; a stream only to consumers that never read them leaves them out."""
    from llm_heatmap.probes import Downsampler

    model = tiny_model("llama", "sdpa")
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(7))

    class Parts:
        def __init__(self, reads_norms: bool):
            self.takes_value_norms, self.norms = reads_norms, []

        def consume(self, part):
            self.norms.append((part.value_norms, part.output_norms))

    def streamed(*consumers, **options):
        with torch.no_grad(), capture(model, consumers=list(consumers), keep=False, compute_output=compute_output,
                                      **options):
            model(input_ids=ids)

    blind, reader = Parts(False), Parts(True)
    streamed(blind, Downsampler(4))
    assert blind.norms and all(v is None and o is None for v, o in blind.norms)
    blind, required = Parts(False), Parts(False)
    streamed(blind, reader)
    streamed(required, value_norms=True)
    for parts in (blind, reader, required):
        assert parts.norms and all(v is not None and o is not None for v, o in parts.norms)
    weighted = Downsampler(4, weighting="norms")
    streamed(Parts(False), weighted)
    assert weighted.cube().weighting == "norms"


def test_norms_travel_through_select_item_and_files(tmp_path):
    from llm_heatmap.probes import AttentionCube

    model = tiny_model("llama", "sdpa")
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad(), capture(model, queries_and_keys=True) as probe:
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    batch = probe.cube(ids, mask)
    second = batch.item(1)
    assert second.value_norms.shape == (2, 4, 5) and second.queries.shape == (2, 4, 5, 8) and second.keys.shape == (2, 2, 5, 8)
    torch.testing.assert_close(second.value_norms, batch.value_norms[1][..., 3:])
    picked = second.select(layers=[1], heads=[3, 0])
    torch.testing.assert_close(picked.output_norms, second.output_norms[1:2][:, [3, 0]])
    assert picked.keys.shape == (1, 2, 5, 8), "KV heads stay whole when query heads are picked"
    loaded = AttentionCube.load(picked.save(tmp_path / "cube.safetensors"))
    for name, tensor in picked.side_tensors().items():
        torch.testing.assert_close(getattr(loaded, name), tensor)


def test_a_model_without_a_known_output_projection():
    model = tiny_model("llama", "sdpa")
    spec = spec_from_model(model)
    from dataclasses import replace

    unknown = replace(spec, output_projections=("",) * spec.num_layers)
    ids = torch.randint(1, VOCAB, (1, 5))
    with torch.no_grad(), capture(model, spec=unknown) as probe:  # default: norms where they can be had
        model(input_ids=ids)
    assert probe.cube(ids).value_norms is None
    with pytest.raises(InputError, match="no output projection .* value_norms=False"):
        capture(model, spec=unknown, value_norms=True)
    with pytest.raises(InputError, match="value_norms=True"):
        probe.cube(ids).norm_weighted()


def norm_metrics_by_hand(cube) -> dict[str, torch.Tensor]:
    """The norm-weighted columns from their definitions (analyses/metrics.py), float64, `"l h"` each."""
    mask = cube.attendable()  # l q k
    spread = (mask.sum(-1) >= 2).double()  # l q
    weighted = cube.pattern.double() * cube.value_norms.double()[:, :, None, :]
    share = weighted / weighted.sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -(share * share.clamp_min(1e-300).log()).sum(-1)
    first = cube.first_key
    sees = mask[:, :, first].double()  # l q
    no_q0 = sees * (cube.query_positions != first).double()[None]
    mean = lambda values, rows: (values * rows[:, None]).sum(-1) / rows.sum(-1)[:, None]  # noqa: E731
    sink_by_weight = mean(cube.pattern.double()[..., first], no_q0)
    return {"norm_sink_score": mean(share[..., first], sees), "norm_sink_score_no_q0": mean(share[..., first], no_q0),
            "norm_weighted_entropy": mean(entropy, spread), "output_norm": mean(cube.output_norms.double(), spread),
            "noop_sink": (sink_by_weight >= 0.3) & (mean(share[..., first], no_q0) < 0.3)}


def assert_norm_columns(table, cube):
    expected = norm_metrics_by_hand(cube)
    for column, values in expected.items():
        got = torch.tensor(table[column].to_numpy().astype(float)).reshape(values.shape)
        torch.testing.assert_close(got, values.double(), atol=1e-5, rtol=1e-5, msg=column)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "gemma2", "gemma3", "mistral"])
def test_norm_weighted_metrics_kept_and_streamed(family):
    from llm_heatmap.analyses import HeadMetricsReducer, head_metrics

    model = tiny_model(family, "eager" if family == "gemma2" else "sdpa")
    ids = torch.randint(1, VOCAB, (1, 13), generator=torch.Generator().manual_seed(8))
    reducer = HeadMetricsReducer()
    with torch.no_grad(), capture(model, consumers=[reducer], chunk_rows=5) as probe:
        model(input_ids=ids)
    cube = probe.cube(ids)
    assert_norm_columns(head_metrics(cube), cube)
    assert_norm_columns(reducer.table(), cube)


@pytest.mark.slow
def test_norm_weighted_metrics_on_smollm2(smollm2):
    from llm_heatmap.analyses import head_metrics

    model, tokenizer, _ = smollm2
    cube = capture_prompt(model, tokenizer, "The quick brown fox jumps over the lazy dog, and the dog sleeps on.")
    table = head_metrics(cube)
    assert_norm_columns(table, cube)
    sinks = table[table.sink_head]
    assert len(sinks) > 0 and sinks.noop_sink.sum() > 0, "SmolLM2 has no-op sinks: weight on <s>, little written from it"


def test_noop_sink_by_hand():
    """Two heads put 0.9 of every row on the first token; only the one whose first value writes almost
    nothing is a no-op sink."""
    from llm_heatmap.analyses import head_metrics
    from llm_heatmap.models import ModelSpec
    from llm_heatmap.probes import AttentionCube

    spec = ModelSpec(model_type="toy", architecture="Toy", num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4,
                     causal=False, layer_types=("full_attention",))
    pattern = torch.full((1, 2, 4, 4), 0.1 / 3)
    pattern[..., 0] = 0.9
    value_norms = torch.tensor([[[0.01, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]])
    cube = AttentionCube.from_pattern(pattern, spec, torch.arange(4), ["<s>", "a", "b", "c"],
                                      value_norms=value_norms, output_norms=torch.ones(1, 2, 4))
    table = head_metrics(cube)
    # head 0: the first token's share of what is written is 0.9 * 0.01 / (0.9 * 0.01 + 0.1) = 0.0826
    assert table.norm_sink_score_no_q0.tolist() == pytest.approx([0.009 / 0.109, 0.9])
    assert table.sink_head.tolist() == [True, True] and table.noop_sink.tolist() == [True, False]
    assert table.output_norm.tolist() == pytest.approx([1.0, 1.0])
