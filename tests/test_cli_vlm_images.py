"""Several --image in one forward pass of a VLM from the CLI (tiny random LLaVA and Idefics3 directories saved with
their processors), each image's tokens named on the language model's axis and checked against eager
`output_attentions` of the processor's own inputs; the overlays drawn per image and per tile; a vision model
alone and a dual encoder still run once per image; Idefics3's split pictures turned back from its `pixel_values`;
and a Qwen2-VL directory without torchvision refused in one sentence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from eager_reference import to_eager
from llm_heatmap.cli import main
from llm_heatmap.models.processed_images import pictures_from_pixels, pictures_per_image, side_by_side
from llm_heatmap.probes import AttentionCube
from test_cli_sites import WORDS, word_tokenizer
from tiny_models import tiny_idefics3, tiny_qwen2_vl, write_tiny_llava, write_tiny_vit

VISION = dict(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=32)
PROMPT = "a cat on the mat"


def line_tokenizer(words: list[str]) -> transformers.PreTrainedTokenizerFast:
    """Words split at spaces only, so that a line break is a token of its own (as in real tokenizers): the
    image tokens put before the prompt, one line each, stay apart."""
    vocab = {word: i for i, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="removed"),
                                                       pre_tokenizers.Split("\n", behavior="isolated")])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def run(*argv) -> int:
    return main([*map(str, argv), "--quiet"])


def _save(folder: Path, colour, size=(24, 20)) -> Path:
    """A picture mostly of one colour, with a seeded random square, so each image is told apart by its hue."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
    array[4:12, 4:12] = (np.random.default_rng(sum(colour)).random((8, 8, 3)) * 255).astype("uint8")
    path = folder / f"{'red' if colour[0] > colour[2] else 'blue'}.png"
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("images")
    return _save(folder, (220, 40, 30)), _save(folder, (30, 60, 220))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA (CLIP tower over 4 x 4 patches, Llama) whose tokenizer keeps line breaks."""
    folder = tmp_path_factory.mktemp("llava")
    words = ["<pad>", "<s>", "</s>", "<unk>", "\n", "a", "cat", "on", "the", "mat"]
    write_tiny_llava(folder, words, line_tokenizer(words + ["<image>"]), VISION, text_layers=2)
    return folder


@pytest.fixture(scope="module")
def idefics3_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("idefics3")
    model, processor = tiny_idefics3()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _eager_llava(folder: Path, text: str, images: list):
    processor = transformers.AutoProcessor.from_pretrained(folder)
    inputs = processor(text=text, images=images, return_tensors="pt")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
        tower = model.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True)
    return inputs, torch.stack(out.attentions, 1)[0], torch.stack(tower.attentions, 1)


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_two_images_in_one_llava_pass_equal_eager(llava_dir, pictures, tmp_path):
    red, blue = pictures
    assert run("grid", PROMPT, "--image", red, "--image", blue, "--model", llava_dir, "--out", tmp_path,
               "--name", "v", "--html") == 0
    # one pass: one set of files per site; the tower ran the two images as a batch, a grid per image
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "v.html", "v.self.cube.safetensors", "v.self.metrics.csv", "v.self.png", "v.vision.cube.safetensors",
        "v.vision.image0.png", "v.vision.image1.png", "v.vision.metrics.csv"]
    table = pd.read_csv(tmp_path / "v.vision.metrics.csv")
    assert table.columns[0] == "sequence" and table.groupby("sequence").size().to_dict() == {0: 8, 1: 8}
    language = AttentionCube.load(tmp_path / "v.self.cube.safetensors")
    vision = AttentionCube.load(tmp_path / "v.vision.cube.safetensors")
    images = [Image.open(path).convert("RGB") for path in pictures]
    # one image token (16 patches once expanded) per image, a line each, before the prompt
    inputs, reference, tower = _eager_llava(llava_dir, "<image>\n<image>\n" + PROMPT, images)
    assert language.token_ids.tolist() == inputs["input_ids"][0].tolist()
    torch.testing.assert_close(language.pattern, reference, atol=1e-5, rtol=0)
    axis = language.key_axis
    assert axis.grids == ((4, 4), (4, 4))
    assert axis.image == (0,) * 16 + (-1,) + (1,) * 16 + (-1,) * 6
    # the tower ran the two images as a batch: one sequence per image, each equal to eager
    assert vision.batched and len(vision) == 2
    torch.testing.assert_close(vision.pattern, tower, atol=1e-5, rtol=0)
    page = (tmp_path / "v.html").read_text()
    assert 'alt="input image 0"' in page and 'alt="input image 1"' in page


def test_the_prompts_own_image_tokens_place_the_images(llava_dir, pictures, tmp_path):
    red, blue = pictures
    prompt = "a cat <image> on the mat <image>"
    assert run("grid", prompt, "--image", red, "--image", blue, "--model", llava_dir, "--out", tmp_path,
               "--name", "v") == 0
    language = AttentionCube.load(tmp_path / "v.self.cube.safetensors")
    _, reference, _ = _eager_llava(llava_dir, prompt, [Image.open(path).convert("RGB") for path in pictures])
    torch.testing.assert_close(language.pattern, reference, atol=1e-5, rtol=0)
    assert language.tokens[:2] == ["a", "cat"] and language.key_axis.image[2:18] == (0,) * 16
    # a prompt with one of its two images' tokens gets the other put first
    assert run("grid", "a cat <image>", "--image", red, "--image", blue, "--model", llava_dir, "--out", tmp_path,
               "--name", "w") == 0
    tokens = AttentionCube.load(tmp_path / "w.self.cube.safetensors").tokens
    assert tokens[16:19] == ["\n", "a", "cat"] and len(tokens) == 16 + 1 + 2 + 16


def test_overlays_say_which_image_they_are_drawn_over(llava_dir, pictures, tmp_path, capsys):
    red, blue = pictures
    assert main([str(a) for a in ("grid", PROMPT, "--image", red, "--image", blue, "--model", llava_dir, "--out",
                                  tmp_path, "--name", "v", "--overlay", "last", "--overlay-upsample", "nearest")]) == 0
    out = capsys.readouterr().out
    for site in ("self", "vision"):
        for image, name in enumerate(("red.png", "blue.png")):
            assert f"{site}: overlays of query" in out and f", image {image} ({name}); wrote" in out
            for kind in ("overlay", "rollout"):
                assert (tmp_path / f"v.{site}.image{image}.{kind}.png").stat().st_size > 0
    assert not (tmp_path / "v.self.overlay.png").exists()
    # each figure is drawn over its own picture: under the same heat map, the red image's figure is redder
    for site in ("self", "vision"):
        first, second = (_rgb(tmp_path / f"v.{site}.image{i}.overlay.png") for i in (0, 1))
        redness = [(figure[..., 0] - figure[..., 2]).mean() for figure in (first, second)]
        assert redness[0] > redness[1] + 20


def test_metrics_of_two_images_in_one_pass(llava_dir, pictures, tmp_path):
    red, blue = pictures
    assert run("metrics", PROMPT, "--image", red, "--image", blue, "--model", llava_dir, "--out", tmp_path,
               "--name", "m", "--site", "self") == 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.self.metrics.csv"]
    table = pd.read_csv(tmp_path / "m.self.metrics.csv")
    assert len(table) == 2 * 4 and table["image_share"].between(0, 1).all()


def test_refusals_of_several_images_leave_no_files(tmp_path_factory, pictures, tmp_path, capsys):
    red, blue = pictures
    folder = tmp_path_factory.mktemp("llava-words")  # its tokenizer drops line breaks: tokens put first run together
    write_tiny_llava(folder, WORDS, word_tokenizer(WORDS + ["<image>"]), VISION, text_layers=2)
    assert run("grid", PROMPT, "--image", red, "--image", blue, "--model", folder, "--out", tmp_path) == 2
    assert ("2 images were given, but the image tokens on site self's axis form 1 runs, so its images cannot be told "
            'apart; put text between the images\' tokens in the prompt (e.g. "<image> a cat <image> a dog").'
            in capsys.readouterr().err)
    assert run("grid", "<image> a <image> cat <image>", "--image", red, "--image", blue, "--model", folder,
               "--out", tmp_path) == 2
    assert ("the prompt holds 3 image tokens (<image>) but 2 images were given; give one image per image token."
            in capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_a_vision_model_and_a_dual_encoder_run_once_per_image(tmp_path_factory, pictures, tmp_path):
    red, blue = pictures
    vit = tmp_path_factory.mktemp("vit")
    write_tiny_vit(vit, VISION)
    assert run("grid", "--image", red, "--image", blue, "--model", vit, "--out", tmp_path, "--name", "v",
               "--site", "self", "--overlay", "cls") == 0
    processor = transformers.AutoImageProcessor.from_pretrained(vit)
    model = transformers.ViTModel.from_pretrained(vit, attn_implementation="eager").eval()
    for path in pictures:
        cube = AttentionCube.load(tmp_path / f"v_{path.stem}.self.cube.safetensors")
        pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            reference = torch.stack(model(pixel_values=pixels, output_attentions=True).attentions, 1)[0]
        torch.testing.assert_close(cube.pattern, reference, atol=1e-5, rtol=0)
        assert (tmp_path / f"v_{path.stem}.self.overlay.png").exists()


def _pixels_again(picture: Image.Image, image_processor) -> torch.Tensor:
    """A picture's pixels normalised as the processor normalises them: the inverse of `pictures_from_pixels`."""
    array = torch.tensor(np.asarray(picture), dtype=torch.float64).permute(2, 0, 1) * image_processor.rescale_factor
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (image_processor.image_mean,
                                                                                  image_processor.image_std))
    return (array - mean) / std


def test_idefics3_pixel_values_back_into_each_images_tiles_and_global_view():
    _, processor = tiny_idefics3()
    rng = np.random.default_rng(3)
    wide, square = (Image.fromarray((rng.random(shape) * 255).astype("uint8")) for shape in ((20, 40, 3), (16, 16, 3)))
    out = processor.image_processor(images=[wide, square], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 17, 3, 16, 16)
    flat = pictures_from_pixels(out["pixel_values"], processor.image_processor)
    assert len(flat) == 17 and all(p.size == (16, 16) for p in flat)
    for picture, pixels in zip(flat, out["pixel_values"][0]):  # the round trip, to the 8-bit rounding
        torch.testing.assert_close(_pixels_again(picture, processor.image_processor), pixels.double(),
                                   atol=1 / 255 + 1e-6, rtol=0)
    per_image = pictures_per_image(processor, [wide, square])
    assert [len(tiles) for tiles in per_image] == [2 * 3 + 1, 3 * 3 + 1]
    assert [np.asarray(p).tolist() for p in per_image[1]] == [np.asarray(p).tolist() for p in flat[7:]]
    joined = np.asarray(side_by_side(per_image[0][:-1], [(r, c) for r in range(2) for c in range(3)]))
    assert joined.shape == (32, 48, 3)
    assert (joined[16:32, 32:48] == np.asarray(per_image[0][5])).all(), "tile (1, 2) at its place"
    # two texts, the second with fewer pictures: the padding pictures are no pictures
    batch = processor.image_processor(images=[[wide], [square, square]], return_tensors="pt")
    kept = pictures_from_pixels(batch["pixel_values"], processor.image_processor, None, batch["pixel_attention_mask"])
    assert batch["pixel_values"].shape[:2] == (2, 20) and len(kept) == 7 + 20


def test_idefics3_grid_and_overlays_per_tile(idefics3_dir, tmp_path, capsys):
    rng = np.random.default_rng(4)
    path = tmp_path / "wide.png"
    Image.fromarray((rng.random((20, 40, 3)) * 255).astype("uint8")).save(path)
    out_dir = tmp_path / "out"
    assert main([str(a) for a in ("grid", "look at this", "--image", path, "--model", idefics3_dir, "--out", out_dir,
                                  "--name", "s", "--overlay", "last")]) == 0
    summary = capsys.readouterr().out
    text = AttentionCube.load(out_dir / "s.text.cube.safetensors")
    processor = transformers.AutoProcessor.from_pretrained(idefics3_dir)
    inputs = processor(text="<image>\nlook at this", images=Image.open(path).convert("RGB"), return_tensors="pt")
    model = transformers.Idefics3ForConditionalGeneration.from_pretrained(idefics3_dir).eval()
    with torch.no_grad():
        reference = torch.stack(to_eager(model)(**inputs, output_attentions=True).attentions, 1)[0]
    torch.testing.assert_close(text.pattern, reference, atol=1e-5, rtol=0)
    assert text.key_axis.grids == ((4, 6),)
    names = {p.name for p in out_dir.iterdir() if "overlay" in p.name or "rollout" in p.name}
    expected = {f"s.text.{part}{kind}.png" for part in ("", "global.") for kind in ("overlay", "rollout")}
    expected |= {f"s.vision.tile{t}.{kind}.png" for t in range(7) for kind in ("overlay", "rollout")}
    assert names == expected
    assert "text: overlays of query" in summary and "its tiles side by side; wrote" in summary
    assert "its global view; wrote" in summary  # the second figure of the language model says what it is drawn over
    assert "vision: overlays of query" in summary and "tile 6 (global); wrote" in summary


@pytest.mark.skipif(transformers.utils.is_torchvision_available(), reason="the refusal is for a missing torchvision")
def test_qwen2_vl_without_torchvision_is_refused_in_one_sentence(tmp_path, pictures, capsys):
    """transformers builds Qwen2VLProcessor with its video processor, which needs torchvision, even when its image
    processor is the PIL one: the CLI cannot put the image tokens into the prompt and says why."""
    image_processor = transformers.Qwen2VLImageProcessorPil(patch_size=2, merge_size=2, temporal_patch_size=2,
                                                            min_pixels=64, max_pixels=1024)
    tokenizer = word_tokenizer(WORDS + ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    with pytest.raises(AttributeError, match="VIDEO_PROCESSOR_MAPPING"):  # the finding: no processor without it
        transformers.Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    folder = tmp_path / "qwen2-vl"
    tiny_qwen2_vl().save_pretrained(folder)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    for command in (["grid", "--overlay", "last"], ["metrics"]):
        assert main([command[0], PROMPT, "--image", str(pictures[0]), "--model", str(folder), "--out", str(out),
                     *command[1:]]) == 2
        assert capsys.readouterr().err.strip().endswith(
            "Qwen2VLModel's processor, which puts its image tokens into the text, cannot be loaded without torchvision "
            "(transformers builds it with a video processor that needs torchvision), and torchvision is not "
            "installed; install the torchvision build that matches your torch and run again.")
    assert not out.exists() or list(out.iterdir()) == []
