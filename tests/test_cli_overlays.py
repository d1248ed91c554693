"""`grid --image PATH --overlay QUERY` end to end on tiny random ViT and LLaVA directories: the overlay and
rollout figures beside the grid, drawn from the cube the command saved, and the refusals (no partial files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw

from llm_heatmap.cli import main
from llm_heatmap.probes import AttentionCube
from test_cli_sites import WORDS, word_tokenizer
from tiny_models import write_tiny_llava, write_tiny_vit

VISION = dict(image_size=32, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=32)


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "shapes.png"
    image = Image.new("RGB", (48, 40), (40, 110, 190))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 26, 26), fill=(250, 220, 40))
    draw.rectangle((30, 18, 44, 36), fill=(210, 40, 40))
    image.save(path)
    return path


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vit")
    write_tiny_vit(folder, VISION)
    return folder


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA: CLIP tower over 8 x 8 patches (and [CLS], dropped), Llama with 2 KV heads for 4 heads."""
    folder = tmp_path_factory.mktemp("llava")
    write_tiny_llava(folder, WORDS, word_tokenizer(WORDS + ["<image>"]), VISION, text_layers=2)
    return folder


def run(*argv) -> int:
    return main([*map(str, argv), "--quiet"])


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_vit_overlays_beside_the_grid(vit_dir, picture, tmp_path):
    assert run("grid", "--image", picture, "--model", vit_dir, "--out", tmp_path, "--name", "v", "--overlay", "cls") == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"v_shapes.self.{end}" for end in ("cube.safetensors", "metrics.csv", "overlay.png", "png",
                                                        "rollout.png")]  # the image's name joins a ViT's files
    overlay, rolled = _pixels(tmp_path / "v_shapes.self.overlay.png"), _pixels(tmp_path / "v_shapes.self.rollout.png")
    assert overlay.shape[0] > 2 * 112 and overlay.shape[1] > 4 * 112  # 2 layers x 4 heads of 112-pixel panels
    assert rolled.shape[1] > 2 * 112 and rolled.shape[0] < overlay.shape[0] + 150
    # the picture is visible under the heat: the panels hold the yellow shape's hue and the blue background
    assert (overlay[..., 2] > overlay[..., 0] + 30).any() and (overlay[..., 0] > overlay[..., 2] + 60).any()


def test_llava_text_token_over_the_image_in_the_language_model(llava_dir, picture, tmp_path, capsys):
    assert main(["grid", "a cat on the mat", "--image", str(picture), "--model", str(llava_dir), "--out", str(tmp_path),
                 "--name", "v", "--overlay", "last", "--overlay-upsample", "nearest", "--overlay-scale", "shared"]) == 0
    out = capsys.readouterr().out
    assert "self: overlays of query 68 (mat)" in out and "vision: overlays of query 64 (r7,c7)" in out
    for site in ("self", "vision"):
        assert (tmp_path / f"v.{site}.overlay.png").stat().st_size > 0
        assert (tmp_path / f"v.{site}.rollout.png").stat().st_size > 0
    language = AttentionCube.load(tmp_path / "v.self.cube.safetensors")
    assert language.key_axis.patch_grid == (8, 8) and int(language.key_axis.is_image.sum()) == 64


def test_cls_draws_only_the_sites_with_a_cls(llava_dir, picture, tmp_path):
    assert run("grid", "a cat", "--image", picture, "--model", llava_dir, "--out", tmp_path, "--name", "v",
               "--overlay", "cls") == 0
    assert (tmp_path / "v.vision.overlay.png").exists() and not (tmp_path / "v.self.overlay.png").exists()


def test_layers_and_heads_pick_the_overlay_panels(vit_dir, picture, tmp_path):
    assert run("grid", "--image", picture, "--model", vit_dir, "--out", tmp_path, "--name", "all", "--overlay", "3") == 0
    assert run("grid", "--image", picture, "--model", vit_dir, "--out", tmp_path, "--name", "two", "--overlay", "3",
               "--heads", "1,3", "--layers", "1") == 0
    every, picked = _pixels(tmp_path / "all_shapes.self.overlay.png"), _pixels(tmp_path / "two_shapes.self.overlay.png")
    # one panel row fewer (the title may take one more line above a narrower grid), no wider
    assert every.shape[0] - picked.shape[0] >= 112 + 6 - 20 and picked.shape[1] <= every.shape[1]


@pytest.mark.parametrize("argv, message", [
    (["--site", "self", "--overlay", "cls"], "--overlay cls on site self: query 'cls' needs a special position"),
    (["--overlay", "70"], "--overlay 70 on site self: query position 70 is not a query row of this cube (it has 69 rows, positions 0-68); give a position in that range (or draw another site alone with --site)."),
])
def test_refusals_after_the_capture_leave_no_files(llava_dir, picture, tmp_path, capsys, argv, message):
    assert run("grid", "a cat on the mat", "--image", picture, "--model", llava_dir, "--out", tmp_path, *argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_refusals_before_and_after_loading(vit_dir, picture, tmp_path, capsys):
    assert run("grid", "--model", vit_dir, "--out", tmp_path, "--overlay", "cls") == 2
    assert "--overlay draws attention over an image, but no --image was given" in capsys.readouterr().err
    assert run("grid", "--image", picture, "--model", vit_dir, "--out", tmp_path, "--overlay", "first") == 2
    assert "--overlay first is not cls, last or a position; give one of those" in capsys.readouterr().err
    assert run("grid", "--image", picture, "--model", vit_dir, "--out", tmp_path, "--overlay", "65") == 2
    assert "query position 65 is not a query row of this cube (it has 65 rows" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_site_without_image_patches_is_refused(tmp_path_factory, picture, tmp_path, capsys):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    text = dict(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.CLIPModel(transformers.CLIPConfig(vision_config=VISION, text_config=text)).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    word_tokenizer(WORDS, eos="</s>").save_pretrained(folder)
    assert run("grid", "a cat", "--image", picture, "--model", folder, "--out", tmp_path, "--site", "text",
               "--overlay", "last") == 2
    assert "--overlay needs a site whose keys are image patches, and text of" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
