"""Capture every attention site of a model at once: one `AttentionCube` per site.

    with capture_sites(model) as probe:
        model(input_ids=source_ids, decoder_input_ids=target_ids)
    cubes = probe.cubes(source_ids, decoder_input_ids=target_ids, tokenizer=tokenizer)
    cubes["cross"].pattern.shape   # "l h q k": target rows over source keys

Each site gets its own `Probe` (the same tap, hooks and options), over that site's attention modules
and `ModelSpec` (`models.site_specs`). What each site's axes hold: encoder/self/text sites attend over
`input_ids`; a decoder over `decoder_input_ids`; cross-attention from `decoder_input_ids` (queries) to
`input_ids` (keys); a vision tower, or an encoder fed `input_features` (Whisper), over positions that
have no token ids, labelled from their axis (`position_axis`, `axis_labels`). A vision tower that runs several tiles or images as a
batch (Idefics3 / SmolVLM's image splitting) gives a batched cube, one sequence per tile (`cube.item(i)`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

import einops
import torch
from torch import nn

from llm_heatmap.errors import InputError
from llm_heatmap.models import site_specs
from llm_heatmap.models.loading import reads_images
from llm_heatmap.models.sites import CROSS, DECODER, VISION

from .axes import Axis, frames_axis, language_axis, text_axis, vision_axis
from .capture import capture, token_strings
from .cube import AttentionCube


@dataclass(frozen=True)
class SiteCubes(Mapping):
    """Site name -> `AttentionCube` of one forward pass, sites in the model's order."""

    cubes: dict[str, AttentionCube]

    def __getitem__(self, site: str) -> AttentionCube:
        if site not in self.cubes:
            raise InputError(f"site={site!r} was not captured; the sites are {', '.join(self.cubes)}.")
        return self.cubes[site]

    def __iter__(self):
        return iter(self.cubes)

    def __len__(self) -> int:
        return len(self.cubes)

    def _repr_html_(self) -> str:
        """The notebook display: one view with a site switch; the drawing is imported only now."""
        from llm_heatmap.notebook import sites_html

        return sites_html(self)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name} {tuple(cube.pattern.shape)}" for name, cube in self.cubes.items())
        return f"SiteCubes({shapes})"


def position_axis(site: str, count: int, model: nn.Module, image_grid_thw=None) -> Axis:
    """The axis of `count` positions without token ids: a vision tower's special tokens then its patch
    grid (a tower given `image_grid_thw`: its images in its own order, `packed_tower_axis`), else audio frames."""
    config = getattr(model.config, "vision_config", None) or model.config
    if image_grid_thw is not None and site == VISION:
        axis = packed_tower_axis(image_grid_thw, config, count)
        if axis is not None:
            return axis
    if site == VISION or reads_images(model.config):
        side = int(getattr(config, "image_size", 0) or 0) // int(getattr(config, "patch_size", 1) or 1)
        special = count - side * side
        if side and 0 <= special:
            return vision_axis(special_labels(config, special), side, side, patch_pixels=_patch_pixels(config))
    return frames_axis(count)


def packed_tower_axis(image_grid_thw, config, count: int) -> Axis | None:
    """The axis of a tower that packs its images into one sequence (Qwen2-VL, Qwen2.5-VL), in the tower's own
    order: image by image, each image's patches in merge x merge blocks as the processor lays them out, and, where
    the tower attends within windows (a vision config with `window_size` and `fullatt_block_indexes`: Qwen2.5-VL),
    reordered window by window as the tower runs them (transformers' `get_vision_window_index`), in every layer.
    None where the grids are not `count` patches of single frames."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    grid = torch.as_tensor(image_grid_thw).reshape(-1, 3).long().cpu()
    if int(grid.prod(-1).sum()) != count or bool((grid[:, 0] != 1).any()):
        return None
    merge = int(getattr(config, "spatial_merge_size", 1) or 1)
    cells = get_vision_position_ids(grid, merge)  # "n 2": (row, col) of each patch, in the processor's order
    images = torch.arange(len(grid)).repeat_interleave(grid.prod(-1))
    if getattr(config, "window_size", None) and hasattr(config, "fullatt_block_indexes"):
        windows, _ = get_vision_window_index(grid, merge, int(config.window_size), int(config.patch_size))
        order = einops.rearrange(windows[:, None] * merge * merge + torch.arange(merge * merge), "w u -> (w u)")
        cells, images = cells[order], images[order]
    return Axis("patches", count, image=tuple(images.tolist()), tile=(0,) * count, row=tuple(cells[:, 0].tolist()),
                col=tuple(cells[:, 1].tolist()), grids=tuple((h, w) for _, h, w in grid.tolist()),
                patch_pixels=_patch_pixels(config))


def token_axis(model: nn.Module, token_ids, image_grid_thw=None, tokens=None) -> Axis:
    """The axis of a site over token ids: text, or a VLM's text and image tokens (`axes.language_axis`;
    Qwen2-VL's image grids from `image_grid_thw`, after the tower's merge; Idefics3's tiles grouped by image from
    the token strings `tokens`)."""
    config = model.config
    image_token = next((v for v in (getattr(config, "image_token_id", None), getattr(config, "image_token_index", None))
                        if v is not None), None)
    vision = getattr(config, "vision_config", None)
    merge = int(getattr(vision, "spatial_merge_size", 1) or 1) if image_grid_thw is not None else 1
    grids = None
    if image_grid_thw is not None:
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in torch.as_tensor(image_grid_thw).reshape(-1, 3).tolist()]
    return language_axis(token_ids, image_token, grids, merge, patch_pixels=_patch_pixels(vision), tokens=tokens)


def _patch_pixels(config) -> int:
    """The side of one patch in pixels (`patch_size` of a vision config), 0 where the config does not say."""
    size = getattr(config, "patch_size", 0) if config is not None else 0
    return int(size) if isinstance(size, int) else 0


def axis_labels(axis: Axis) -> list[str]:
    """A label per position of an axis without token ids: special names, "rR,cC" for the patch at row R and
    column C, "fI" for frame I (no spaces: every view shows a space in a token as a visible mark)."""
    if axis.kind == "frames":
        return [f"f{i}" for i in range(axis.length)]
    if len(axis.grids) > 1:  # several images: each patch says which
        return [axis.special.get(i) or f"i{m},r{r},c{c}" for i, (m, r, c) in enumerate(zip(axis.image, axis.row, axis.col))]
    return [axis.special.get(i) or f"r{r},c{c}" for i, (r, c) in enumerate(zip(axis.row, axis.col))]


def special_labels(config, count: int) -> list[str]:
    """Labels of the `count` tokens a vision tower puts before its patches: [CLS], then DeiT's
    distillation token or Dinov2's registers (`num_register_tokens`), else numbered."""
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    names = ["[CLS]"] + (["[DIST]"] if getattr(config, "model_type", None) == "deit" else [])
    names += [f"[REG {i}]" for i in range(registers)]
    names += [f"[special {i}]" for i in range(len(names), count)]
    return names[:count]


class SiteProbe:
    """One `Probe` per attention site of a model; use through `capture_sites(model, sites=None, **options)`."""

    def __init__(self, model: nn.Module, *, sites=None, **options):
        specs = site_specs(model)
        chosen = list(specs) if sites is None else [sites] if isinstance(sites, str) else list(sites)
        unknown = [s for s in chosen if s not in specs]
        if unknown:
            raise InputError(f"site={unknown[0]!r} is not a site of {type(model).__name__}; its sites are {', '.join(specs)}.")
        self.model = model
        self.specs = {site: specs[site] for site in chosen}
        self.probes = {site: capture(model, spec=spec, **options) for site, spec in self.specs.items()}
        self._stack: contextlib.ExitStack | None = None
        self._image_grid_thw = None

    def _before_model(self, module, args, kwargs) -> None:
        grid = kwargs.get("image_grid_thw")
        self._image_grid_thw = grid.detach().cpu() if isinstance(grid, torch.Tensor) else None

    def __enter__(self) -> "SiteProbe":
        with contextlib.ExitStack() as stack:
            stack.callback(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True).remove)
            for probe in self.probes.values():
                stack.enter_context(probe)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(*exc)

    def cubes(self, input_ids=None, *, decoder_input_ids=None, attention_mask=None, decoder_attention_mask=None,
              tokenizer=None, prompt=None, source=None) -> SiteCubes:
        """The cube of every captured site of the last forward pass (one sequence)."""
        cubes = {}
        for site, probe in self.probes.items():
            if probe._buffer is None:
                raise InputError(f"site {site} ran no attention in the last forward pass; run a full forward pass "
                                 "(an encoder-decoder model needs decoder_input_ids) inside the block.")
            batch, _, _, queries, keys = probe._buffer.shape
            grid = self._image_grid_thw
            if site == VISION and batch > 1:  # tiles or images the tower ran as a batch: one sequence each
                axis = position_axis(site, keys, self.model)
                cube = probe.cube(torch.arange(keys).expand(batch, keys), prompt=prompt, source=source)
                cubes[site] = replace(cube, tokens=[axis_labels(axis) for _ in range(batch)], key_axis=axis)
                continue
            if batch != 1:
                raise InputError(f"capture_sites holds one sequence per forward pass, got a batch of {batch}; "
                                 "run the inputs one at a time.")
            decoder_side = site in (DECODER, CROSS)
            key_ids, key_mask = (decoder_input_ids, decoder_attention_mask) if site == DECODER else (input_ids, attention_mask)
            axis = None
            if site == VISION or key_ids is None or torch.as_tensor(key_ids).shape[-1] != keys:
                if decoder_side and site == DECODER:
                    raise InputError("the decoder's cube needs decoder_input_ids; pass the ones the model ran with.")
                axis = position_axis(site, keys, self.model, grid)
                key_ids, key_mask = torch.arange(keys), None
            cube = probe.cube(key_ids, key_mask, tokenizer=None if axis else tokenizer, prompt=prompt, source=source)
            if axis is not None:
                cube = replace(cube, tokens=axis_labels(axis), key_axis=axis)
            else:
                cube = replace(cube, key_axis=token_axis(self.model, key_ids, grid, cube.tokens))
            if site == CROSS:
                if decoder_input_ids is None:
                    raise InputError("the cross-attention cube needs decoder_input_ids; pass the ones the model ran with.")
                query_ids = torch.as_tensor(decoder_input_ids).reshape(-1)
                if len(query_ids) != queries:
                    raise InputError(f"decoder_input_ids hold {len(query_ids)} tokens, but cross-attention ran "
                                     f"{queries} query rows; pass the decoder_input_ids the model ran with.")
                cube = replace(cube, query_tokens=token_strings(query_ids, tokenizer))
            cubes[site] = cube
        return SiteCubes(cubes)


def capture_sites(model: nn.Module, *, sites=None, **options) -> SiteProbe:
    """A context manager capturing every attention site (or the `sites` named) of each forward pass run
    inside it; the options are `capture`'s."""
    return SiteProbe(model, sites=sites, **options)
