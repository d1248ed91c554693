"""The CLI and the notebook stream by themselves; cube files above a size only when asked; refusals give only
advice that works (issue 21, item 3)."""

from __future__ import annotations

import pytest
import torch

import llm_heatmap.analyses.heads.measure as measure
from llm_heatmap.probes import CaptureOptions
from llm_heatmap.cli.grid import AUTO_STREAM_GIB, CUBE_FILE_MB, cube_file_note
from llm_heatmap.errors import InputError

PROMPT = "the cat sat on the mat and the dog sat on the log"


def test_cli_constant_is_the_library_threshold():
    assert AUTO_STREAM_GIB * 2**30 == measure.AUTO_STREAM_BYTES


def test_a_cube_above_the_threshold_streams_by_itself(tiny_gguf, monkeypatch):
    model, tokenizer, spec = tiny_gguf
    with torch.no_grad():
        full, _ = measure.measure_prompt(model, tokenizer, spec, PROMPT, stream=None, max_tokens=4)
        assert full.pooling is None
        monkeypatch.setattr(measure, "AUTO_STREAM_BYTES", full.pattern.numel() * 4 - 1)
        streamed, table = measure.measure_prompt(model, tokenizer, spec, PROMPT, stream=None, max_tokens=4)
    assert streamed.pooling is not None and streamed.num_keys == 4 and len(table) == spec.num_layers * spec.num_heads


def test_refusal_offers_only_what_would_fit(tiny_gguf, monkeypatch):
    model, tokenizer, spec = tiny_gguf
    sizes = {}

    def fake_fits(needs, max_bytes=None):
        return sum(needs.values()) <= sizes["limit"]

    monkeypatch.setattr(measure, "fits", fake_fits)
    monkeypatch.setattr("llm_heatmap.probes.memory.memory_limit", lambda max_bytes=None: (sizes["limit"], "the limit"))
    from llm_heatmap.analyses.runs.prompts import check_length
    from llm_heatmap.probes.capture import estimate_cube_bytes

    tokens = check_length(tokenizer, spec, PROMPT)
    cube = estimate_cube_bytes(spec, tokens)
    working = measure.METRIC_BLOCKS * measure.chunk_bytes(1, spec.num_heads, tokens)
    assert spec.num_layers == 2
    sizes["limit"] = working + cube // 2 - 1  # neither half precision nor one of the two layers would fit
    with pytest.raises(InputError) as refused:
        measure.measure_prompt(model, tokenizer, spec, PROMPT, stream=False, max_tokens=4)
    message = str(refused.value)
    assert message.endswith("stream it instead (stream=True).") and "float16" not in message
    sizes["limit"] = working + cube - 1  # both fit
    with pytest.raises(InputError) as refused:
        measure.measure_prompt(model, tokenizer, spec, PROMPT, stream=False, max_tokens=4)
    assert "(dtype=torch.float16)" in str(refused.value) and "at most 1 layers" in str(refused.value)


def test_cube_file_written_above_the_size_only_when_asked():
    small, large = CUBE_FILE_MB * 2**20, CUBE_FILE_MB * 2**20 + 1
    assert cube_file_note(None, small) is None and cube_file_note(True, large) is None
    assert "pass --cube" in cube_file_note(None, large) and "0.3 GiB, above 256 MiB" in cube_file_note(None, large)
    assert "--no-cube" in cube_file_note(False, 10)


def test_refusal_without_any_way_that_fits_asks_for_memory(tiny_gguf):
    model, tokenizer, spec = tiny_gguf
    with pytest.raises(InputError) as refused:
        measure.measure_prompt(model, tokenizer, spec, PROMPT, stream=False, capture=CaptureOptions(max_bytes=2**20))
    assert "allow more memory (max_bytes=...; the streamed run needs" in str(refused.value)
    assert "stream=True" not in str(refused.value) and "float16" not in str(refused.value)
