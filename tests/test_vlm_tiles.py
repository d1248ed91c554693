"""Idefics3 / SmolVLM's image splitting on the language model's axis: the tiles of one image (each run of image
tokens after a <row_I_col_J> token, then the global view after <global-img>) are one image, its tiles side by
side on the image's grid; the image share and the image maps per image and per tile, against eager
`output_attentions` of a tiny random model fed by its own processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eager_reference import to_eager
from llm_heatmap import InputError
from llm_heatmap.analyses.heads.image_share import image_share
from llm_heatmap.analyses.maps.image_maps import head_image_maps, layer_image_maps
from llm_heatmap.probes import capture_sites
from llm_heatmap.probes.axes import language_axis
from tiny_models import tiny_idefics3

TILES = {0: "r0,c0", 1: "r0,c1", 2: "r0,c2", 3: "r1,c0", 4: "r1,c1", 5: "r1,c2", 6: "global"}


def _picture(height, width, seed):
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def captured():
    model, processor = tiny_idefics3()
    # a wide picture split into 2 x 3 tiles, a square one into 3 x 3, each with its global view
    inputs = processor(text=["look <image> and <image> this"], images=[[_picture(20, 40, 0), _picture(16, 16, 1)]],
                       return_tensors="pt")
    inputs.pop("mm_token_type_ids", None)
    with torch.no_grad(), capture_sites(model) as probe:
        model(**inputs)
    cubes = probe.cubes(inputs["input_ids"], tokenizer=processor.tokenizer)
    with torch.no_grad():
        out = to_eager(model)(**inputs, output_attentions=True)
        tower = model.model.vision_model(pixel_values=inputs["pixel_values"][0], output_attentions=True)
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    return cubes, torch.stack(out.attentions, 1)[0], torch.stack(tower.attentions, 1), tokens


def test_every_site_equals_eager(captured):
    cubes, reference, tower, _ = captured
    torch.testing.assert_close(cubes["text"].pattern, reference, atol=1e-5, rtol=0)
    assert cubes["vision"].batched and len(cubes["vision"]) == 7 + 10
    torch.testing.assert_close(cubes["vision"].pattern, tower, atol=1e-5, rtol=0)


def test_the_tiles_of_one_image_are_one_image_side_by_side(captured):
    cubes, _, _, tokens = captured
    axis = cubes["text"].key_axis
    image = torch.tensor(axis.image)
    assert int((image == 0).sum()) == 7 * 4 and int((image == 1).sum()) == 10 * 4
    assert axis.grids == ((4, 6), (6, 6)), "2 x 3 and 3 x 3 tiles of 2 x 2 tokens"
    names = axis.tile_names()
    assert {tile: name for (picture, tile), name in names.items() if picture == 0} == TILES
    assert names[(1, 8)] == "r2,c2" and names[(1, 9)] == "global"
    # each tile's tokens follow the token that names it, and lie on that tile's cells of the image's grid
    for position in (image >= 0).nonzero().flatten().tolist():
        run_start = position
        while tokens[run_start - 1] == "<image>":
            run_start -= 1
        picture, tile, row, col = axis.image[position], axis.tile[position], axis.row[position], axis.col[position]
        if names[(picture, tile)] == "global":
            assert tokens[run_start - 1] == "<global-img>" and 0 <= row < 2 and 0 <= col < 2
        else:
            assert tokens[run_start - 1] == f"<row_{row // 2 + 1}_col_{col // 2 + 1}>"
            assert names[(picture, tile)] == f"r{row // 2},c{col // 2}"
        assert (row % 2, col % 2) == divmod(position - run_start, 2), "a tile's tokens row by row"


def test_image_share_per_image_and_per_tile_equals_the_eager_weights(captured):
    cubes, reference, _, tokens = captured
    is_image = torch.tensor([token == "<image>" for token in tokens])
    first = int(is_image.nonzero()[0])
    counted = torch.arange(len(tokens)) > first
    counted &= ~is_image
    images = torch.zeros(len(tokens), dtype=torch.long) - 1
    images[is_image] = (torch.arange(int(is_image.sum())) >= 28).long()  # the first 7 runs of 4 tokens: image 0
    table = image_share(cubes["text"], per="image")
    assert table.columns.tolist() == ["layer", "head", "image", "image_share", "text_rows"]
    for picture in (0, 1):
        expected = reference[..., images == picture].sum(-1)[:, :, counted].double().mean(-1).flatten()
        got = torch.tensor(table[table["image"] == picture]["image_share"].values)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    total = image_share(cubes["text"])["image_share"].values
    per_tile = image_share(cubes["text"], per="tile")
    assert len(per_tile) == 2 * 4 * 17 and set(per_tile["tile_name"]) == set(TILES.values()) | {"r2,c0", "r2,c1", "r2,c2"}
    np.testing.assert_allclose(per_tile.groupby(["layer", "head"])["image_share"].sum().values, total, atol=1e-9)
    with pytest.raises(InputError, match="per='pixel' is not one of all, image, tile"):
        image_share(cubes["text"], per="pixel")


def test_image_maps_draw_an_images_tiles_side_by_side_or_one_tile(captured):
    cubes, reference, _, _ = captured
    cube = cubes["text"]
    axis = cube.key_axis
    whole = head_image_maps(cube, "last", image=0)
    assert whole.grid == (4, 6) and not bool(whole.values.isnan().any()), "the six tiles cover the grid"
    # tile (1, 2) is tile 5: its top-left token sits at row 2, column 4 of the image's grid
    position = next(p for p in range(axis.length) if axis.image[p] == 0 and axis.tile[p] == 5)
    torch.testing.assert_close(whole.values[..., 2, 4], reference[:, :, -1, position].double(), atol=1e-6, rtol=0)
    glance = head_image_maps(cube, "last", image=0, tile=6)
    assert glance.grid == (2, 2) and glance.title == "attention per head, tile 6 (global)"
    keys = [p for p in range(axis.length) if axis.image[p] == 0 and axis.tile[p] == 6]
    torch.testing.assert_close(glance.values.flatten(2), reference[:, :, -1, keys].double(), atol=1e-6, rtol=0)
    mean, _ = layer_image_maps(cube, "last", image=1, tile=8)
    assert mean.grid == (2, 2) and mean.title.endswith("tile 8 (r2,c2)")
    with pytest.raises(InputError, match="tile 7 is not a tile of image 0 .*pick one of those"):
        head_image_maps(cube, "last", image=0, tile=7)


def test_language_axis_groups_tiles_only_after_their_tokens():
    image = 9
    tokens = ["a", "<row_1_col_1>", "<image>", "<row_1_col_2>", "<image>", "<global-img>", "<image>", "b",
              "<global-img>", "<image>", "<image>", "<image>", "<image>", "c", "<image>"]
    ids = [image if token == "<image>" else 1 for token in tokens]
    axis = language_axis(ids, image, tokens=tokens)
    assert axis.image == (-1, -1, 0, -1, 0, -1, 0, -1, -1, 1, 1, 1, 1, -1, 2)
    assert axis.tile == (-1, -1, 0, -1, 1, -1, 2, -1, -1, 0, 0, 0, 0, -1, 0)
    assert axis.grids == ((1, 2), (2, 2), (1, 1))
    assert axis.tile_names() == {(0, 0): "r0,c0", (0, 1): "r0,c1", (0, 2): "global", (1, 0): "image", (2, 0): "image"}
    without_tokens = language_axis(ids, image)
    assert without_tokens.grids == ((1, 1),) * 3 + ((2, 2), (1, 1)), "without the tokens every run is an image"
