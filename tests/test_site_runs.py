"""Runs over prompt sets per attention site: prompt files that name images and targets, `batch` over a ViT, a
VLM and the digit reverser with --site, resume refused when the sites or images change, and `grid` claiming a
single site's file names before the model loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from llm_heatmap import InputError
from llm_heatmap.analyses.runs.prompts import read_prompts
from llm_heatmap.cli import main
from test_cli_sites import llava_dir, picture, reverser_dir, run, vit_dir  # noqa: F401 (fixtures)

METRIC_COLUMNS = ["layer", "head", "entropy", "sink_score"]


def write_images(folder: Path) -> None:
    """Two different seeded pictures, cat.png and dog.png, in `folder/pictures/`."""
    (folder / "pictures").mkdir(exist_ok=True)
    for seed, name in enumerate(["cat", "dog"]):
        pixels = (np.random.default_rng(seed).random((20, 24, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / "pictures" / f"{name}.png")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# the prompt reader


def test_jsonl_records_name_images_relative_to_the_file_and_targets(tmp_path):
    write_images(tmp_path)
    prompts = read_prompts(write_jsonl(tmp_path / "p.jsonl", [
        {"image": "pictures/cat.png"}, {"prompt": "", "image": "pictures/dog.png", "id": "d"},
        {"prompt": "12345", "target": "54321"}]))
    assert [(p.id, p.text, p.image, p.target) for p in prompts] == [
        ("0", "", str(tmp_path / "pictures" / "cat.png"), None), ("d", "", str(tmp_path / "pictures" / "dog.png"), None),
        ("2", "12345", None, "54321")]


def test_table_rows_name_images_and_targets(tmp_path):
    write_images(tmp_path)
    (tmp_path / "p.csv").write_text("prompt,image,target\n,pictures/cat.png,\n12,,21\n")
    prompts = read_prompts(tmp_path / "p.csv")
    assert [(p.text, p.image, p.target) for p in prompts] == [("", str(tmp_path / "pictures" / "cat.png"), None),
                                                              ("12", None, "21")]


@pytest.mark.parametrize("record, message", [
    ({"image": "pictures/cow.png"}, 'the "image" on line 2 of {file} names {folder}/pictures/cow.png, which does not exist'),
    ({"prompt": ""}, 'the "prompt" on line 2 of {file} is empty'),
    ({"id": "x"}, 'line 2 of {file} has no "prompt" field'),
    ({"prompt": "12", "target": " "}, 'the "target" on line 2 of {file} is empty'),
])
def test_bad_records_are_named_by_file_and_line(tmp_path, record, message):
    write_images(tmp_path)
    file = write_jsonl(tmp_path / "p.jsonl", [{"image": "pictures/cat.png"}, record])
    with pytest.raises(InputError, match="^" + re.escape(message.format(file=file, folder=tmp_path))):
        read_prompts(file)


# batch per site


def test_batch_of_an_image_only_model_measures_each_image_and_resumes(vit_dir, tmp_path):
    write_images(tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"image": "pictures/cat.png"}, {"image": "pictures/dog.png"}])
    out = tmp_path / "run"
    assert run("batch", prompts, "--model", vit_dir, "--out", out) == 0
    table = pd.read_parquet(out / "heads.parquet")
    assert table.groupby("prompt_id").size().to_dict() == {"0": 8, "1": 8}  # 2 layers x 4 heads per image
    assert table["n_tokens"].isna().all()  # an image's positions are patches, not tokens of its (empty) text
    for prompt_id, name in [("0", "cat"), ("1", "dog")]:  # the same numbers as a grid of that image alone
        assert run("grid", "--image", tmp_path / "pictures" / f"{name}.png", "--model", vit_dir, "--out", tmp_path,
                   "--name", name) == 0
        alone = pd.read_csv(next(tmp_path.glob(f"{name}_*.{table['site'].iloc[0]}.metrics.csv")))
        mine = table[table["prompt_id"] == prompt_id].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine[METRIC_COLUMNS], alone[METRIC_COLUMNS], check_dtype=False, atol=1e-6, rtol=0)
    assert not np.allclose(table[table["prompt_id"] == "0"]["entropy"], table[table["prompt_id"] == "1"]["entropy"])

    (out / "parts" / next(p.name for p in (out / "parts").iterdir())).unlink()  # as if interrupted after one image
    assert main(["batch", str(prompts), "--model", str(vit_dir), "--out", str(out), "--resume", "--quiet",
                 "--json"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out / "heads.parquet"), table)
    settings = json.loads((out / "batch.json").read_text())
    assert settings["images"] == {"0": str(tmp_path / "pictures" / "cat.png"), "1": str(tmp_path / "pictures" / "dog.png")}


def test_batch_of_a_vlm_reads_each_record_s_image_and_text(llava_dir, tmp_path):
    write_images(tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a cat on the mat", "image": "pictures/cat.png"},
                                                 {"prompt": "the cat", "image": "pictures/dog.png"}])
    assert run("batch", prompts, "--model", llava_dir, "--out", tmp_path / "all") == 0
    table = pd.read_parquet(tmp_path / "all" / "heads.parquet")
    sites = sorted(set(table["site"]))
    assert len(sites) == 2 and "vision" in sites
    language = next(site for site in sites if site != "vision")
    assert table.groupby(["prompt_id", "site"]).size().to_dict() == {
        ("0", language): 12, ("0", "vision"): 8, ("1", language): 12, ("1", "vision"): 8}
    assert run("grid", "a cat on the mat", "--image", tmp_path / "pictures" / "cat.png", "--model", llava_dir,
               "--out", tmp_path, "--name", "alone") == 0
    for site in sites:  # the batch's rows are a grid's numbers for the same text and image
        alone = pd.read_csv(tmp_path / f"alone.{site}.metrics.csv")
        mine = table[(table["prompt_id"] == "0") & (table["site"] == site)].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine[METRIC_COLUMNS], alone[METRIC_COLUMNS], check_dtype=False, atol=1e-6, rtol=0)

    assert run("batch", prompts, "--model", llava_dir, "--out", tmp_path / "one", "--site", "vision") == 0
    one = pd.read_parquet(tmp_path / "one" / "heads.parquet")
    assert set(one["site"]) == {"vision"} and len(one) == 16


def test_batch_of_the_reverser_reads_targets_from_the_prompt_file(reverser_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "12345", "target": "54321"}, {"prompt": "987", "target": "789"}])
    assert run("batch", prompts, "--model", reverser_dir, "--out", tmp_path / "run", "--site", "cross") == 0
    table = pd.read_parquet(tmp_path / "run" / "heads.parquet")
    assert set(table["site"]) == {"cross"} and len(table) == 8
    assert run("grid", "12345", "--target", "54321", "--model", reverser_dir, "--out", tmp_path, "--name", "g",
               "--site", "cross") == 0
    alone = pd.read_csv(tmp_path / "g.cross.metrics.csv")
    columns = ["layer", "head", "alignment", "coverage", "source_entropy"]
    mine = table[table["prompt_id"] == "0"].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine[columns], alone[columns], check_dtype=False, atol=1e-6, rtol=0)


def test_resume_with_other_sites_or_images_is_refused(reverser_dir, vit_dir, tmp_path, capsys):
    digits = tmp_path / "digits.txt"
    digits.write_text("12345\n987\n")
    out = tmp_path / "rev"
    assert run("batch", digits, "--model", reverser_dir, "--out", out, "--site", "cross") == 0
    before = sorted(p.name for p in out.rglob("*"))
    assert run("batch", digits, "--model", reverser_dir, "--out", out, "--site", "encoder", "--resume") == 2
    assert "holds a batch run with other settings (sites differ)" in capsys.readouterr().err
    assert run("batch", digits, "--model", reverser_dir, "--out", out, "--resume") == 2  # every site is not cross
    assert "(sites differ)" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before
    assert json.loads((out / "batch.json").read_text())["sites"] == ["cross"]

    write_images(tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"image": "pictures/cat.png"}])
    assert run("batch", prompts, "--model", vit_dir, "--out", tmp_path / "vit") == 0
    write_jsonl(prompts, [{"image": "pictures/dog.png"}])
    assert run("batch", prompts, "--model", vit_dir, "--out", tmp_path / "vit", "--resume") == 2
    assert "(images differ)" in capsys.readouterr().err


@pytest.mark.parametrize("records, model, message", [
    ([{"prompt": "12"}, {"prompt": "34", "image": "pictures/cat.png"}], "reverser",
     'prompt \'1\' (line 2 of {file}) names an "image", but BartForConditionalGeneration reads no images'),
    ([{"image": "pictures/cat.png"}, {"prompt": "a cat", "image": "pictures/dog.png"}], "vit",
     "prompt '1' (line 2 of {file}) has text, but ViTModel reads only images; leave its \"prompt\" empty."),
    ([{"image": "pictures/cat.png"}, {"prompt": "a cat"}], "vit",
     "prompt '1' (line 2 of {file}) names no image, but ViTModel reads images"),
    ([{"image": "pictures/cat.png"}], "llava",
     "prompt '0' (line 1 of {file}) has no text, but LlavaModel reads an image with text"),
    ([{"prompt": "a cat", "target": "the mat", "image": "pictures/cat.png"}], "llava",
     'prompt \'0\' (line 1 of {file}) names a "target", but LlavaModel has no decoder'),
])
def test_bad_records_stop_the_batch_before_anything_is_written(records, model, message, reverser_dir, vit_dir,
                                                               llava_dir, tmp_path, capsys):
    write_images(tmp_path)
    file = write_jsonl(tmp_path / "p.jsonl", records)
    folder = {"reverser": reverser_dir, "vit": vit_dir, "llava": llava_dir}[model]
    assert run("batch", file, "--model", folder, "--out", tmp_path / "out") == 2
    assert message.format(file=file) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# grid claims a single site's names before the model loads


def test_grid_with_one_site_claims_its_files_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "rev.cross.png").write_bytes(b"an earlier grid")
    assert main(["grid", "12345", "--site", "cross", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path),
                 "--name", "rev", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "rev.cross.png" in error and "no-such-model" not in error
    assert (tmp_path / "rev.cross.png").read_bytes() == b"an earlier grid"


def test_grid_with_one_site_writes_only_that_site_and_refuses_a_site_the_model_lacks(reverser_dir, tmp_path, capsys):
    assert run("grid", "12345", "--target", "54321", "--site", "cross", "--model", reverser_dir, "--out", tmp_path,
               "--name", "rev") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rev.cross.cube.safetensors", "rev.cross.metrics.csv",
                                                         "rev.cross.png"]
    assert run("grid", "12345", "--site", "vision", "--model", reverser_dir, "--out", tmp_path / "v", "--name", "v") == 2
    assert "--site vision is not a site of" in capsys.readouterr().err
    assert not (tmp_path / "v").exists() or not list((tmp_path / "v").iterdir())


# the atlas per site


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory) -> Path:
    """A tiny random BART (2 + 2 layers, 4 heads) with a word tokenizer."""
    import torch
    import transformers

    from test_cli_sites import WORDS, word_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bart")
    config = transformers.BartConfig(vocab_size=len(WORDS), d_model=16, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None)
    transformers.BartForConditionalGeneration(config).save_pretrained(folder)
    word_tokenizer(WORDS, eos="</s>").save_pretrained(folder)
    return folder


ATLAS_OPTIONS = ["--probe-length", "4", "--resamples", "20", "--permutations", "20", "--quiet"]


def atlas(prompts, model, out, *extra) -> int:
    return main(["atlas", str(prompts), "--model", str(model), "--out", str(out), *ATLAS_OPTIONS, *map(str, extra)])


def test_atlas_of_an_encoder_decoder_covers_the_encoder_site(bart_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat on the mat\nthe cat\na mat on the cat\n")
    assert atlas(prompts, bart_dir, tmp_path / "none") == 2  # which site is not guessed
    assert ("has several attention sites (encoder, decoder, cross) and an atlas covers one; pass --site encoder."
            in capsys.readouterr().err)
    assert not (tmp_path / "none" / "atlas.json").exists()

    assert atlas(prompts, bart_dir, tmp_path / "enc", "--site", "encoder") == 0
    heads = pd.read_parquet(tmp_path / "enc" / "prompt_heads.parquet")
    assert len(heads) == 3 * 2 * 4
    spec = json.loads(next((tmp_path / "enc" / "parts").glob("*/model.json")).read_text())["spec"]
    assert spec["site"] == "encoder" and spec["attention_modules"][0].startswith("model.encoder.")
    assert main(["metrics", "a cat on the mat", "--target", "the cat", "--site", "encoder", "--model", str(bart_dir),
                 "--out", str(tmp_path), "--name", "one", "--quiet"]) == 0
    alone = pd.read_csv(tmp_path / "one.encoder.metrics.csv")  # the encoder's numbers do not depend on the target
    mine = heads[heads["prompt_id"] == "0"].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine[METRIC_COLUMNS], alone[METRIC_COLUMNS], check_dtype=False, atol=1e-6, rtol=0)
    assert (tmp_path / "enc" / "atlas.html").stat().st_size > 0
    assert pd.read_parquet(tmp_path / "enc" / "models.parquet")["site"].tolist() == ["encoder"]

    assert atlas(prompts, bart_dir, tmp_path / "enc", "--resume") == 2  # resumed without the site it was run with
    assert "holds a atlas run with other settings (site differ)" in capsys.readouterr().err


def test_atlas_of_the_digit_reverser_encoder_has_no_kv_gap_with_two_heads(reverser_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("12345\n987\n4321\n")
    assert atlas(prompts, reverser_dir, tmp_path / "out", "--site", "encoder") == 0
    assert "KV-group gap: none (2 heads per layer cannot be split into pseudo groups of 3" in capsys.readouterr().out
    layers = pd.read_parquet(tmp_path / "out" / "layers.parquet")
    assert len(layers) == 2 and layers["gap_p_value"].isna().all() and layers["entropy_mean"].notna().all()
    models = pd.read_parquet(tmp_path / "out" / "models.parquet")
    assert models["num_heads"].tolist() == [2] and models["gap_mean"].isna().all()


def test_atlas_of_a_t5_encoder_equals_its_site_capture(tmp_path):
    """T5 has no default decoder input: the atlas's forward passes give its decoder one start token."""
    import torch
    import transformers

    from llm_heatmap.analyses.atlas.run import run_atlas
    from llm_heatmap.analyses.heads.measure import measure_sites
    from llm_heatmap.analyses.runs.prompts import Prompt
    from llm_heatmap.models import spec_from_model
    from test_cli_sites import WORDS, word_tokenizer

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(WORDS), d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2,
                                   decoder_start_token_id=0)
    model, tokenizer = transformers.T5ForConditionalGeneration(config).eval(), word_tokenizer(WORDS, eos="</s>")
    prompts = [Prompt(id=str(i), text=text) for i, text in enumerate(["a cat on the mat", "the cat", "a mat on the cat"])]
    result = run_atlas({"t5": (model, tokenizer, spec_from_model(model))}, prompts, tmp_path, site="encoder",
                       probe_length=4, n_resamples=20, n_permutations=20, quiet=True)
    assert result.tables["models"]["site"].tolist() == ["encoder"]
    heads = result.tables["prompt_heads"]
    alone = measure_sites(model, tokenizer, "a cat on the mat", target="the cat", sites=["encoder"])
    mine = heads[heads["prompt_id"] == "0"].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine[METRIC_COLUMNS], alone[METRIC_COLUMNS], check_dtype=False, atol=1e-6, rtol=0)


def test_run_batch_takes_sites_and_targets_from_python(bart_dir, tmp_path):
    from llm_heatmap.analyses.runs.batch import run_batch
    from llm_heatmap.analyses.runs.prompts import Prompt
    from llm_heatmap.models import load_model

    model, tokenizer, spec = load_model(bart_dir)
    with pytest.raises(InputError, match=r"^site='vision' is not a site of BartForConditionalGeneration; its sites are "
                                         "encoder, decoder, cross\\.$"):
        run_batch(model, tokenizer, [Prompt(id="0", text="a cat")], tmp_path / "bad", sites=["vision"], quiet=True)
    assert not (tmp_path / "bad").exists()
    prompts = [Prompt(id="0", text="a cat on the mat", target="the mat"), Prompt(id="1", text="the cat", target="a cat")]
    result = run_batch(model, tokenizer, prompts, tmp_path / "run", quiet=True)  # a target: every site
    assert result.table.groupby("site").size().to_dict() == {"cross": 16, "decoder": 16, "encoder": 16}
    from llm_heatmap.analyses.heads.measure import measure_sites

    alone = measure_sites(model, tokenizer, "a cat on the mat", target="the mat", sites=["cross"])  # the record's target
    cross = result.table[(result.table["site"] == "cross") & (result.table["prompt_id"] == "0")].reset_index(drop=True)
    columns = ["layer", "head", "alignment", "coverage", "source_entropy"]
    pd.testing.assert_frame_equal(cross[columns], alone[columns], check_dtype=False, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "run" / "batch.json").read_text())["targets"] == {"0": "the mat", "1": "a cat"}
