"""Vision metrics per head (mean attention distance, spatial entropy, [CLS] and register mass) against a hand
computation, and in the per-head table of a vision site."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import transformers

from llm_heatmap import InputError
from llm_heatmap.analyses.heads.vision_metrics import vision_metrics
from llm_heatmap.models import spec_from_model
from llm_heatmap.probes import AttentionCube
from llm_heatmap.probes.axes import text_axis, vision_axis


def _spec():
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                    image_size=8, patch_size=4)
    return spec_from_model(transformers.ViTModel(config, add_pooling_layer=False))


# [CLS], [REG 0], then patches (0,0), (0,1), (1,0), (1,1) of a 2 x 2 grid
ROWS = [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0],
        [.5, .1, .4, 0, 0, 0],          # patch (0,0): all its patch weight on itself
        [.2, 0, .4, 0, 0, .4],          # (0,1): half on (0,0) and half on (1,1), each 1 patch away
        [0, 0, 0, .5, 0, .5],           # (1,0): (0,1) at sqrt 2, (1,1) at 1
        [0, 0, .25, .25, .25, .25]]     # (1,1): every patch, at sqrt 2, 1, 1, 0


def test_vision_metrics_by_hand():
    pattern = torch.tensor([[ROWS, ROWS]]).double()
    axis = vision_axis(["[CLS]", "[REG 0]"], 2, 2, patch_pixels=16)
    cube = AttentionCube.from_pattern(pattern, _spec(), torch.arange(6), key_axis=axis)
    row = vision_metrics(cube).iloc[1]
    root2 = math.sqrt(2)
    assert (row["layer"], row["head"]) == (0, 1)
    assert row.attention_distance == pytest.approx((0 + 1 + (root2 + 1) / 2 + (root2 + 2) / 4) / 4)
    assert row.attention_distance_px == pytest.approx(16 * row.attention_distance)
    assert row.spatial_entropy == pytest.approx((0 + math.log(2) + math.log(2) + math.log(4)) / 4)
    assert row.cls_mass == pytest.approx((.5 + .2) / 4) and row.register_mass == pytest.approx(.1 / 4)
    assert row.patch_share == pytest.approx((.4 + .8 + 1 + 1) / 4)


def test_unknown_patch_size_gives_nan_pixels_and_text_is_refused():
    pattern = torch.tensor([[ROWS, ROWS]]).double()
    cube = AttentionCube.from_pattern(pattern, _spec(), torch.arange(6), key_axis=vision_axis(["[CLS]", "[REG 0]"], 2, 2))
    assert math.isnan(vision_metrics(cube)["attention_distance_px"].iloc[0])
    with pytest.raises(InputError, match="marks no image patches"):
        vision_metrics(replace(cube, key_axis=text_axis(6)))


def test_a_vision_site_table_has_the_vision_columns():
    """A tiny random ViT captured through capture_sites: its vision table carries the metrics, the pixel distance
    in the config's patch size."""
    from llm_heatmap.analyses.heads.measure import site_metrics
    from llm_heatmap.probes import capture_sites

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=4)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_sites(model) as probe:
        model(pixel_values=pixels)
    cube = probe.cubes()["self"]  # a ViT has one site
    table = site_metrics(cube)
    assert len(table) == 8 and {"entropy", "attention_distance_px", "spatial_entropy", "cls_mass"} <= set(table.columns)
    assert cube.key_axis.patch_pixels == 4
    expected = vision_metrics(cube)
    assert table["attention_distance_px"].tolist() == pytest.approx(expected["attention_distance_px"].tolist())
    assert (table["spatial_entropy"] <= math.log(16) + 1e-9).all() and (table["cls_mass"].between(0, 1)).all()
