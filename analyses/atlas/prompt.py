"""What the head atlas keeps of one prompt on one model: the per-head metrics, the divergence between
every pair of heads, and a small pooled picture of every head's pattern.

The part files of a prompt (`atlas.py` writes them under `parts/<model key>/`):

- `<prompt key>.safetensors`: `divergence`, float32 `"n n"` with n = layers x heads in table
  order (`head_divergence`: JS in nats, or the squared Hellinger distance), and `thumbnails`,
  uint8 `"l h q k"`: the pattern area-pooled to at most `thumbnail_size` per axis
  (`probes.stream.downsample`), 0 where a cell is not attendable, else 1 + round(254 w / w_max)
  with w_max the head's largest pooled weight.
- `<prompt key>.parquet`: one row per head, `site_metrics` of the prompt (the metrics of the site, `sites.py`)
  behind the columns model, prompt_id, group, prompt, n_tokens; written last, so it marks the prompt as done.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from llm_heatmap.probes import capture_prompt
from llm_heatmap.probes.stream import downsample

from llm_heatmap.analyses.similarity.kv_similarity import head_distributions, head_divergence
from llm_heatmap.analyses.heads.measure import capture_site_cubes, site_metrics

THUMBNAIL_SIZE = 16


@dataclass
class PromptMeasures:
    heads: pd.DataFrame  # site_metrics: one row per layer x head
    divergence: np.ndarray  # float32 "n n"
    thumbnails: np.ndarray  # uint8 "l h q k"


def thumbnails(cube, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """uint8 `"l h q k"`: every head area-pooled to at most `size` per axis and quantised (module docstring)."""
    pooled = downsample(cube, size)
    mask = pooled.attendable()[:, None].expand_as(pooled.pattern)  # l h q k
    weights = pooled.pattern.float().clamp(min=0).where(mask, torch.zeros(()))
    peak = weights.amax(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    levels = 1 + torch.round(weights / peak * 254)
    return levels.where(mask, torch.zeros(())).to(torch.uint8).numpy()


def measure_atlas_prompt(model, tokenizer, text: str, *, spec, chat: bool = False, measure: str = "js",
                         thumbnail_size: int = THUMBNAIL_SIZE, max_rows: int | None = None) -> PromptMeasures:
    """Capture `text` once, keeping its whole cube, and keep what the atlas needs (module docstring).
    `max_rows` bounds the query rows the divergence averages over (evenly spaced)."""
    cube = capture_prompt(model, tokenizer, text, spec=spec, chat=chat)
    return cube_measures(cube, measure=measure, thumbnail_size=thumbnail_size, max_rows=max_rows)


def measure_atlas_site_prompt(model, tokenizer, prompt, *, site: str, processor=None, measure: str = "js",
                              thumbnail_size: int = THUMBNAIL_SIZE, max_rows: int | None = None) -> PromptMeasures:
    """The same for one site of a model read through its sites: `prompt` (a `runs.prompts.Prompt`) gives the text,
    the image and the target of one forward pass (`heads.measure.capture_site_cubes`), and `site` names the cube kept."""
    cubes = capture_site_cubes(model, tokenizer, prompt.text or None, image=prompt.image, processor=processor,
                               sites=[site], target=prompt.target)
    return cube_measures(cubes[site], measure=measure, thumbnail_size=thumbnail_size, max_rows=max_rows)


def cube_measures(cube, *, measure: str = "js", thumbnail_size: int = THUMBNAIL_SIZE,
                  max_rows: int | None = None) -> PromptMeasures:
    """What the atlas keeps of one prompt's cube of one site (module docstring)."""
    divergence, _ = head_divergence(head_distributions(cube, max_rows=max_rows), measure)
    return PromptMeasures(heads=site_metrics(cube), divergence=divergence.float().numpy(),
                          thumbnails=thumbnails(cube, thumbnail_size))
