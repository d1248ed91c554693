"""The `AttentionCube` of a capture: files, views, padding removal."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from llm_heatmap.errors import InputError
from llm_heatmap.probes import AttentionCube, capture
from tiny_models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", "sdpa")  # GQA: 4 query heads on 2 KV heads


@pytest.fixture(scope="module")
def cube(llama):
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), capture(llama) as probe:
        llama(input_ids=ids)
    return probe.cube(ids, prompt="seven tokens", source="tiny-llama")


@pytest.fixture(scope="module")
def batch(llama):
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad(), capture(llama) as probe:
        llama(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    return probe.cube(ids, mask, prompt=["short", "longer"])


def assert_same_cube(a: AttentionCube, b: AttentionCube):
    assert a.pattern.dtype == b.pattern.dtype and torch.equal(a.pattern, b.pattern)
    for name in ("token_ids", "query_positions", "key_mask", "query_mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.generated is None) == (b.generated is None)
    assert a.generated is None or torch.equal(a.generated, b.generated)
    for name in ("spec", "tokens", "layers", "heads", "prompt", "source", "metadata"):
        assert getattr(a, name) == getattr(b, name), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_roundtrip(cube, dtype, tmp_path):
    original = cube.to(dtype)
    loaded = AttentionCube.load(original.save(tmp_path / "cube.safetensors"))
    assert_same_cube(loaded, original)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "cube.safetensors").stat().st_mode) == 0o666 & ~umask  # like any new file
    assert loaded.metadata["kernel"] == "sdpa" and "transformers" in loaded.metadata["versions"]
    assert torch.equal(loaded.attendable(), original.attendable())  # no model needed after loading


def test_save_load_batched_with_generated(batch, tmp_path):
    marked = AttentionCube(**{**batch.__dict__, "generated": torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1]]).bool()})
    assert_same_cube(AttentionCube.load(marked.save(tmp_path / "b.safetensors")), marked)


def test_truncated_and_foreign_files(cube, tmp_path):
    path = cube.save(tmp_path / "cube.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        AttentionCube.load(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(InputError, match="not an llm-heatmap cube"):
        AttentionCube.load(foreign)
    with pytest.raises(InputError, match="does not exist"):
        AttentionCube.load(tmp_path / "missing.safetensors")


def test_by_kv_group(cube):
    grouped = cube.by_kv_group()
    assert grouped.shape == (2, 2, 2, 7, 7)
    for head in range(4):
        assert torch.equal(grouped[:, cube.spec.kv_group(head), head % 2], cube.pattern[:, head])
    assert cube.kv_groups.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        cube.select(heads=[1]).by_kv_group()


def test_canvas(cube):
    canvas = cube.canvas()
    assert canvas.shape == (2 * 7, 4 * 7)
    for layer, head, q, k in [(0, 0, 0, 0), (1, 3, 6, 2), (0, 2, 4, 4), (1, 1, 5, 0)]:
        assert canvas[layer * 7 + q, head * 7 + k] == cube.pattern[layer, head, q, k]


def test_select(cube):
    chosen = cube.select(layers=[1], heads=[3, 0])
    assert chosen.layers == (1,) and chosen.heads == (3, 0)
    assert torch.equal(chosen.pattern, cube.pattern[1:2][:, [3, 0]])
    assert chosen.kv_groups.tolist() == [1, 0]
    with pytest.raises(InputError, match="layer 5"):
        cube.select(layers=[5])


def test_item_removes_padding(batch):
    assert batch.batched and len(batch) == 2 and batch.pattern.shape == (2, 2, 4, 6, 6)
    first = batch.item(0)
    assert first.pattern.shape == (2, 4, 4, 4) and first.prompt == "short"
    assert torch.equal(first.pattern, batch.pattern[0][:, :, 2:, 2:])
    assert first.query_positions.tolist() == [0, 1, 2, 3] and first.tokens == batch.tokens[0][2:]
    torch.testing.assert_close(first.pattern.sum(-1), torch.ones(2, 4, 4))  # padding keys got no attention
    assert torch.equal(batch.item(1).pattern, batch.pattern[1])
    with pytest.raises(ValueError):
        batch.canvas()


def test_from_pattern_builds_a_full_one_sequence_cube(minilm_eager):
    model, tokenizer, spec = minilm_eager
    encoded = tokenizer("the sky is blue", return_tensors="pt")
    with torch.no_grad():
        attentions = model(**encoded, output_attentions=True).attentions
    ids = encoded["input_ids"][0]
    cube = AttentionCube.from_pattern(torch.stack(attentions, 1)[0], spec, ids, prompt="the sky is blue")
    assert cube.pattern.shape == (6, 12, len(ids), len(ids)) and not cube.batched
    assert cube.layers == tuple(range(6)) and cube.heads == tuple(range(12))
    assert cube.tokens == [str(int(i)) for i in ids] and cube.prompt == "the sky is blue"
    assert cube.query_positions.tolist() == list(range(len(ids))) and bool(cube.attendable().all())
    last_rows = AttentionCube.from_pattern(cube.pattern[:, :, -2:], spec, ids)
    assert last_rows.query_positions.tolist() == [len(ids) - 2, len(ids) - 1]
