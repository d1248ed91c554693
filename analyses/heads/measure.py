"""A prompt captured and measured in one call: the cube to draw and its per-head table, kept whole
when it fits in memory, else streamed one layer at a time into a pooled cube."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import pandas as pd
import torch

from llm_heatmap.models.offline import source_name
from llm_heatmap.probes import Downsampler, capture_prompt
from llm_heatmap.probes.capture import estimate_cube_bytes
from llm_heatmap.probes.memory import check_fits, fits
from llm_heatmap.probes.stream import CHUNK_BYTES

from llm_heatmap.analyses.heads.metrics import HeadMetricsReducer, head_metrics
from llm_heatmap.analyses.runs.prompts import check_length

METRIC_BLOCKS = 4  # the metrics reducer holds a few row blocks of the streaming size (CHUNK_BYTES) at once


def stream_head_metrics(model, tokenizer, prompt: str, *, spec=None, chat: bool = False, **capture_options) -> pd.DataFrame:
    """Per-head metric table of one prompt, captured in streaming mode (one layer in memory at a time)."""
    reducer = HeadMetricsReducer()
    capture_prompt(model, tokenizer, prompt, spec=spec, chat=chat, consumers=[reducer], keep=False, **capture_options)
    return reducer.table()


def measure_prompt(model, tokenizer, spec, prompt: str, *, stream: bool | None = None, max_tokens: int = 256,
                   chat: bool = False, dtype: torch.dtype = torch.float32, layers=None, heads=None,
                   max_bytes: int | None = None, source: str | None = None, weighting: str = "weights",
                   queries_and_keys: bool = False, also_needs: Callable[[int], dict[str, int]] | None = None):
    """(cube, per-head metrics table) of `prompt`, only the chosen layers and heads captured.

    stream=False keeps the full cube (refused with the numbers and the way out when the run would not
    fit `max_bytes`, default 80% of the memory headroom, `probes.memory`); stream=True keeps one layer
    at a time, the cube area-pooled to `max_tokens` per axis and the table from the streaming reducer;
    stream=None streams only when the full cube would not fit. The run is the cube, the metrics'
    working set and `also_needs(tokens)`, what the caller will do with a cube of that many tokens (e.g.
    `viz.grid.grid_needs` for drawing it), all checked before anything is captured. weighting="norms"
    requires value norms (and a streamed cube pools the norm-weighted pattern); queries_and_keys
    keeps them in a full cube.
    """
    num_tokens = check_length(tokenizer, spec, prompt, chat=chat)
    source = source or source_name(model)
    num_layers, num_heads = len(layers) if layers else spec.num_layers, len(heads) if heads else spec.num_heads
    size = estimate_cube_bytes(spec, num_tokens, num_layers=num_layers, num_heads=num_heads, dtype=dtype)
    working = {"metrics": METRIC_BLOCKS * CHUNK_BYTES}
    full = {"cube": size, **working, **(also_needs(num_tokens) if also_needs else {})}
    if stream is None:
        stream = not fits(full, max_bytes)
    options = dict(spec=spec, chat=chat, source=source, dtype=dtype, layers=layers, heads=heads,
                   value_norms=True if weighting == "norms" else None)
    what = f"the attention cube for {num_tokens} tokens"
    if not stream:
        check_fits(full, what + (" and what is done with it" if also_needs else ""), max_bytes)
        cube = capture_prompt(model, tokenizer, prompt, queries_and_keys=queries_and_keys, **options)
        return cube, head_metrics(cube)
    pooled = min(num_tokens, max_tokens)
    check_fits({"pooled cube": num_layers * num_heads * pooled * pooled * 4, **working,
                **(also_needs(pooled) if also_needs else {})}, f"the streamed run of {num_tokens} tokens", max_bytes,
               advice="capture fewer layers (layers=[...]) or draw fewer tokens per panel (max_tokens=64)")
    downsampler, reducer = Downsampler(max_tokens, weighting), HeadMetricsReducer()
    capture_prompt(model, tokenizer, prompt, consumers=[downsampler, reducer], keep=False, **options)
    return replace(downsampler.cube(), prompt=prompt, source=source), reducer.table()
