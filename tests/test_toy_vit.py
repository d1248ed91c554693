"""The shipped toy ViT (examples/toy_models/shape-vit): it says where the square is, and its [CLS] attention, as
the project captures it, lands on the square's patches."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TOY = Path(__file__).parents[1] / "examples" / "toy_models"
sys.path.insert(0, str(TOY))
from train_shape_vit import GRID, pictures, square_patches  # noqa: E402


@pytest.fixture(scope="module")
def toy():
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(TOY / "shape-vit").eval()


@pytest.fixture(scope="module")
def batch():
    return pictures(torch.Generator().manual_seed(2024), 48)  # pictures the model never saw (training used seed 0)


def test_it_solves_the_task(toy, batch):
    pixels, labels, _ = batch
    with torch.no_grad():
        predicted = toy(pixel_values=(pixels - 0.5) / 0.5).logits.argmax(-1)
    assert (predicted == labels).float().mean() >= 0.95


def test_cls_attention_lands_on_the_squares_patches(toy, batch):
    """Layer 0's [CLS] row, averaged over heads, puts most of its patch weight on the patches the square overlaps
    (which cover 1 to 4 of the 16 patches), and its largest weight on one of them; the capture equals eager."""
    from llm_heatmap.probes import capture_sites

    pixels, _, corners = batch
    eager = type(toy).from_pretrained(TOY / "shape-vit", attn_implementation="eager").eval()
    shares, on_square, areas = [], [], []
    for picture, corner in zip(pixels, corners.tolist()):
        inputs = (picture[None] - 0.5) / 0.5
        with torch.no_grad(), capture_sites(toy) as probe:
            toy(pixel_values=inputs)
            reference = eager(pixel_values=inputs, output_attentions=True).attentions
        cube = probe.cubes()["self"]
        torch.testing.assert_close(cube.pattern, torch.stack(reference, 1)[0], atol=1e-5, rtol=0)
        assert cube.key_axis.special == {0: "[CLS]"} and cube.key_axis.patch_grid == (GRID, GRID)
        cls_row = cube.pattern[0, :, 0, 1:].mean(0)
        square = square_patches(tuple(corner))
        shares.append(float(cls_row[square].sum() / cls_row.sum()))
        on_square.append(bool(square[cls_row.argmax()]))
        areas.append(float(square.float().mean()))
    assert sum(shares) / len(shares) > 0.9 > 4 * sum(areas) / len(areas)
    assert sum(on_square) == len(on_square)


def test_the_cli_draws_its_grid_from_the_shipped_example(tmp_path, capsys):
    from llm_heatmap.cli import main

    code = main(["grid", "--model", str(TOY / "shape-vit"), "--image", str(TOY / "shape-vit" / "example.png"),
                 "--out", str(tmp_path), "--name", "toy"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == \
        ["toy_example.self.cube.safetensors", "toy_example.self.metrics.csv", "toy_example.self.png"]
    from llm_heatmap.probes import AttentionCube
    from llm_heatmap.viz.labels import prompt_text

    cube = AttentionCube.load(tmp_path / "toy_example.self.cube.safetensors")
    assert prompt_text(cube) == "[CLS] + 4 x 4 patches"  # its title, instead of "[CLS] r0,c0 r0,c1 ..."
