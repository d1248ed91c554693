"""Axis descriptors: what each key position of a cube is, built by hand, written to and read from a cube
file (format 3), refused when they do not fit the cube; older files (no axis) still load."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from llm_heatmap import InputError
from llm_heatmap.models import spec_from_model
from llm_heatmap.probes import AttentionCube, downsample
from llm_heatmap.probes.axes import Axis, language_axis, vision_axis
from llm_heatmap.probes.cube_schema import FORMAT_VERSION

DATA = __import__("pathlib").Path(__file__).parent / "data"


def _cube(axis: Axis | None, keys: int = 6) -> AttentionCube:
    config = transformers.LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    spec = spec_from_model(transformers.LlamaForCausalLM(config))
    pattern = torch.softmax(torch.randn(1, 2, keys, keys, generator=torch.Generator().manual_seed(3)), -1)
    return AttentionCube.from_pattern(pattern, spec, torch.arange(keys), key_axis=axis)


def test_a_vit_axis_by_hand():
    axis = vision_axis(["[CLS]", "[REG 0]"], 2, 3)
    assert axis.length == 8 and axis.patch_grid == (2, 3) and axis.special == {0: "[CLS]", 1: "[REG 0]"}
    assert axis.is_image.tolist() == [False, False] + [True] * 6
    assert axis.patch_cells().tolist() == [[-1, -1, -1]] * 2 + [[0, r, c] for r in range(2) for c in range(3)]


def test_a_language_axis_finds_each_run_of_image_tokens():
    axis = language_axis([1, 9, 9, 9, 9, 2, 9, 9, 9, 3], image_token_id=9, grids=[(2, 2), (1, 3)], merge=2)
    assert axis.kind == "mixed" and axis.grids == ((2, 2), (1, 3)) and axis.merge == 2
    assert axis.image == (-1, 0, 0, 0, 0, -1, 1, 1, 1, -1)
    assert axis.row == (-1, 0, 0, 1, 1, -1, 0, 0, 0, -1) and axis.col == (-1, 0, 1, 0, 1, -1, 0, 1, 2, -1)
    assert language_axis([1, 9, 9, 9, 9], 9).grids == ((2, 2),), "a square run without grids is a square image"
    assert language_axis([1, 2, 3], 9).kind == "text"
    with pytest.raises(InputError, match="image 0 has 4 image tokens, but its grid is 1 x 3"):
        language_axis([9, 9, 9, 9], 9, grids=[(1, 3)])


def test_the_key_axis_round_trips_through_a_cube_file(tmp_path):
    axis = language_axis([1, 9, 9, 9, 9, 2], image_token_id=9)
    loaded = AttentionCube.load(_cube(axis).save(tmp_path / "axis.cube.safetensors"))
    assert loaded.key_axis == axis and loaded.query_axis == axis
    assert loaded.key_axis.patch_cells().tolist() == axis.patch_cells().tolist()
    special = vision_axis(["[CLS]", "[DIST]"], 2, 2)
    assert AttentionCube.load(_cube(special).save(tmp_path / "vit.cube.safetensors")).key_axis == special
    assert AttentionCube.load(_cube(None).save(tmp_path / "none.cube.safetensors")).key_axis is None
    pooled = downsample(_cube(axis), 3)  # the axis still describes the 6 positions the 3 bins cover
    assert AttentionCube.load(pooled.save(tmp_path / "pooled.cube.safetensors")).key_axis == axis


def _rewrite(path, change) -> None:
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["llm_heatmap"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    change(header)
    save_file(tensors, str(path), metadata={"llm_heatmap": json.dumps(header)})


def test_an_axis_that_does_not_fit_the_cube_is_refused(tmp_path):
    path = _cube(language_axis([1, 9, 9, 9, 9, 2], 9)).save(tmp_path / "bad.cube.safetensors")
    _rewrite(path, lambda header: header["key_axis"].update(length=5, image=[-1] * 5, tile=[], row=[], col=[]))
    with pytest.raises(InputError, match='key_axis.*describes 5 positions, but the cube has 6 keys'):
        AttentionCube.load(path)
    _rewrite(path, lambda header: header["key_axis"].update(kind="pixels"))
    with pytest.raises(InputError, match="key_axis.*is not an Axis"):
        AttentionCube.load(path)


def test_files_of_formats_1_and_2_still_load(tmp_path):
    assert FORMAT_VERSION == 3
    assert AttentionCube.load(DATA / "format_v1.cube.safetensors").key_axis is None
    path = _cube(None).save(tmp_path / "v2.cube.safetensors")
    def as_version_2(header):
        header["version"] = 2
        del header["spec"]["bidirectional_blocks"]
    _rewrite(path, as_version_2)
    cube = AttentionCube.load(path)
    assert cube.key_axis is None and cube.spec.bidirectional_blocks == ()
