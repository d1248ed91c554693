"""The atlas of every attention site: decoder and cross-attention of encoder-decoders (targets from the prompt
file), vision towers (ViT, CLIP, a VLM's), CLIP's text tower and a VLM's language model (images from the prompt
file). Each atlas's numbers are checked against the per-prompt measures computed directly on the same inputs; the
trained digit reverser's cross-attention comes out anti-diagonal; resume and the remaining refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from llm_heatmap.cli import main
from test_cli_sites import clip_dir, llava_dir, reverser_dir, vit_dir  # noqa: F401 (fixtures)
from test_site_runs import bart_dir, write_images, write_jsonl  # noqa: F401 (fixtures)

ATLAS_OPTIONS = ["--probe-length", "4", "--resamples", "20", "--permutations", "20", "--quiet"]
CROSS_COLUMNS = ["alignment", "monotonicity", "coverage", "source_entropy"]
TEXT_COLUMNS = ["entropy", "sink_score", "previous_token_score", "diagonal_score"]
VISION_COLUMNS = ["attention_distance", "spatial_entropy", "cls_mass", "patch_share"]
SOURCES = [{"prompt": "a cat on the mat", "target": "the cat"}, {"prompt": "the cat", "target": "a mat on the cat"},
           {"prompt": "a mat on the cat", "target": "a cat"}]
PICTURES = [{"image": "pictures/cat.png"}, {"image": "pictures/dog.png"}]
CAPTIONS = [{"prompt": "a cat on the mat", "image": "pictures/cat.png"}, {"prompt": "the cat", "image": "pictures/dog.png"}]


def atlas(prompts, model, out, *extra) -> int:
    return main(["atlas", str(prompts), "--model", str(model), "--out", str(out), *ATLAS_OPTIONS, *map(str, extra)])


def tables(out) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(out / f"{name}.parquet") for name in ("prompt_heads", "heads", "models")}


def direct(model_dir, records, folder, site: str) -> pd.DataFrame:
    """Every record measured on its own (`measure_sites`, the batch's measure), prompts in file order."""
    from llm_heatmap.analyses.heads.measure import measure_sites
    from llm_heatmap.models import load_model
    from llm_heatmap.models.loading import load_processor

    model, tokenizer, _ = load_model(model_dir)
    processor = load_processor(model_dir)
    rows = [measure_sites(model, tokenizer, record.get("prompt"), target=record.get("target"), sites=[site],
                          image=folder / record["image"] if "image" in record else None, processor=processor)
            .assign(prompt_id=str(index)) for index, record in enumerate(records)]
    return pd.concat(rows, ignore_index=True)


def check_against(found: dict[str, pd.DataFrame], expected: pd.DataFrame, columns: list[str], atol: float = 1e-6) -> None:
    """The atlas's per-prompt rows equal `expected`, and each head's mean over prompts is theirs."""
    mine = found["prompt_heads"]
    pd.testing.assert_frame_equal(mine[["prompt_id", "layer", "head", *columns]].reset_index(drop=True),
                                  expected[["prompt_id", "layer", "head", *columns]], check_dtype=False, atol=atol, rtol=0)
    means = expected.groupby(["layer", "head"])[columns].mean().reset_index()
    heads = found["heads"].sort_values(["layer", "head"]).reset_index(drop=True)
    for column in columns:
        np.testing.assert_allclose(heads[f"{column}_mean"], means[column], atol=atol, rtol=0)


# encoder-decoder sites


def test_cross_atlas_of_a_tiny_bart_is_the_mean_of_cross_metrics_over_eager_attention(bart_dir, tmp_path):
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from llm_heatmap.analyses.heads.cross_metrics import alignment, coverage, monotonicity, source_entropy

    prompts = write_jsonl(tmp_path / "p.jsonl", SOURCES)
    assert atlas(prompts, bart_dir, tmp_path / "out", "--site", "cross") == 0
    found = tables(tmp_path / "out")
    model = BartForConditionalGeneration.from_pretrained(bart_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(bart_dir)
    rows = []
    for index, record in enumerate(SOURCES):  # the reference: eager output_attentions, target teacher forced
        source = tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        target = torch.tensor([[model.config.decoder_start_token_id,
                                *tokenizer(record["target"], add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            pattern = torch.stack(model(input_ids=source, decoder_input_ids=target, output_attentions=True)
                                  .cross_attentions, 1)[0]  # l h q k
        values = {name: f(pattern).flatten().numpy() for name, f in
                  zip(CROSS_COLUMNS, (alignment, monotonicity, coverage, source_entropy))}
        rows.append(pd.DataFrame({"prompt_id": str(index), "layer": np.repeat([0, 1], 4), "head": np.tile(range(4), 2),
                                  **values}))
    # eager and the default kernel differ by ~1e-7 per weight; a correlation over near-uniform rows moves ~1e-5
    check_against(found, pd.concat(rows, ignore_index=True), CROSS_COLUMNS, atol=1e-4)
    assert not {"entropy", "induction_score"} & set(found["prompt_heads"].columns)  # not the self-attention measures
    model_row = found["models"].iloc[0]
    assert model_row["site"] == "cross"
    assert model_row["alignment_mean"] == pytest.approx(found["prompt_heads"]["alignment"].mean(), abs=1e-6)
    assert model_row["notes"].startswith("induction probe skipped on the cross site: its rows are target tokens")
    assert not [c for c in found["heads"].columns if c.startswith("probe_")]
    top = pd.read_parquet(tmp_path / "out" / "top_prompts.parquet")
    assert set(top["metric"]) == set(CROSS_COLUMNS)  # the site's own ranking scores
    assert "induction probe skipped on the cross site" in (tmp_path / "out" / "atlas.html").read_text()


def test_decoder_atlas_of_a_tiny_bart_measures_the_target_and_probes_the_decoder(bart_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", SOURCES)
    assert atlas(prompts, bart_dir, tmp_path / "out", "--site", "decoder") == 0
    found = tables(tmp_path / "out")
    check_against(found, direct(bart_dir, SOURCES, tmp_path, "decoder"), TEXT_COLUMNS)
    assert found["models"]["site"].tolist() == ["decoder"] and found["models"]["notes"].tolist() == [""]
    assert found["models"]["causal"].tolist() == [True]
    spec = json.loads(next((tmp_path / "out" / "parts").glob("*/model.json")).read_text())
    assert spec["site"] == "decoder" and spec["spec"]["attention_modules"][0].startswith("model.decoder.")
    probe = found["heads"][["probe_previous_token_score", "probe_induction_score"]]
    assert len(probe) == 8 and probe.notna().all().all()


def test_decoder_probe_reads_bos_r_r_as_the_decoder_input(bart_dir):
    """The decoder's probe scores equal the head-detector scores of an eager decoder pass over start + R + R."""
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from llm_heatmap.analyses.atlas.probes import site_probe_scores
    from llm_heatmap.analyses.runs.sites import resolve_site
    from llm_heatmap.analyses.heads.head_detector import repeated_random_tokens
    from llm_heatmap.models import spec_from_model

    model = BartForConditionalGeneration.from_pretrained(bart_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(bart_dir)
    site = resolve_site(model, spec_from_model(model), "decoder", "bart")
    scores = site_probe_scores(model, tokenizer, site, probe_length=3, retrieval_lengths=())
    ids = repeated_random_tokens(tokenizer, 3, 0)
    decoder = ids.clone()
    decoder[0, 0] = model.config.decoder_start_token_id
    with torch.no_grad():
        pattern = torch.stack(model(input_ids=ids, decoder_input_ids=decoder, output_attentions=True)
                              .decoder_attentions, 1)[0]  # l h q k
    # TransformerLens's induction score: D_ij = [j >= 1, t_(j-1) = t_i, j - 1 < i], over the pattern without column 0
    tokens = decoder[0].tolist()
    detect = torch.tensor([[float(j >= 1 and tokens[j - 1] == tokens[i] and j - 1 < i) for j in range(len(tokens))]
                           for i in range(len(tokens))])
    weights = pattern.clone()
    weights[..., 0] = 0
    induction = (weights * detect).sum((-2, -1)) / weights.sum((-2, -1))
    np.testing.assert_allclose(scores["probe_induction_score"], induction.flatten().numpy(), atol=1e-6, rtol=0)


def test_the_digit_reverser_cross_atlas_is_anti_diagonal(reverser_dir, tmp_path):
    # target: the reversal but its last digit, so row i (after <s> and i digits) writes digit i of the reversal
    records = [{"prompt": digits, "target": digits[::-1][:-1]} for digits in ("3141592", "27182", "9081726354")]
    prompts = write_jsonl(tmp_path / "p.jsonl", records)
    assert atlas(prompts, reverser_dir, tmp_path / "out", "--site", "cross") == 0
    found = tables(tmp_path / "out")
    check_against(found, direct(reverser_dir, records, tmp_path, "cross"), CROSS_COLUMNS)
    last = found["heads"][found["heads"]["layer"] == 1]
    assert (last["alignment_mean"] < -0.99).all()  # the copying layer reads the source back to front
    assert (last["monotonicity_mean"] == 1.0).all()


# image sites


def test_vision_atlas_of_a_vit_is_the_mean_of_the_vision_metrics(vit_dir, tmp_path):
    write_images(tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", PICTURES)
    assert atlas(prompts, vit_dir, tmp_path / "out") == 0  # a ViT's one stack is its vision site
    found = tables(tmp_path / "out")
    check_against(found, direct(vit_dir, PICTURES, tmp_path, "self"), VISION_COLUMNS + TEXT_COLUMNS)
    assert found["prompt_heads"]["n_tokens"].isna().all()
    model_row = found["models"].iloc[0]
    assert model_row["site"] == "vision"
    assert model_row["notes"] == ("induction probe skipped on the vision site: its queries and keys are image patches, "
                                  "not text tokens")
    assert not [c for c in found["heads"].columns if c.startswith("probe_")]
    settings = json.loads((tmp_path / "out" / "atlas.json").read_text())
    assert settings["images"] == {"0": str(tmp_path / "pictures" / "cat.png"), "1": str(tmp_path / "pictures" / "dog.png")}
    assert "targets" not in settings and "site" not in settings


@pytest.mark.parametrize("site, columns", [("vision", VISION_COLUMNS + TEXT_COLUMNS), ("text", TEXT_COLUMNS)])
def test_clip_atlas_covers_each_tower(site, columns, clip_dir, tmp_path):
    write_images(tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", CAPTIONS)
    assert atlas(prompts, clip_dir, tmp_path / "out", "--site", site) == 0
    found = tables(tmp_path / "out")
    check_against(found, direct(clip_dir, CAPTIONS, tmp_path, site), columns)
    assert found["models"]["site"].tolist() == [site]
    assert found["models"]["notes"].iloc[0].startswith(f"induction probe skipped on the {site} site")


def test_atlas_of_a_vlm_language_model_has_the_image_share_and_the_text_probes(llava_dir, tmp_path):
    write_images(tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", CAPTIONS)
    assert atlas(prompts, llava_dir, tmp_path / "out", "--site", "self") == 0
    found = tables(tmp_path / "out")
    check_against(found, direct(llava_dir, CAPTIONS, tmp_path, "self"), ["image_share", *TEXT_COLUMNS])
    assert found["models"]["notes"].tolist() == [""]
    assert found["heads"]["probe_induction_score"].notna().all()  # the language model reads the probe's tokens

    assert atlas(prompts, llava_dir, tmp_path / "vision", "--site", "vision") == 0
    vision = tables(tmp_path / "vision")
    check_against(vision, direct(llava_dir, CAPTIONS, tmp_path, "vision"), VISION_COLUMNS)


# resume and refusals


def test_a_site_atlas_resumes_and_refuses_other_targets(bart_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", SOURCES)
    out = tmp_path / "out"
    assert atlas(prompts, bart_dir, out, "--site", "cross") == 0
    before = tables(out)
    capsys.readouterr()
    next((out / "parts").glob("*/1-*.parquet")).unlink()  # as if interrupted before the second prompt's rows
    assert atlas(prompts, bart_dir, out, "--site", "cross", "--resume", "--json") == 0
    assert json.loads(capsys.readouterr().out)["computed"] == {str(bart_dir): ["1"]}
    for name, table in tables(out).items():
        pd.testing.assert_frame_equal(table, before[name])
    write_jsonl(prompts, [{**SOURCES[0], "target": "the mat"}, *SOURCES[1:]])
    assert atlas(prompts, bart_dir, out, "--site", "cross", "--resume") == 2
    assert "(targets differ)" in capsys.readouterr().err


def test_a_site_atlas_in_shards_merges_to_the_whole_run(bart_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", SOURCES)
    assert atlas(prompts, bart_dir, tmp_path / "whole", "--site", "cross") == 0
    sharded = tmp_path / "sharded"
    for shard in ("0/2", "1/2"):
        assert atlas(prompts, bart_dir, sharded, "--site", "cross", "--shard", shard) == 0
    assert not (sharded / "heads.parquet").exists()  # shards write parts only
    assert atlas(prompts, bart_dir, sharded, "--site", "cross", "--resume") == 0
    for name, table in tables(tmp_path / "whole").items():
        pd.testing.assert_frame_equal(tables(sharded)[name], table)


@pytest.mark.parametrize("site, records, message", [
    ("cross", [{"prompt": "12345", "target": "54321"}, {"prompt": "987"}],
     'prompt \'1\' (line 2 of {file}) has no "target", and the atlas of the cross site reads each record\'s target'),
    ("decoder", [{"prompt": "987"}],
     'prompt \'0\' (line 1 of {file}) has no "target", and the atlas of the decoder site reads each record\'s target'),
    ("vision", [{"image": "pictures/cat.png"}, {"prompt": "a cat"}],
     'prompt \'1\' (line 2 of {file}) has no "image", and the atlas of the vision site reads each record\'s image'),
])
def test_records_without_what_the_site_reads_are_refused_before_the_model_loads(site, records, message, tmp_path, capsys):
    write_images(tmp_path)
    file = write_jsonl(tmp_path / "p.jsonl", records)
    assert atlas(file, tmp_path / "no-such-model", tmp_path / "out", "--site", site) == 2
    error = capsys.readouterr().err
    assert message.format(file=file) in error and error.count("\n") == 1 and "no-such-model" not in error
    assert not (tmp_path / "out").exists()


def test_ablation_of_a_site_with_no_output_to_score_is_refused(clip_dir, tmp_path, capsys):
    """A site's ablation scores an encoder-decoder's target or an image classifier's class (its agreement with a
    hand-edited W_O is tests/test_ablation_sites.py); CLIP's towers output neither."""
    write_images(tmp_path)
    file = write_jsonl(tmp_path / "p.jsonl", CAPTIONS)
    assert atlas(file, clip_dir, tmp_path / "out", "--site", "text", "--ablation", "zero") == 2
    error = capsys.readouterr().err
    assert "CLIPModel has no classification head and no LM head, so an ablation has no class or token probability " \
        "to change" in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, site, records, message", [
    ("llava", "vision", [{"image": "pictures/cat.png"}],
     "prompt '0' (line 1 of {file}) has no text, but LlavaModel reads an image with text"),
    ("reverser", "encoder", [{"prompt": "12"}, {"prompt": "34", "image": "pictures/cat.png"}],
     'prompt \'1\' (line 2 of {file}) names an "image", but BartForConditionalGeneration reads no images'),
])
def test_records_the_model_cannot_read_are_refused_before_anything_is_written(model, site, records, message, llava_dir,
                                                                             reverser_dir, tmp_path, capsys):
    write_images(tmp_path)
    file = write_jsonl(tmp_path / "p.jsonl", records)
    folder = {"llava": llava_dir, "reverser": reverser_dir}[model]
    assert atlas(file, folder, tmp_path / "out", "--site", site) == 2
    assert message.format(file=file) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
