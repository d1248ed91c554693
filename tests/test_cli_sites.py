"""The CLI over attention sites: --image for a ViT and a CLIP directory (tiny random models saved with their
processor), source and --target for the trained digit-reverser BART, --site, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

from llm_heatmap.cli import main
from llm_heatmap.probes import AttentionCube
from tiny_models import write_tiny_llava, write_tiny_vit

REVERSER = Path(__file__).resolve().parents[1] / "examples" / "toy_models" / "digit-reverser"
VISION = dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=32)
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "a", "cat", "on", "the", "mat"]


def word_tokenizer(words, *, eos: str | None = None) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (digits split one by one), ending each text with `eos` if given."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>" if "<unk>" in words else words[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                      pre_tokenizers.Split(Regex(r"\d"), behavior="isolated")])
    if eos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, words.index(eos))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "cat.png"
    Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vit")
    write_tiny_vit(folder, VISION)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    text = dict(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.CLIPModel(transformers.CLIPConfig(vision_config=VISION, text_config=text)).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}).save_pretrained(folder)
    word_tokenizer(WORDS, eos="</s>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA (CLIP vision tower, Llama language model) with its processor: 4 image tokens per image."""
    folder = tmp_path_factory.mktemp("llava")
    write_tiny_llava(folder, WORDS, word_tokenizer(WORDS + ["<image>"]), VISION, text_layers=3)
    return folder


@pytest.fixture(scope="module")
def reverser_dir(tmp_path_factory) -> Path:
    """A copy of the shipped digit reverser, with the tokenizer saved beside it (source: digits then </s>)."""
    folder = tmp_path_factory.mktemp("reverser")
    for file in REVERSER.iterdir():
        shutil.copy(file, folder)
    return folder


def run(*argv) -> int:
    return main([*map(str, argv), "--quiet"])


def test_grid_of_a_vit_directory_from_an_image(vit_dir, picture, tmp_path, capsys):
    assert run("grid", "--image", picture, "--model", vit_dir, "--out", tmp_path) == 0
    cube = AttentionCube.load(tmp_path / f"{vit_dir.name}_cat.self.cube.safetensors")
    assert cube.pattern.shape == (2, 4, 5, 5)
    assert cube.tokens == ["[CLS]", "r0,c0", "r0,c1", "r1,c0", "r1,c1"]
    assert (tmp_path / f"{vit_dir.name}_cat.self.png").stat().st_size > 0
    assert len(pd.read_csv(tmp_path / f"{vit_dir.name}_cat.self.metrics.csv")) == 8


def test_vit_capture_equals_eager_on_the_processed_image(vit_dir, picture, tmp_path):
    assert run("grid", "--image", picture, "--model", vit_dir, "--out", tmp_path) == 0
    cube = AttentionCube.load(tmp_path / f"{vit_dir.name}_cat.self.cube.safetensors")
    model = transformers.ViTModel.from_pretrained(vit_dir, attn_implementation="eager").eval()
    pixels = transformers.ViTImageProcessor.from_pretrained(vit_dir)(images=Image.open(picture).convert("RGB"),
                                                                     return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = torch.stack(model(pixel_values=pixels, output_attentions=True).attentions, 1)[0]
    torch.testing.assert_close(cube.pattern, reference, atol=1e-5, rtol=0)


def test_grid_of_a_clip_directory_writes_both_towers(clip_dir, picture, tmp_path):
    assert run("grid", "a cat on the mat", "--image", picture, "--model", clip_dir, "--out", tmp_path) == 0
    stem = f"{clip_dir.name}_a-cat-on-the-mat"
    vision = AttentionCube.load(tmp_path / f"{stem}.vision.cube.safetensors")
    text = AttentionCube.load(tmp_path / f"{stem}.text.cube.safetensors")
    assert vision.pattern.shape == (2, 4, 5, 5) and vision.tokens[0] == "[CLS]"
    assert text.pattern.shape == (3, 2, 6, 6) and text.tokens[:5] == ["a", "cat", "on", "the", "mat"]


def test_grid_of_a_vlm_directory_equals_eager(llava_dir, picture, tmp_path):
    assert run("grid", "a cat on the mat", "--image", picture, "--model", llava_dir, "--out", tmp_path, "--name", "v") == 0
    language = AttentionCube.load(tmp_path / "v.self.cube.safetensors")
    vision = AttentionCube.load(tmp_path / "v.vision.cube.safetensors")
    # the processor's image token put first (one per patch), then the prompt's words
    assert language.tokens[:4] == ["<image>"] * 4 and language.tokens[-5:] == ["a", "cat", "on", "the", "mat"]
    processor = transformers.AutoProcessor.from_pretrained(llava_dir)
    inputs = processor(text="<image>\na cat on the mat", images=Image.open(picture).convert("RGB"), return_tensors="pt")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
        tower = model.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True)
    torch.testing.assert_close(language.pattern, torch.stack(out.attentions, 1)[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(vision.pattern, torch.stack(tower.attentions, 1)[0], atol=1e-5, rtol=0)


def test_site_chooses_one_site(clip_dir, picture, tmp_path):
    assert run("grid", "a cat", "--image", picture, "--model", clip_dir, "--out", tmp_path, "--site", "vision",
               "--name", "one") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.vision.cube.safetensors", "one.vision.metrics.csv",
                                                          "one.vision.png"]


def test_reverser_source_and_target_give_an_antidiagonal_cross_grid(reverser_dir, tmp_path):
    assert run("grid", "12345", "--target", "54321", "--model", reverser_dir, "--out", tmp_path, "--name", "rev",
               "--html") == 0
    cross = AttentionCube.load(tmp_path / "rev.cross.cube.safetensors")
    assert cross.pattern.shape == (2, 2, 6, 6)  # <s> 5 4 3 2 1 over 1 2 3 4 5 </s>
    assert cross.query_tokens == ["<s>", "5", "4", "3", "2", "1"] and cross.tokens == ["1", "2", "3", "4", "5", "</s>"]
    table = pd.read_csv(tmp_path / "rev.cross.metrics.csv")
    assert {"alignment", "coverage", "source_entropy"} <= set(table.columns)
    assert table["alignment"].min() < -0.5  # the reverser's heads read the source backwards
    for site in ("encoder", "decoder"):
        assert (tmp_path / f"rev.{site}.png").exists()
    page = (tmp_path / "rev.html").read_text()  # one page, a site switch
    assert page.count("<iframe data-site=") == 3 and not list(tmp_path.glob("rev.*.html"))
    assert run("render", tmp_path / "rev.cross.cube.safetensors", "--out", tmp_path, "--name", "again") == 0
    assert (tmp_path / "again.png").stat().st_size > 0  # a site's cube file draws without the model


def test_reverser_without_target_decodes_what_it_generates(reverser_dir, tmp_path):
    assert run("grid", "3141", "--model", reverser_dir, "--out", tmp_path, "--name", "gen", "--site", "cross") == 0
    cross = AttentionCube.load(tmp_path / "gen.cross.cube.safetensors")
    assert cross.query_tokens[:5] == ["<s>", "1", "4", "1", "3"]


def test_qk_map_of_the_cross_site_reads_target_queries_and_source_keys(reverser_dir, tmp_path, capsys):
    """qk-map --site cross: the queries are the decoder's (labelled with the target's tokens), the keys the
    encoder's (the source's), as a capture of the sites gives them; a model with several sites needs --site."""
    from llm_heatmap.analyses.maps.qk_maps import qk_map
    from llm_heatmap.models import load_model, site_specs
    from llm_heatmap.probes import capture_sites

    assert run("qk-map", "31415", "--target", "51413", "--site", "cross", "--layer", "1", "--model", reverser_dir,
               "--out", tmp_path, "--name", "qk") == 0
    assert (tmp_path / "qk.png").exists()
    model, tokenizer, _ = load_model(reverser_dir)
    source, target = tokenizer("31415", return_tensors="pt").input_ids, tokenizer("51413", return_tensors="pt").input_ids
    decoder_ids = model.prepare_decoder_input_ids_from_labels(labels=target)
    assert set(site_specs(model)) == {"encoder", "decoder", "cross"}
    with torch.no_grad(), capture_sites(model, sites=["cross"], layers=[1], queries_and_keys=True) as probe:
        model(input_ids=source, decoder_input_ids=decoder_ids)
    cube = probe.cubes(source, decoder_input_ids=decoder_ids, tokenizer=tokenizer)["cross"]
    picture = qk_map(cube, 1, head=0)
    queries, keys = ~picture.is_key, picture.is_key
    assert picture.tokens[: int(queries.sum())] == cube.query_tokens  # the target's tokens, not the source's
    assert [picture.tokens[i] for i in keys.nonzero().flatten()] == cube.tokens
    assert cube.queries.shape[-2] == decoder_ids.shape[-1] and cube.keys.shape[-2] == source.shape[-1]
    capsys.readouterr()
    assert run("qk-map", "31415", "--layer", "1", "--model", reverser_dir, "--out", tmp_path, "--name", "none") == 2
    assert "has several attention sites (encoder, decoder, cross) and qk-map reads one; pass --site" in \
        capsys.readouterr().err
    assert not (tmp_path / "none.png").exists()


def test_compare_of_one_site_gives_the_difference_of_that_sites_cubes(reverser_dir, tmp_path, capsys):
    """compare A B --site cross --target T: the difference cube is B's cross cube minus A's (the same target), the
    deltas are those of the site's metrics; a model with several sites needs --site, and --sets does not take it."""
    from llm_heatmap.analyses.heads.measure import site_metrics
    from llm_heatmap.models import load_model, site_specs
    from llm_heatmap.models.inputs import site_inputs
    from llm_heatmap.probes import capture_sites

    assert run("compare", "31415", "92653", "--target", "51413", "--site", "cross", "--model", reverser_dir,
               "--out", tmp_path, "--name", "c") == 0
    difference = AttentionCube.load(tmp_path / "c.diff.cube.safetensors")
    deltas = pd.read_csv(tmp_path / "c.deltas.csv")
    model, tokenizer, _ = load_model(reverser_dir)
    specs = site_specs(model)
    cubes = []
    for source in ("31415", "92653"):
        inputs = site_inputs(model, tokenizer, None, specs, prompt=source, image=None, target="51413")
        with torch.no_grad(), capture_sites(model, sites=["cross"]) as probe:
            model(**inputs)
        cubes.append(probe.cubes(inputs["input_ids"], decoder_input_ids=inputs["decoder_input_ids"],
                                 tokenizer=tokenizer)["cross"])
    assert difference.spec.site == "cross" and difference.query_tokens == cubes[0].query_tokens
    torch.testing.assert_close(difference.pattern, cubes[1].pattern - cubes[0].pattern, atol=1e-6, rtol=0)
    alignment = deltas[deltas["metric"] == "alignment"].sort_values(["layer", "head"])["delta"].to_numpy()
    a, b = (site_metrics(cube).sort_values(["layer", "head"])["alignment"].to_numpy() for cube in cubes)
    np.testing.assert_allclose(alignment, b - a, atol=1e-6)
    capsys.readouterr()
    assert run("compare", "31415", "92653", "--model", reverser_dir, "--out", tmp_path, "--name", "none") == 2
    assert "has several attention sites (encoder, decoder, cross) and compare reads one" in capsys.readouterr().err
    assert not list(tmp_path.glob("none*"))


def test_metrics_per_site(reverser_dir, tmp_path):
    assert run("metrics", "12345", "--target", "54321", "--model", reverser_dir, "--out", tmp_path, "--name", "m") == 0
    assert {p.name for p in tmp_path.iterdir()} == {"m.encoder.metrics.csv", "m.decoder.metrics.csv",
                                                    "m.cross.metrics.csv"}


def test_vlm_metrics_carry_the_image_share_and_the_vision_metrics(llava_dir, picture, tmp_path):
    import pandas as pd

    assert run("metrics", "a cat on the mat", "--image", picture, "--model", llava_dir, "--out", tmp_path,
               "--name", "m") == 0
    language, vision = pd.read_csv(tmp_path / "m.self.metrics.csv"), pd.read_csv(tmp_path / "m.vision.metrics.csv")
    assert language["image_share"].between(0, 1).all() and (language["text_rows"] > 0).all()
    assert {"attention_distance_px", "spatial_entropy", "cls_mass"} <= set(vision.columns)
    assert vision["attention_distance_px"].notna().all()


@pytest.mark.parametrize("argv, message", [
    (["grid", "x", "--site", "crosss"], "--site 'crosss' is not an attention site"),
    (["grid", "--image", "missing.png"], "--image missing.png does not exist"),
    (["grid", "x", "--target", " "], "--target is empty"),
    (["grid", "x", "--site", "cross", "--chat"], "--stream, --qk and --chat work on the one site of a text model"),
    (["metrics", "x", "--target", "y", "--out", "t.csv"], "--out t.csv names one table, but each site gets its own"),
])
def test_refusals_before_loading(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--model", "no-such-model-dir"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command, written", [("metrics", "m.cross.metrics.csv"), ("grid", "m.cross.png")])
def test_one_named_site_claims_its_files_before_the_model_loads(command, written, tmp_path, capsys):
    """With --site the files are known before loading: one that exists is refused first (the model named here
    does not even exist), and nothing is written or removed."""
    (tmp_path / written).write_text("an earlier run's file")
    argv = [command, "12345", "--target", "54321", "--site", "cross", "--model", "no-such-model-dir", "--out", tmp_path,
            "--name", "m"]
    assert main([str(a) for a in argv]) == 2
    assert f"{tmp_path / written} already exists" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {written: "an earlier run's file"}


def test_unreadable_image_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    assert main(["grid", "--image", str(bad), "--model", "no-such-model-dir"]) == 2
    assert f"--image {bad} cannot be read as an image" in capsys.readouterr().err


def test_refusals_after_loading(vit_dir, reverser_dir, picture, tmp_path, capsys):
    assert run("grid", "12", "--image", picture, "--model", reverser_dir, "--out", tmp_path) == 2
    assert "--image was given, but BartForConditionalGeneration reads no images" in capsys.readouterr().err
    assert run("grid", "12", "--site", "vision", "--model", reverser_dir, "--out", tmp_path) == 2
    assert "its sites are encoder, decoder, cross" in capsys.readouterr().err
    assert run("grid", "a cat", "--image", picture, "--model", vit_dir, "--out", tmp_path) == 2
    assert "reads only images, but PROMPT was given" in capsys.readouterr().err
    no_processor = tmp_path / "bare-vit"
    shutil.copytree(vit_dir, no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    assert run("grid", "--image", picture, "--model", no_processor, "--out", tmp_path) == 2
    assert "has no image processor saved with it" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_batch_per_site_with_images_named_in_the_prompt_file(clip_dir, reverser_dir, picture, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(picture, tmp_path / "cat.png")
    prompts.write_text('{"prompt": "a cat", "image": "cat.png"}\n{"prompt": "the mat", "image": "cat.png"}\n')
    assert run("batch", prompts, "--model", clip_dir, "--out", tmp_path / "clip") == 0
    table = pd.read_csv(tmp_path / "clip" / "heads.csv")
    assert table.groupby(["prompt_id", "site"]).size().to_dict() == {(0, "text"): 6, (0, "vision"): 8,
                                                                     (1, "text"): 6, (1, "vision"): 8}
    digits = tmp_path / "digits.txt"
    digits.write_text("12345\n987\n")
    assert run("batch", digits, "--model", reverser_dir, "--out", tmp_path / "rev", "--site", "cross") == 0
    table = pd.read_csv(tmp_path / "rev" / "heads.csv")
    assert set(table["site"]) == {"cross"} and len(table) == 8 and table["alignment"].notna().all()
    assert run("batch", prompts, "--model", reverser_dir, "--out", tmp_path / "bad") == 2
    assert 'names an "image", but' in capsys.readouterr().err
    prompts.write_text('{"prompt": "a cat", "image": "dog.png"}\n')
    assert run("batch", prompts, "--model", clip_dir, "--out", tmp_path / "missing") == 2
    assert "dog.png, which does not exist" in capsys.readouterr().err


def test_models_prints_the_spec_of_every_site(capsys):
    assert main(["models", str(REVERSER)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{REVERSER}: 3 attention sites", "  encoder: dense encoder, MHA 2q:2kv x 2 layers",
                     "  decoder: dense decoder, MHA 2q:2kv x 2 layers", "  cross: dense cross, MHA 2q:2kv x 2 layers"]
    assert main(["models", str(REVERSER), "--json"]) == 0
    specs = json.loads(capsys.readouterr().out)
    assert list(specs) == ["encoder", "decoder", "cross"] and specs["decoder"]["causal"] is True


def test_qk_map_of_a_vit_reads_its_image_without_a_prompt(vit_dir, picture, tmp_path):
    assert run("qk-map", "--image", picture, "--model", vit_dir, "--layer", "1", "--out", tmp_path) == 0
    assert [p.name for p in tmp_path.glob("*.png")] == [f"{vit_dir.name}_cat.qk-L1.pca.png"]
