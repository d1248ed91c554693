"""capture_lens: TransformerLens models into the same AttentionCube as the transformers capture.

References: the model's own `run_with_cache`, a pattern computed by hand from the weights, and
eager `output_attentions` of a transformers twin with the same weights.
"""

from __future__ import annotations

import copy
import math
import tempfile
from importlib.metadata import version

import pytest
import torch

tl = pytest.importorskip("transformer_lens")
import transformer_lens.model_bridge.sources.native as native  # noqa: E402  (attaches boot_native)
from transformer_lens import TransformerBridge  # noqa: E402
from transformer_lens.config import TransformerBridgeConfig  # noqa: E402
from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module  # noqa: E402
from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config  # noqa: E402

from llm_heatmap.errors import InputError
from llm_heatmap.models import spec_from_model  # noqa: E402
from llm_heatmap.probes import capture, capture_prompt  # noqa: E402
from llm_heatmap.probes.lens import capture_lens  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

IDS = torch.tensor([3, 5, 7, 9, 11, 13, 2, 4, 6, 8, 10, 12])
PROMPT = "The cat sat on the mat because it was warm."


def native_config(**overrides) -> TransformerBridgeConfig:
    """A 2-layer TransformerLens-native model: GQA 4q:2kv, attention softcap, no norms (hand-computable)."""
    options = dict(d_model=32, d_head=8, n_layers=2, n_ctx=16, n_heads=4, n_key_value_heads=2, d_vocab=50,
                   act_fn="gelu", seed=0, attn_scores_soft_cap=3.0, normalization_type=None)
    options.update(overrides)
    return TransformerBridgeConfig(**options)


def cached_patterns(model, ids: torch.Tensor) -> torch.Tensor:
    """`"l h q k"` from the model's own run_with_cache."""
    with torch.no_grad():
        _, cache = model.run_with_cache(ids[None])
    return torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0] for layer in range(model.cfg.n_layers)])


def eager_patterns(hf_model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack(hf_model(ids[None], output_attentions=True).attentions, 1)[0]


def check_rows(cube) -> None:
    """Rows sum to 1 over attendable keys and are exactly 0 elsewhere."""
    allowed = cube.attendable()[:, None]
    assert torch.allclose(cube.pattern.sum(-1), torch.ones(()), atol=1e-5)
    assert (cube.pattern.masked_select(~allowed) == 0).all()


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test: building a bridge must not reach for the hub."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def hooks_attached(model) -> int:
    return sum(len(point.fwd_hooks) + len(point._forward_hooks) for point in model.hook_dict.values())


# ---- TransformerLens 3.x HookedTransformer ------------------------------------------------


def test_hooked_transformer_matches_run_with_cache():
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as error:
        pytest.skip(f"HookedTransformer is absent in transformer-lens {version('transformer-lens')} "
                    f"(removed in 4.0): {error}")
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=50,
                                  act_fn="gelu", seed=0)
    model = HookedTransformer(cfg).eval()
    cube = capture_lens(model, IDS)
    torch.testing.assert_close(cube.pattern, cached_patterns(model, IDS), rtol=0, atol=1e-6)
    assert cube.spec.causal and cube.spec.num_heads == 4
    check_rows(cube)
    assert hooks_attached(model) == 0


# ---- TransformerLens 4.x native model (the HookedTransformer(cfg) replacement) -------------


def test_native_bridge_matches_run_with_cache_and_hand_computed_pattern():
    model = TransformerBridge.boot_native(native_config())
    cube = capture_lens(model, IDS)
    assert cube.pattern.shape == (2, 4, len(IDS), len(IDS)) and cube.pattern.dtype == torch.float32
    torch.testing.assert_close(cube.pattern, cached_patterns(model, IDS), rtol=0, atol=0)

    # layer 0 by hand from an unwrapped twin: (tok_embed + pos) -> q, k -> GQA expand -> softcap -> causal softmax
    twin = native.NativeModel(native_config())
    native.initialize_native_model(twin, native_config())
    wrapped = {k.replace("._original_component", ""): v for k, v in model.original_model.state_dict().items()}
    assert all(torch.equal(wrapped[k], v) for k, v in twin.state_dict().items() if k in wrapped)
    n = len(IDS)
    with torch.no_grad():
        x = twin.tok_embed(IDS) + twin.pos(torch.arange(n))
        attn = twin.layers[0].attn
        q = attn.q(x).view(n, 4, 8).transpose(0, 1)
        k = attn.k(x).view(n, 2, 8).transpose(0, 1).repeat_interleave(2, 0)
        scores = 3.0 * torch.tanh(q @ k.transpose(-1, -2) / math.sqrt(8) / 3.0)
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(cube.pattern[0], scores.softmax(-1), rtol=0, atol=1e-6)

    check_rows(cube)
    spec = cube.spec
    assert (spec.model_type, spec.architecture) == ("transformer_lens", "TransformerLensNative")
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (2, 4, 2, 8)
    assert spec.causal and spec.attn_softcap == 3.0 and spec.sliding_window is None and spec.max_positions == 16
    assert cube.tokens == [str(i) for i in IDS.tolist()] and torch.equal(cube.token_ids, IDS)
    assert cube.metadata["capture"] == "transformer_lens"
    assert cube.metadata["versions"]["transformer-lens"] == version("transformer-lens")
    assert hooks_attached(model) == 0


def test_lens_cube_saves_and_loads(tmp_path):
    cube = capture_lens(TransformerBridge.boot_native(native_config()), IDS, layers=[1], heads=[0, 2])
    loaded = type(cube).load(cube.save(tmp_path / "lens.safetensors"))
    assert torch.equal(loaded.pattern, cube.pattern) and loaded.spec == cube.spec
    assert (loaded.layers, loaded.heads, loaded.tokens) == (cube.layers, cube.heads, cube.tokens)
    assert loaded.metadata == cube.metadata


def test_native_bridge_bidirectional():
    model = TransformerBridge.boot_native(native_config(attention_dir="bidirectional", attn_scores_soft_cap=-1.0))
    cube = capture_lens(model, IDS)
    torch.testing.assert_close(cube.pattern, cached_patterns(model, IDS), rtol=0, atol=0)
    assert not cube.spec.causal and cube.spec.attn_softcap is None
    assert cube.pattern[..., 0, 1:].sum() > 0  # the first row sees later keys
    check_rows(cube)


def test_layer_and_head_subsets_batches_and_dtype():
    model = TransformerBridge.boot_native(native_config())
    full = capture_lens(model, IDS)
    part = capture_lens(model, IDS, layers=[0], heads=[3, 1])  # stops the forward after block 0
    assert part.layers == (0,) and part.heads == (3, 1)
    torch.testing.assert_close(part.pattern, full.select(layers=[0], heads=[3, 1]).pattern, rtol=0, atol=0)
    assert part.kv_groups.tolist() == [1, 0]

    batch = torch.stack([IDS, IDS.flip(0)])
    cube = capture_lens(model, batch, dtype=torch.float16)
    assert cube.batched and cube.pattern.dtype == torch.float16
    assert cube.pattern.shape == (2, 2, 4, len(IDS), len(IDS))
    single = capture_lens(model, IDS.flip(0))
    torch.testing.assert_close(cube.item(1).pattern.float(), single.pattern, rtol=0, atol=1e-3)
    assert cube.key_mask.shape == (2, len(IDS)) and cube.key_mask.all()


def test_bad_input_raises_input_error():
    model = TransformerBridge.boot_native(native_config())
    with pytest.raises(InputError, match="layer 5 does not exist"):
        capture_lens(model, IDS, layers=[5])
    with pytest.raises(InputError, match="head -1 does not exist"):
        capture_lens(model, IDS, heads=[-1])
    with pytest.raises(InputError, match="no tokenizer"):
        capture_lens(model, PROMPT)
    with pytest.raises(InputError, match="integer token ids"):
        capture_lens(model, IDS.float())
    with pytest.raises(InputError, match="TransformerLens model"):
        capture_lens(tiny_model("llama"), IDS)
    assert hooks_attached(model) == 0


def test_nothing_attached_after_an_error_inside_the_forward():
    model = TransformerBridge.boot_native(native_config())
    baseline = capture_lens(model, IDS)
    seen = []

    def explode(module, args, output):
        seen.append(hooks_attached(model))  # our layer hooks are in place mid-forward
        raise RuntimeError("boom")

    handle = model.blocks[1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture_lens(model, IDS)
    finally:
        handle.remove()
    assert seen and seen[0] >= 2
    assert hooks_attached(model) == 0
    torch.testing.assert_close(capture_lens(model, IDS).pattern, baseline.pattern, rtol=0, atol=0)


# ---- TransformerBridge over transformers models -------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_bridge_over_tiny_hf_model_matches_eager(family):
    """GQA (llama), every layer sliding (mistral, window 5), softcap + alternating windows (gemma2)."""
    reference = tiny_model(family, "eager")
    wrapped = tiny_model(family, "eager" if family == "gemma2" else "sdpa")
    bridge = build_bridge_from_module(wrapped, determine_architecture_from_hf_config(wrapped.config),
                                      hf_config=wrapped.config)
    cube = capture_lens(bridge, IDS)
    torch.testing.assert_close(cube.pattern, eager_patterns(reference, IDS), rtol=0, atol=1e-4)
    with torch.no_grad(), capture(reference) as probe:
        reference(IDS[None])
    torch.testing.assert_close(cube.pattern, probe.cube(IDS[None]).pattern, rtol=0, atol=1e-4)
    check_rows(cube)
    spec, expected = cube.spec, spec_from_model(reference)
    for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "causal", "layer_types",
                 "sliding_window", "attn_softcap", "max_positions"):
        assert getattr(spec, name) == getattr(expected, name), name
    assert spec.architecture == expected.architecture
    assert hooks_attached(bridge) == 0


@pytest.mark.slow
def test_bridge_booted_from_a_local_folder(smollm2, no_network):
    """`boot_transformers(dir, tokenizer=...)`: config and weights from disk, no hub."""
    _, tokenizer, _ = smollm2
    reference = tiny_model("llama", "eager")
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(folder, tokenizer=copy.deepcopy(tokenizer), device="cpu")
    cube = capture_lens(bridge, IDS)
    torch.testing.assert_close(cube.pattern, eager_patterns(reference, IDS), rtol=0, atol=1e-4)
    assert cube.tokens == tokenizer.convert_ids_to_tokens(IDS.tolist())


@pytest.mark.slow
def test_bridge_over_smollm2_matches_eager_and_hf_capture(smollm2, no_network):
    model, tokenizer, hf_spec = smollm2
    own = copy.deepcopy(model)  # the bridge rewires the model it wraps; the session fixture stays untouched
    own.set_attn_implementation("eager")
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"][0]
    reference = eager_patterns(own, ids)
    bridge = TransformerBridge.boot_transformers("smollm2-135m", hf_model=own, tokenizer=copy.deepcopy(tokenizer),
                                                 device="cpu")

    cube = capture_lens(bridge, PROMPT, tokenizer=tokenizer)
    assert torch.equal(cube.token_ids, ids) and cube.prompt == PROMPT
    torch.testing.assert_close(cube.pattern, reference, rtol=0, atol=1e-4)
    check_rows(cube)
    assert (cube.spec.num_layers, cube.spec.num_heads, cube.spec.num_kv_heads) == (30, 9, 3)
    assert cube.spec.group_size == hf_spec.group_size and cube.spec.quantization == hf_spec.quantization
    assert cube.spec.architecture == "LlamaForCausalLM"

    # TransformerLens tokenization of a string prepends BOS, as the bridge's own forward does
    lens_cube = capture_lens(bridge, PROMPT)
    assert lens_cube.token_ids[0] == tokenizer.bos_token_id and torch.equal(lens_cube.token_ids[1:], ids)
    assert lens_cube.tokens[0] == tokenizer.bos_token

    # the transformers capture of the fixture's own sdpa model: same ids, same labels, same patterns
    hf_cube = capture_prompt(model, tokenizer, PROMPT)
    assert torch.equal(hf_cube.token_ids, cube.token_ids) and hf_cube.tokens == cube.tokens
    torch.testing.assert_close(cube.pattern, hf_cube.pattern, rtol=0, atol=1e-4)
    assert hooks_attached(bridge) == 0
    assert model.config._attn_implementation == "sdpa"
    assert not any("_original_component" in name for name, _ in model.named_modules())
