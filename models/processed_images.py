"""The picture a model saw: its image processor's `pixel_values` turned back into RGB, so that patch (r, c) of
the model's grid is the block of pixels drawn at row r, column c.

    pictures = processed_pictures(processor, image)     # one PIL image per picture the processor made
    per_image = pictures_per_image(processor, images)   # [image][tile]: each image's pictures, its global view last

The processor resizes, crops and normalises; this undoes only the normalisation (`x * std + mean`, then
`/ rescale_factor`), so the picture has the model's input size and its patches line up with the cube's.
Layouts read: `"b c h w"` (ViT, CLIP, LLaVA: one picture per batch entry), Qwen2-VL's flattened patches
`"(bh bw mh mw) (c t ph pw)"` with `image_grid_thw` (one picture per image, its first frame), and Idefics3 /
SmolVLM's `"b n c h w"` (n pictures per text: each image's tiles row by row, then its global view; a picture
that `pixel_attention_mask` marks as all padding, where a text has fewer images than another, is left out).
"""

from __future__ import annotations

import einops
import numpy as np
import torch

from llm_heatmap.errors import InputError


def _unnormalised(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """`"... c h w"` values back to 0-255."""
    pixels = pixels.double()
    if getattr(image_processor, "do_normalize", False):
        channels = pixels.shape[-3]
        mean = torch.as_tensor(image_processor.image_mean, dtype=torch.float64).reshape(-1)
        std = torch.as_tensor(image_processor.image_std, dtype=torch.float64).reshape(-1)
        mean, std = (v.expand(channels) if len(v) == 1 else v for v in (mean, std))
        pixels = pixels * std[:, None, None] + mean[:, None, None]
    if getattr(image_processor, "do_rescale", False):
        pixels = pixels / float(image_processor.rescale_factor)
    return pixels.clamp(0, 255).round()


def _picture(pixels: torch.Tensor):
    from PIL import Image

    array = einops.rearrange(pixels, "c h w -> h w c").to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array[..., :3] if array.shape[-1] >= 3 else array[..., 0]))


def pictures_from_pixels(pixel_values, image_processor, image_grid_thw=None, pixel_attention_mask=None) -> list:
    """One RGB PIL image per picture in `pixel_values` (module docstring)."""
    pixels = torch.as_tensor(pixel_values).detach().cpu()
    if pixels.dim() == 5:  # "b n c h w": the pictures of each text, in order
        pixels = einops.rearrange(pixels, "b n c h w -> (b n) c h w")
        if pixel_attention_mask is not None:
            kept = einops.rearrange(torch.as_tensor(pixel_attention_mask).bool().cpu(), "b n h w -> (b n) (h w)")
            pixels = pixels[kept.any(-1)]
    if image_grid_thw is not None:
        merge = int(getattr(image_processor, "merge_size", 1) or 1)
        patch = int(image_processor.patch_size)
        temporal = int(getattr(image_processor, "temporal_patch_size", 1) or 1)
        pictures, start = [], 0
        for frames, rows, cols in torch.as_tensor(image_grid_thw).reshape(-1, 3).tolist():
            count = frames * rows * cols
            block = pixels[start:start + count][: rows * cols]  # the first frame's patches
            start += count
            frame = einops.rearrange(block, "(bh bw mh mw) (c t ph pw) -> t c (bh mh ph) (bw mw pw)",
                                     bh=rows // merge, bw=cols // merge, mh=merge, mw=merge, t=temporal, ph=patch,
                                     pw=patch)[0]
            pictures.append(_picture(_unnormalised(frame, image_processor)))
        return pictures
    if pixels.dim() == 4:
        return [_picture(_unnormalised(picture, image_processor)) for picture in pixels]
    raise InputError(f"the image processor gave pixel_values of shape {tuple(pixels.shape)}, which is not one picture "
                     "per image (b c h w), the pictures of each text (b n c h w) or Qwen2-VL's patches; overlays of this "
                     "model's images are not supported.")


def processed_pictures(processor, image) -> list:
    """The pictures `processor` makes of `image` (a PIL image, or a list of them), as the model sees them
    (module docstring)."""
    image_processor = getattr(processor, "image_processor", processor)
    out = image_processor(images=image, return_tensors="pt")
    return pictures_from_pixels(out["pixel_values"], image_processor, out.get("image_grid_thw"),
                                out.get("pixel_attention_mask"))


def pictures_per_image(processor, images: list) -> list[list]:
    """`images` (PIL images) as the model sees them, grouped by image: `[image][tile]`, one picture for an image
    that is not split, else its tiles row by row and its global view last (the order of its tiles on a language
    model's axis, `Axis.tile_names()`)."""
    image_processor = getattr(processor, "image_processor", processor)
    pictures = processed_pictures(processor, list(images))
    counts = [1] * len(images)
    if len(pictures) != len(images):  # split images: the processor tells each image's rows and columns of tiles
        out = image_processor(images=list(images), return_tensors="pt", return_row_col_info=True)
        grids = [(int(r), int(c)) for rows, cols in zip(out["rows"], out["cols"]) for r, c in zip(rows, cols)]
        counts = [rows * cols + 1 if rows * cols else 1 for rows, cols in grids]
    if sum(counts) != len(pictures):
        raise InputError(f"the image processor made {len(pictures)} pictures of {len(images)} images, which cannot be "
                         "told apart per image; overlays of this model's images are not supported.")
    starts = np.cumsum([0, *counts]).tolist()
    return [pictures[start:end] for start, end in zip(starts, starts[1:])]


def side_by_side(tiles: list, cells: list[tuple[int, int]]):
    """One picture of `tiles` (PIL images of one size) placed at their (row, col) cells of the tile grid: the
    split image the tiles were cut from, as the model saw it."""
    from PIL import Image

    width, height = tiles[0].size
    rows, cols = max(r for r, _ in cells) + 1, max(c for _, c in cells) + 1
    canvas = Image.new("RGB", (cols * width, rows * height))
    for tile, (row, col) in zip(tiles, cells):
        canvas.paste(tile, (col * width, row * height))
    return canvas
