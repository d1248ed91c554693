"""Cube files written by earlier versions still load: tests/data holds a file of each format version."""

from pathlib import Path

import torch
from tiny_models import tiny_model

from llm_heatmap.probes import AttentionCube, capture

DATA = Path(__file__).parent / "data"


def test_a_format_1_file_loads_with_the_pattern_it_was_written_with():
    # written by the format-1 code (tiny llama, seed 0, ids below, metadata emptied) and committed unchanged
    cube = AttentionCube.load(DATA / "format_v1.cube.safetensors")
    ids = torch.tensor([[5, 17, 42, 9, 100]])
    model = tiny_model("llama")
    with capture(model) as probe:
        model(input_ids=ids, use_cache=False)
    fresh = probe.cube(ids)
    assert (cube.layers, cube.heads, cube.prompt, cube.tokens) == ((0, 1), (0, 1, 2, 3), "five tokens", ["5", "17", "42", "9", "100"])
    assert cube.spec == fresh.spec and cube.spec.site is None and cube.query_tokens is None
    torch.testing.assert_close(cube.pattern, fresh.pattern, atol=1e-5, rtol=0)
