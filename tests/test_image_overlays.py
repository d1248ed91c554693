"""One query's attention over an image's patches (analyses.maps.image_maps), the picture as the processor made it
(models.processed_images) and the overlay figures (viz.overlays), on tiny random ViT, LLaVA and Qwen2-VL."""

from __future__ import annotations

from dataclasses import replace

import einops
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from llm_heatmap import InputError
from llm_heatmap.analyses import rollout
from llm_heatmap.analyses.maps.image_maps import head_image_maps, layer_image_maps, resolve_query
from llm_heatmap.models.processed_images import processed_pictures
from llm_heatmap.probes import capture_sites
from llm_heatmap.viz.overlays import plot_layer_overlays, plot_overlays, upsampled
from tiny_models import QWEN_END as END, QWEN_IMAGE as IMAGE, QWEN_START as START, tiny_qwen2_vl

VIT = dict(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, intermediate_size=32)


def _picture(height=20, width=24, seed=0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def vit_cube():
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**VIT)).eval()
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture_sites(model) as probe:
        model(pixel_values=pixels)
    (cube,) = probe.cubes().values()
    return cube


@pytest.fixture(scope="module")
def qwen_cubes():
    torch.manual_seed(0)
    model = tiny_qwen2_vl()
    grid = torch.tensor([[1, 4, 6]])  # 4 x 6 tower patches, 2 x 3 language-model tokens after the 2 x 2 merge
    pixels = torch.randn(24, 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[5, 6, START] + [IMAGE] * 6 + [END, 7, 8]])
    with torch.no_grad(), capture_sites(model) as probe:
        model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids == IMAGE).int())
    return probe.cubes(ids)


@pytest.mark.parametrize("query, row", [("cls", 0), ("last", 16), (6, 6)])
def test_vit_head_maps_are_the_query_row_on_the_patch_grid(vit_cube, query, row):
    maps = head_image_maps(vit_cube, query)
    assert maps.values.shape == (3, 4, 4, 4) and maps.grid == (4, 4) and maps.query == row
    # the ViT's patches follow [CLS] row by row: key 1 + 4 r + c is cell (r, c)
    expected = einops.rearrange(vit_cube.pattern[:, :, row, 1:], "l h (r c) -> l h r c", r=4)
    torch.testing.assert_close(maps.values, expected.double(), atol=0, rtol=0)
    torch.testing.assert_close(maps.mass, vit_cube.pattern[:, :, row, 1:].sum(-1).double())
    assert maps.query_label == vit_cube.tokens[row] and maps.layers == (0, 1, 2) and maps.heads == (0, 1, 2, 3)
    assert maps.query_cell == (None if row == 0 else divmod(row - 1, 4))  # a patch query: its own cell


def test_a_patch_query_is_framed_in_white(vit_cube):
    picture = Image.new("RGB", (16, 16), (0, 0, 0))
    figure = plot_overlays(head_image_maps(vit_cube, 6), picture, panel_px=64)  # patch (1, 1): pixels 16-31
    canvas = figure.axes[0].get_images()[0].get_array()
    panel = np.asarray(canvas[:64, :64])
    assert (panel[16:32, 16] == 1).all() and (panel[16, 16:32] == 1).all() and (panel[31, 16:32] == 1).all()
    assert (panel[:16, :16] < 1).all()


def test_vit_layer_mean_and_rollout_rows(vit_cube):
    mean, rolled = layer_image_maps(vit_cube, "cls", residual=0.3)
    expected_mean = vit_cube.pattern[:, :, 0, 1:].double().mean(1)
    torch.testing.assert_close(mean.values, expected_mean.reshape(3, 4, 4))
    expected_rollout = rollout(vit_cube, residual=0.3)[:, 0, 1:]
    torch.testing.assert_close(rolled.values, expected_rollout.reshape(3, 4, 4), atol=0, rtol=0)
    assert rolled.title == "rollout (residual 0.3)"


def test_qwen2_vl_tower_windows_and_merged_language_tokens_land_on_their_cells(qwen_cubes):
    tower = qwen_cubes["vision"]
    maps = head_image_maps(tower, 5)
    assert maps.grid == (4, 6) and maps.merge == 1
    for position in range(24):  # the tower's patches come in 2 x 2 windows, window by window along each row
        window, inner = divmod(position, 4)
        r, c = 2 * (window // 3) + inner // 2, 2 * (window % 3) + inner % 2
        torch.testing.assert_close(maps.values[:, :, r, c], tower.pattern[:, :, 5, position].double(), atol=0, rtol=0)
    language = qwen_cubes["self"]
    maps = head_image_maps(language, "last")
    assert maps.grid == (2, 3) and maps.merge == 2 and maps.query == 11  # a token: 2 x 2 tower patches
    expected = einops.rearrange(language.pattern[:, :, 11, 3:9], "l h (r c) -> l h r c", r=2).double()
    torch.testing.assert_close(maps.values, expected, atol=0, rtol=0)
    mean, rolled = layer_image_maps(language, 1)  # a text token -> the image, causal: the image is after it
    assert float(mean.values.abs().sum()) == 0 and float(rolled.values.abs().sum()) == 0
    mean, rolled = layer_image_maps(language, "last")
    torch.testing.assert_close(rolled.values, rollout(language)[:, 11, 3:9].reshape(2, 2, 3), atol=0, rtol=0)


def test_refusals(vit_cube, qwen_cubes):
    with pytest.raises(InputError, match="query 'cls' needs a special position"):
        head_image_maps(qwen_cubes["self"], "cls")
    with pytest.raises(InputError, match="query position 17 is not a query row of this cube"):
        head_image_maps(vit_cube, 17)
    with pytest.raises(InputError, match="query 'first' is not 'cls', 'last' or a position"):
        resolve_query(vit_cube, "first")
    with pytest.raises(InputError, match="image 1 is not on this site's key axis"):
        head_image_maps(vit_cube, "cls", image=1)
    text = replace(vit_cube, key_axis=None)
    with pytest.raises(InputError, match="this site's keys are not image patches"):
        layer_image_maps(text, "cls")
    with pytest.raises(InputError, match="rollout multiplies consecutive layers"):
        layer_image_maps(vit_cube.select(layers=[0, 2]), "cls")


def test_processed_pictures_are_the_model_input():
    picture = _picture(32, 48)
    vit = transformers.ViTImageProcessor(size={"height": 32, "width": 48})
    (seen,) = processed_pictures(vit, picture)
    assert np.array_equal(np.asarray(seen), np.asarray(picture))  # same size: normalisation undone exactly
    qwen = transformers.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=32 * 48,
                                              max_pixels=32 * 48)
    (seen,) = processed_pictures(qwen, picture)
    assert np.array_equal(np.asarray(seen), np.asarray(picture))  # flattened merge-window patches put back
    clip = transformers.CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    (seen,) = processed_pictures(clip, picture)
    pixels = clip(images=picture, return_tensors="pt")["pixel_values"][0]
    mean, std = torch.tensor(clip.image_mean)[:, None, None], torch.tensor(clip.image_std)[:, None, None]
    expected = ((pixels * std + mean) * 255).round().clamp(0, 255).permute(1, 2, 0).numpy()
    assert seen.size == (8, 8) and np.abs(np.asarray(seen).astype(float) - expected).max() <= 1


def test_nearest_upsampling_fills_each_patch_block():
    values = torch.arange(6, dtype=torch.float64).reshape(1, 2, 3)
    big = upsampled(values, (20, 30), "nearest")[0]
    assert big.shape == (20, 30)
    for r in range(2):
        for c in range(3):
            assert (big[10 * r:10 * (r + 1), 10 * c:10 * (c + 1)] == values[0, r, c].item()).all()
    with pytest.raises(InputError, match="upsample='cubic' is not one of"):
        upsampled(values, (20, 30), "cubic")


def test_figures_have_a_panel_per_head_and_per_layer(vit_cube, qwen_cubes, tmp_path):
    picture = _picture(16, 16)
    maps = head_image_maps(vit_cube, "cls")
    figure = plot_overlays(maps, picture, panel_px=64)
    texts = [t.get_text() for t in figure.texts]
    assert {f"L{l}" for l in range(3)} | {f"H{h}" for h in range(4)} <= set(texts)
    assert sum(t.count(".") == 1 and t.replace(".", "").isdigit() for t in texts) == 12  # a mass per panel
    shared = plot_overlays(maps, picture, panel_px=64, scale="shared", upsample="nearest")
    assert len(shared.axes) == 2  # the panels and the colorbar
    grouped = plot_overlays(head_image_maps(qwen_cubes["self"], "last"), picture, panel_px=64)
    assert "H1\nKV0" in [t.get_text() for t in grouped.texts]  # 4 heads over 2 KV heads
    layers = plot_layer_overlays(*layer_image_maps(vit_cube, "cls"), picture, panel_px=64)
    assert {"mean", "rollout", "L0", "L2"} <= {t.get_text() for t in layers.texts}
    with pytest.raises(InputError, match="plot_overlays draws per-head maps"):
        plot_overlays(layer_image_maps(vit_cube, "cls")[0], picture)
