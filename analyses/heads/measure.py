"""A prompt captured and measured in one call: the cube to draw and its per-head table, kept whole
when it fits in memory, else streamed one layer at a time into a pooled cube."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import pandas as pd
import torch

from llm_heatmap.models.offline import source_name
from llm_heatmap.probes import Downsampler, capture_prompt
from llm_heatmap.probes.capture import CaptureOptions, estimate_cube_bytes
from llm_heatmap.probes.memory import check_fits, fits, size_text
from llm_heatmap.probes.stream import chunk_bytes

from llm_heatmap.analyses.heads.metrics import COLUMNS, HeadMetricsReducer, head_metrics
from llm_heatmap.analyses.runs.progress import LayerProgress
from llm_heatmap.analyses.runs.prompts import MIN_TOKENS, check_length

METRIC_BLOCKS = 4  # the metrics reducer holds a few row blocks of the streaming size (`stream.chunk_bytes`) at once
# stream=None streams a cube above this size even where it would fit: drawing and measuring a multi-GiB cube
# takes minutes for a grid that equals the streamed one (pooled to max_tokens either way)
AUTO_STREAM_BYTES = 1 << 30


def stream_head_metrics(model, tokenizer, prompt: str, *, spec=None, chat: bool = False, **capture_options) -> pd.DataFrame:
    """Per-head metric table of one prompt, captured in streaming mode (one layer in memory at a time)."""
    reducer = HeadMetricsReducer()
    layers = capture_options.get("layers")
    ticker = LayerProgress(len(layers) if layers else spec.num_layers if spec is not None else None)
    capture_prompt(model, tokenizer, prompt, spec=spec, chat=chat, consumers=[reducer, ticker], keep=False,
                   **capture_options)
    return reducer.table()


def measure_prompt(model, tokenizer, spec, prompt: str, *, stream: bool | None = None, max_tokens: int = 256,
                   chat: bool = False, source: str | None = None, weighting: str = "weights",
                   also_needs: Callable[[int], dict[str, int]] | None = None, capture: CaptureOptions = CaptureOptions()):
    """(cube, per-head metrics table) of `prompt`; `capture` (`probes.CaptureOptions`) chooses the layers, heads,
    dtype, memory bound and who computes the attention output (keep and last_queries are this function's).

    stream=False keeps the full cube (refused with the numbers and the way out when the run would not
    fit `capture.max_bytes`, default 80% of the memory headroom, `probes.memory`); stream=True keeps one layer
    at a time, the cube area-pooled to `max_tokens` per axis and the table from the streaming reducer;
    A prompt of one token gives its cube and an empty table (every metric needs a row that spreads over two
    keys). stream=None streams when the full cube would not fit or is above `AUTO_STREAM_BYTES`. The run is the cube, the metrics'
    working set and `also_needs(tokens)`, what the caller will do with a cube of that many tokens (e.g.
    `viz.grid.grid_needs` for drawing it), all checked before anything is captured. weighting="norms"
    requires value norms (and a streamed cube pools the norm-weighted pattern); `capture.queries_and_keys`
    keeps them in a full cube.
    """
    layers, heads, dtype, max_bytes = capture.layers, capture.heads, capture.dtype, capture.max_bytes
    num_tokens = check_length(tokenizer, spec, prompt, chat=chat, min_tokens=1)
    source = source or source_name(model)
    num_layers, num_heads = len(layers) if layers else spec.num_layers, len(heads) if heads else spec.num_heads
    size = estimate_cube_bytes(spec, num_tokens, num_layers=num_layers, num_heads=num_heads, dtype=dtype)
    working = {"metrics": METRIC_BLOCKS * chunk_bytes(1, num_heads, num_tokens)}
    full = {"cube": size, **working, **(also_needs(num_tokens) if also_needs else {})}
    if num_tokens < MIN_TOKENS:
        stream = False  # one token: nothing to stream, nothing to measure
    if stream is None:
        stream = size > AUTO_STREAM_BYTES or not fits(full, max_bytes)
    options = dict(spec=spec, chat=chat, source=source, dtype=dtype, layers=layers, heads=heads, max_bytes=max_bytes,
                   value_norms=True if weighting == "norms" else capture.value_norms,
                   compute_output=capture.compute_output, chunk_rows=capture.chunk_rows)
    what = f"the attention cube for {num_tokens} tokens"
    pooled = min(num_tokens, max_tokens)
    streamed = {"pooled cube": num_layers * num_heads * pooled * pooled * 4, **working,
                **(also_needs(pooled) if also_needs else {})}
    if not stream:
        check_fits(full, what + (" and what is done with it" if also_needs else ""), max_bytes,
                   advice=_full_cube_advice(full, streamed, size, num_layers, dtype, max_bytes))
        cube = capture_prompt(model, tokenizer, prompt, queries_and_keys=capture.queries_and_keys, **options)
        if num_tokens < MIN_TOKENS:  # a grid of one token draws; no row spreads over two keys, so no metrics
            return cube, pd.DataFrame(columns=list(COLUMNS))
        return cube, head_metrics(cube)
    check_fits(streamed, f"the streamed run of {num_tokens} tokens", max_bytes,
               advice=_streamed_advice(working, max_bytes))
    downsampler, reducer = Downsampler(max_tokens, weighting), HeadMetricsReducer()
    capture_prompt(model, tokenizer, prompt, consumers=[downsampler, reducer, LayerProgress(num_layers)], keep=False,
                   **options)
    return replace(downsampler.cube(), prompt=prompt, source=source), reducer.table()


def _full_cube_advice(full: dict[str, int], streamed: dict[str, int], size: int, num_layers: int,
                      dtype: torch.dtype, max_bytes) -> str:
    """Only the ways out that would work for this run: streaming, half precision and fewer layers where
    they would fit; otherwise more memory."""
    ways = ["stream it instead (stream=True)"] if fits(streamed, max_bytes) else []
    rest = {name: bytes_ for name, bytes_ in full.items() if name != "cube"}
    if dtype == torch.float32 and fits({"cube": size // 2, **rest}, max_bytes):
        ways.append("capture in fp16 (dtype=torch.float16)")
    per_layer = size // max(1, num_layers)
    fitting = next((n for n in range(num_layers - 1, 0, -1) if fits({"cube": per_layer * n, **rest}, max_bytes)), 0)
    if fitting:
        ways.append(f"capture at most {fitting} layers (layers=[...])")
    if not ways:
        least = min(sum(streamed.values()), sum(full.values()))
        return (f"allow more memory (max_bytes=...; the streamed run needs {size_text(least)})" if max_bytes is not None
                else f"free memory: even the streamed run needs {size_text(least)}")
    return ", or ".join(ways)


def _streamed_advice(working: dict[str, int], max_bytes) -> str:
    """The way out of a refused streamed run: fewer layers and tokens shrink the pooled cube and the drawing,
    but never the metrics' working set, so a limit below that needs raising."""
    if max_bytes is not None and not fits(working, max_bytes):
        return f"allow more memory (max_bytes=...): the metrics alone take {size_text(sum(working.values()))}"
    return "capture fewer layers (layers=[...]) or draw fewer tokens per panel (max_tokens=64)"


def site_metrics(cube) -> pd.DataFrame:
    """The per-head table of one site's cube: alignment, monotonicity, coverage and source entropy for
    cross-attention (`cross_metrics`), the head metrics for every other site, with the vision metrics
    (`vision_metrics`) where the keys are image patches and the image share of text rows (`image_share`)
    where a language model's keys mix text and image tokens. A batch of sequences (a tower that ran a pass's
    pictures as a batch: LLaVA's images, Idefics3's tiles) gets a table per sequence, a `sequence` column first."""
    from .cross_metrics import cross_metrics
    from .image_share import image_share
    from .vision_metrics import vision_metrics

    if cube.batched and len(cube) > 1:
        tables = [site_metrics(cube.item(index)) for index in range(len(cube))]
        return pd.concat([table.assign(sequence=index) for index, table in enumerate(tables)],
                         ignore_index=True)[["sequence", *tables[0].columns]]
    cube = cube.one_sequence()
    if cube.spec.site == "cross":
        return cross_metrics(cube)
    table = head_metrics(cube)
    axis = cube.key_axis
    if axis is None or cube.pooling is not None or not bool(axis.is_image.any()):
        return table
    extra = vision_metrics(cube) if axis.kind == "patches" else image_share(cube).drop(columns="kv_group", errors="ignore")
    return table.merge(extra, on=["layer", "head"], how="left")


def measure_sites(model, tokenizer, text: str, *, spec=None, chat: bool = False, image=None, processor=None,
                  sites=None, target: str | None = None, **capture_options) -> pd.DataFrame:
    """The per-head table of every site (or of `sites`) of one forward pass over `text` (and `image`, a path
    or PIL image, prepared by `processor`), a `site` column first: the `measure` of a batch over a model
    with several sites (`models.inputs.site_inputs` says what each kind of model gets). `spec` and `chat`
    are taken for the batch's signature; a chat template is not applied."""
    cubes = capture_site_cubes(model, tokenizer, text, image=image, processor=processor, sites=sites, target=target,
                               **capture_options)
    tables = [site_metrics(cube).assign(site=site) for site, cube in cubes.items()]
    table = pd.concat(tables, ignore_index=True)
    return table[["site", *[c for c in table.columns if c != "site"]]]


def capture_site_cubes(model, tokenizer, text: str | None, *, image=None, processor=None, sites=None,
                       target: str | None = None, **capture_options):
    """The `SiteCubes` (site -> cube) of one forward pass over `text`, `image` (a path or PIL image, prepared by
    `processor`) and `target`, as `measure_sites` measures them."""
    from llm_heatmap.models import site_specs
    from llm_heatmap.models.inputs import site_inputs
    from llm_heatmap.probes import capture_sites

    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from PIL import Image

        with Image.open(image) as opened:
            image = opened.convert("RGB")
    specs = site_specs(model)
    inputs = site_inputs(model, tokenizer, processor, specs, prompt=text, image=image, target=target)
    inputs = {key: value.to(model.device) if hasattr(value, "to") else value for key, value in inputs.items()}
    with torch.no_grad(), capture_sites(model, sites=sites, **capture_options) as probe:
        model(**inputs)
    return probe.cubes(inputs.get("input_ids"), decoder_input_ids=inputs.get("decoder_input_ids"),
                       attention_mask=inputs.get("attention_mask"), tokenizer=tokenizer, prompt=text)
