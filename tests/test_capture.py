"""Capture from the attention kernel: exact against eager `output_attentions`, nothing left attached."""

from __future__ import annotations


import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from llm_heatmap.errors import InputError
from llm_heatmap.probes import capture, capture_generate, capture_prompt, estimate_cube_bytes
from llm_heatmap.probes.tap import KernelCall, _named_arguments
from tiny_models import FAMILIES, SDPA_UNSUPPORTED, VOCAB, tiny_model

CASES = [(f, k) for f in FAMILIES for k in ("eager", "sdpa") if not (k == "sdpa" and f in SDPA_UNSUPPORTED)]


def model_of(family: str, kernel: str, dtype=torch.float32):
    return tiny_model(family, kernel, dtype=dtype)


def default_kernel(family: str) -> str:
    return "eager" if family in SDPA_UNSUPPORTED else "sdpa"


def eager_reference(family, ids, dtype=torch.float32, **kwargs) -> torch.Tensor:
    """Eager `output_attentions` as `"b l h q k"`."""
    with torch.no_grad():
        out = model_of(family, "eager", dtype)(input_ids=ids, output_attentions=True, **kwargs)
    return torch.stack(out.attentions, 1)


def first_output(out):
    return out[0] if isinstance(out, tuple) else (out.logits if hasattr(out, "logits") else out.last_hidden_state)


def run_captured(model, ids, **options):
    with torch.no_grad(), capture(model, **options) as probe:
        out = first_output(model(input_ids=ids))
    return probe.cube(ids), out


def registry_state():
    """(class-wide entries, as a fresh registry sees them; entries of the shared instance)."""
    return dict(AttentionInterface().items()), dict(ALL_ATTENTION_FUNCTIONS.items())


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family,kernel", CASES)
def test_cube_equals_eager_output_attentions(family, kernel):
    model = model_of(family, kernel)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = first_output(model(input_ids=ids))
    cube, out = run_captured(model, ids)
    reference = eager_reference(family, ids)[0]
    assert cube.pattern.shape == reference.shape
    torch.testing.assert_close(cube.pattern, reference, atol=1e-5, rtol=0)
    assert torch.equal(out, plain), "capturing changed the model's output"
    # independent of eager: rows sum to 1 and nothing lands outside causal mask / sliding window
    torch.testing.assert_close(cube.pattern.sum(-1), torch.ones(cube.pattern.shape[:-1]), atol=1e-5, rtol=0)
    assert float(cube.pattern.masked_fill(cube.attendable()[:, None], 0).abs().max()) == 0
    assert cube.metadata["kernel"] == kernel


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_batch_matches_single_sequences(family, side):
    model = model_of(family, default_kernel(family))
    lengths = (10, 6)
    ids = torch.randint(1, VOCAB, (2, max(lengths)), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, -n:] = 1
        else:
            mask[row, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), capture(model) as probe:
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
    cube = probe.cube(ids, mask)
    assert cube.batched and cube.pattern.shape[0] == 2
    batched_reference = eager_reference(family, ids, attention_mask=mask, position_ids=positions)
    real_rows = cube.query_mask[:, None, None, :, None].expand_as(cube.pattern)
    torch.testing.assert_close(cube.pattern[real_rows], batched_reference[real_rows], atol=1e-5, rtol=0)
    for row, n in enumerate(lengths):
        single = ids[row][mask[row].bool()][None]
        item = cube.item(row)
        assert item.pattern.shape[-2:] == (n, n)
        assert item.query_positions.tolist() == list(range(n))
        assert item.token_ids.tolist() == single[0].tolist()
        torch.testing.assert_close(item.pattern, eager_reference(family, single)[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,kernel", [("llama", "sdpa"), ("llama", "eager"), ("gemma2", "eager"), ("gemma3", "sdpa")])
def test_bf16_model(family, kernel):
    model = model_of(family, kernel, torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    cube, _ = run_captured(model, ids, dtype=torch.bfloat16)
    assert cube.pattern.dtype == torch.bfloat16
    reference = eager_reference(family, ids, dtype=torch.bfloat16)[0].float()
    torch.testing.assert_close(cube.pattern.float(), reference, atol=2e-2, rtol=0)


def test_cube_dtype_is_selectable():
    model = model_of("qwen2", "sdpa")
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(211))
    full, _ = run_captured(model, ids)
    for dtype in (torch.float16, torch.bfloat16):
        cube, _ = run_captured(model, ids, dtype=dtype)
        assert cube.pattern.dtype == dtype
        assert torch.equal(cube.pattern, full.pattern.to(dtype))


def test_selective_capture_is_a_slice_of_the_full_cube():
    model = model_of("gemma3", "sdpa")
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(221))
    full, _ = run_captured(model, ids)
    part, _ = run_captured(model, ids, layers=[2, 0], heads=[3, 1], last_queries=4)
    assert part.layers == (2, 0) and part.heads == (3, 1)
    assert part.pattern.shape == (2, 2, 4, 11)
    assert part.query_positions.tolist() == [7, 8, 9, 10]
    expected = full.pattern[[2, 0]][:, [3, 1]][:, :, -4:]
    torch.testing.assert_close(part.pattern, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(part.attendable(), full.attendable()[[2, 0]][:, -4:])
    with pytest.raises(InputError):
        capture(model, layers=[3])
    with pytest.raises(InputError):
        capture(model, heads=[0, 0])


def test_kernel_call_by_hand():
    """Hand-written formula: softcap, float mask, flash's bottom-right causal rule and sliding window."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(139)
    q, k = torch.randn(1, 2, 2, 4, generator=generator), torch.randn(1, 1, 5, 4, generator=generator)  # 2 query heads share 1 KV head
    scores = (q @ k.transpose(-1, -2)) * 0.5
    capped = torch.tanh(scores / 3.0) * 3.0
    bias = torch.zeros(1, 1, 2, 5)
    bias[..., 0] = -1.0
    got = KernelCall(query=q, key=k, mask=bias, scaling=0.5, softcap=3.0).pattern(torch.tensor([0, 1]), 0, 2)
    torch.testing.assert_close(got, torch.softmax(capped + bias, -1))
    # flash, no mask: rows are the last 2 of 5 positions (3, 4); window 2 keeps keys p-1..p
    flash = KernelCall(query=q, key=k, mask=None, scaling=0.5, causal="bottom_right", window=2)
    got = flash.pattern(torch.tensor([1]), 0, 2)
    allowed = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    expected = torch.softmax(scores[:, 1:].masked_fill(~allowed, float("-inf")), -1)
    torch.testing.assert_close(got, expected)


def test_positional_kernel_arguments_are_named_by_the_kernel_signature():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    named = _named_arguments(sdpa_attention_forward, (0.0, 0.125), {"softcap": None})
    assert named == {"dropout": 0.0, "scaling": 0.125, "softcap": None}


def test_nothing_stays_attached_and_registry_is_restored():
    model = model_of("gpt2", "eager")
    registry, hooks = registry_state(), hook_count(model)
    assert "eager" not in registry[0]
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(265))
    with torch.no_grad(), capture(model):
        assert hook_count(model) > hooks and "eager" in ALL_ATTENTION_FUNCTIONS
        assert "eager" not in AttentionInterface(), "a key no map held is set on the shared instance only"
        model(input_ids=ids)
    assert registry_state() == registry and hook_count(model) == hooks

    class Boom:
        finished = False

        def consume(self, part):
            if part.layers == (1,):
                raise RuntimeError("boom")

        def finish(self):
            self.finished = True

    boom = Boom()
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), capture(model, consumers=[boom]):
        model(input_ids=ids)
    assert registry_state() == registry and hook_count(model) == hooks
    assert not boom.finished
    with torch.no_grad():  # a plain forward after the failure still works
        model(input_ids=ids)


def test_an_override_of_the_shared_registry_is_wrapped_and_put_back():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def custom_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    model = model_of("llama", "sdpa")
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(301))
    ALL_ATTENTION_FUNCTIONS["sdpa"] = custom_sdpa
    try:
        registry = registry_state()
        with torch.no_grad(), capture(model) as probe:
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not custom_sdpa
            model(input_ids=ids)
        assert len(calls) == 2, "the wrapper calls the override the model would have run, once per layer"
        assert registry_state() == registry and ALL_ATTENTION_FUNCTIONS["sdpa"] is custom_sdpa
        torch.testing.assert_close(probe.cube(ids).pattern, eager_reference("llama", ids)[0])
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward


def test_two_probes_on_two_models_at_once():
    gpt2, llama = model_of("gpt2", "eager"), model_of("llama", "eager")  # both tap "eager", with different functions
    bert = model_of("bert", "sdpa")
    registry = registry_state()
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(320))
    with torch.no_grad(), capture(gpt2) as outer:
        with capture(llama) as inner, capture(bert) as third:
            llama_out = llama(input_ids=ids, output_attentions=True)
            bert(input_ids=ids)
            gpt2(input_ids=ids)
        gpt2_out = gpt2(input_ids=ids, output_attentions=True)  # the outer probe still works after the inner left
    assert registry_state() == registry
    torch.testing.assert_close(inner.cube(ids).pattern, torch.stack(llama_out.attentions, 1)[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(outer.cube(ids).pattern, torch.stack(gpt2_out.attentions, 1)[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(third.cube(ids).pattern, eager_reference("bert", ids)[0], atol=1e-5, rtol=0)


def test_two_probes_on_one_model():
    model = model_of("qwen3", "sdpa")
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(335))
    with torch.no_grad(), capture(model) as a, capture(model, heads=[2]) as b:
        model(input_ids=ids)
    # a head subset is computed by other matmul shapes than all heads at once: equal within fp32 rounding
    torch.testing.assert_close(a.cube(ids).pattern[:, [2]], b.cube(ids).pattern, atol=1e-6, rtol=0)


def test_kernel_bypass_is_reported():
    model = tiny_model("gpt2", "eager")
    model.config.reorder_and_upcast_attn = True
    for block in model.transformer.h:
        block.attn.reorder_and_upcast_attn = True
    with pytest.raises(InputError, match="without calling the attention kernel"), torch.no_grad(), capture(model):
        model(input_ids=torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(347)))


def test_memory_guard_refuses_before_the_forward():
    model = model_of("llama", "sdpa")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(352))
    spec = capture(model).spec
    size = estimate_cube_bytes(spec, 16, batch_size=2)
    assert size == 2 * spec.num_layers * spec.num_heads * 16 * 16 * 4
    assert estimate_cube_bytes(spec, 16, num_layers=1, num_queries=4, dtype=torch.float16) == spec.num_heads * 4 * 16 * 2
    calls = []
    handle = model.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError, match="stream.*fp16"), torch.no_grad(), capture(model, max_bytes=size - 1):
            model(input_ids=ids)
    finally:
        handle.remove()
    assert not calls, "the guard must refuse before any layer runs"
    with torch.no_grad(), capture(model, max_bytes=size) as probe:
        model(input_ids=ids)
    assert probe.cube(ids).pattern.nbytes == size


def test_cube_needs_a_forward_pass():
    model = model_of("llama", "sdpa")
    with capture(model) as probe:
        pass
    with pytest.raises(InputError):
        probe.cube(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(InputError):
        capture(model, keep=False)


# ---- real offline models -------------------------------------------------------------------

PROMPT = "The quick brown fox jumps over the lazy dog because it wants to see what lies beyond the hill."


def _real_check(loaded, eager, prompt=PROMPT):
    model, tokenizer, spec = loaded
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = first_output(model(input_ids=ids))
        ref_out = eager[0](input_ids=ids, output_attentions=True)
        reference = torch.stack(ref_out.attentions, 1)[0]
        with capture(model) as probe:
            out = first_output(model(input_ids=ids))
        with capture(eager[0]) as eager_probe:
            eager[0](input_ids=ids)
    assert torch.equal(out, plain)
    cube = probe.cube(ids, tokenizer=tokenizer)
    assert cube.pattern.shape == (spec.num_layers, spec.num_heads, ids.shape[1], ids.shape[1])
    assert cube.tokens == tokenizer.convert_ids_to_tokens(ids[0].tolist())
    torch.testing.assert_close(eager_probe.cube(ids).pattern, reference, atol=1e-5, rtol=0)
    # sdpa's q and k carry the rounding of the sdpa layers below: tolerance grows with length
    torch.testing.assert_close(cube.pattern, reference, atol=1e-5 * max(1, ids.shape[1] / 10), rtol=0)
    return cube


@pytest.mark.slow
def test_smollm2_exact(smollm2, smollm2_eager):
    cube = _real_check(smollm2, smollm2_eager)
    assert cube.spec.num_kv_heads == 3 and cube.metadata["kernel"] == "sdpa"
    assert set(cube.metadata["versions"]) == {"torch", "transformers", "llm-heatmap"}


@pytest.mark.slow
def test_minilm_exact_and_padded(minilm, minilm_eager):
    _real_check(minilm, minilm_eager)
    model, tokenizer, _ = minilm
    prompts = ["a short one", "a much longer sentence about attention heads in transformers"]
    cube = capture_prompt(model, tokenizer, prompts, source="minilm-l6")
    assert cube.batched and cube.source == "minilm-l6"
    for i, prompt in enumerate(prompts):
        single = capture_prompt(minilm_eager[0], tokenizer, prompt)
        torch.testing.assert_close(cube.item(i).pattern, single.pattern, atol=5e-5, rtol=0)
        assert cube.item(i).tokens == single.tokens


@pytest.mark.slow
def test_capture_prompt_chat(smollm2):
    model, tokenizer, _ = smollm2
    cube = capture_prompt(model, tokenizer, "Hi there", chat=True, layers=[0, 29], dtype=torch.float16)
    assert "<|im_start|>" in cube.tokens and cube.prompt == "Hi there"
    assert cube.layers == (0, 29) and cube.pattern.dtype == torch.float16
    assert cube.pattern.shape[-1] == len(cube.tokens)


@pytest.mark.slow
def test_capture_generate_marks_generated_tokens(smollm2, smollm2_eager):
    model, tokenizer, _ = smollm2
    prompt_ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    cube = capture_generate(model, tokenizer, "The capital of France is", max_new_tokens=4)
    n = prompt_ids.shape[1]
    assert cube.token_ids[:n].tolist() == prompt_ids[0].tolist()
    assert cube.generated.tolist() == [False] * n + [True] * (cube.num_keys - n)
    assert cube.num_keys == n + 4
    with torch.no_grad():
        greedy = model.generate(prompt_ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        reference = torch.stack(smollm2_eager[0](input_ids=greedy, output_attentions=True).attentions, 1)[0]
    assert cube.token_ids.tolist() == greedy[0].tolist()
    torch.testing.assert_close(cube.pattern, reference, atol=5e-5, rtol=0)
