"""The picture a model saw: its image processor's `pixel_values` turned back into RGB, so that patch (r, c) of
the model's grid is the block of pixels drawn at row r, column c.

    pictures = processed_pictures(processor, image)     # one PIL image per picture the processor made

The processor resizes, crops and normalises; this undoes only the normalisation (`x * std + mean`, then
`/ rescale_factor`), so the picture has the model's input size and its patches line up with the cube's.
Layouts read: `"b c h w"` (ViT, CLIP, LLaVA: one picture per batch entry) and Qwen2-VL's flattened patches
`"(bh bw mh mw) (c t ph pw)"` with `image_grid_thw` (one picture per image, its first frame).
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


def pictures_from_pixels(pixel_values, image_processor, image_grid_thw=None) -> list:
    """One RGB PIL image per picture in `pixel_values` (module docstring)."""
    pixels = torch.as_tensor(pixel_values).detach().cpu()
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
                     "per image (b c h w) or Qwen2-VL's patches; overlays of this model's images are not supported.")


def processed_pictures(processor, image) -> list:
    """The pictures `processor` makes of `image` (a PIL image), as the model sees them (module docstring)."""
    image_processor = getattr(processor, "image_processor", processor)
    out = image_processor(images=image, return_tensors="pt")
    return pictures_from_pixels(out["pixel_values"], image_processor, out.get("image_grid_thw"))
