"""The prompt-set commands on one attention site: `kv-similarity --site` and `compare --sets --site` read each
record's source, target and image through the model's sites (`analyses.runs.sites`), checked against eager
`output_attentions` of the same inputs; a model with several sites needs --site."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import torch

from llm_heatmap.cli import main
from test_atlas_sites import SOURCES
from test_cli_sites import vit_dir  # noqa: F401 (fixture)
from test_site_runs import bart_dir, write_images, write_jsonl  # noqa: F401 (fixtures)


def eager_cross_cubes(bart_dir, records):
    """Per record, the captured cross cube with its pattern replaced by eager `output_attentions`'s (target
    teacher forced): the cube's labels, the reference's numbers."""
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from llm_heatmap.analyses.heads.measure import capture_site_cubes

    model = BartForConditionalGeneration.from_pretrained(bart_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(bart_dir)
    cubes = []
    for record in records:
        source = tokenizer(record["prompt"], return_tensors="pt")["input_ids"]
        target = torch.tensor([[model.config.decoder_start_token_id,
                                *tokenizer(record["target"], add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            pattern = torch.stack(model(input_ids=source, decoder_input_ids=target, output_attentions=True)
                                  .cross_attentions, 1)[0]  # l h q k
        captured = capture_site_cubes(model, tokenizer, record["prompt"], sites=["cross"], target=record["target"])
        assert torch.allclose(captured["cross"].pattern.float(), pattern, atol=1e-5)
        cubes.append(dataclasses.replace(captured["cross"], pattern=pattern))
    return cubes


def test_kv_similarity_of_the_cross_site_is_that_of_eager_cross_attention(bart_dir, tmp_path, capsys):
    from llm_heatmap.analyses.similarity.kv_similarity import kv_group_similarity

    prompts = write_jsonl(tmp_path / "p.jsonl", SOURCES)
    argv = ["kv-similarity", "--prompts", prompts, "--model", bart_dir, "--out", tmp_path / "out", "--name", "kv",
            "--pseudo-group-size", "2", "--permutations", "20", "--measure", "js", "--measure", "cosine", "--quiet"]
    assert main([*map(str, argv), "--site", "cross"]) == 0
    found = pd.read_csv(tmp_path / "out" / "kv.kv.csv")
    assert "1 model(s) x 3 prompt(s), cross site" in capsys.readouterr().out
    expected = pd.concat([kv_group_similarity(cube, measures=("js", "cosine"), pseudo_group_size=2, n_permutations=20,
                                              seed=0).assign(prompt_id=str(index), n_tokens=cube.num_keys)
                          for index, cube in enumerate(eager_cross_cubes(bart_dir, SOURCES))], ignore_index=True)
    keys = ["prompt_id", "layer", "measure", "first_token"]
    found = found.astype({"prompt_id": str}).sort_values(keys).reset_index(drop=True)
    expected = expected.sort_values(keys).reset_index(drop=True)
    assert found["prompt_id"].tolist() == expected["prompt_id"].tolist()
    assert len(found) == 3 * 2 * 2 * 2 and (found["n_tokens"] == expected["n_tokens"]).all()
    np.testing.assert_allclose(found[["within", "between", "gap"]], expected[["within", "between", "gap"]], atol=1e-5)

    assert main([*map(str, argv), "--name", "none"]) == 2  # which site is not guessed
    assert ("has several attention sites (encoder, decoder, cross) and the KV report reads one; pass --site encoder."
            in capsys.readouterr().err)
    assert not list((tmp_path / "out").glob("none*"))


def test_kv_similarity_of_a_vit_reads_each_records_image(vit_dir, tmp_path):
    from llm_heatmap.analyses.heads.measure import capture_site_cubes
    from llm_heatmap.analyses.similarity.kv_similarity import kv_group_similarity
    from llm_heatmap.models import load_model
    from llm_heatmap.models.loading import load_processor

    write_images(tmp_path)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"image": "pictures/cat.png"}, {"image": "pictures/dog.png"}])
    assert main(["kv-similarity", "--prompts", str(prompts), "--model", str(vit_dir), "--out", str(tmp_path / "out"),
                 "--name", "kv", "--pseudo-group-size", "2", "--permutations", "10", "--measure", "js", "--quiet"]) == 0
    found = pd.read_csv(tmp_path / "out" / "kv.kv.csv")
    model, tokenizer, _ = load_model(vit_dir)
    for index, name in enumerate(["cat", "dog"]):
        cube = capture_site_cubes(model, tokenizer, None, image=tmp_path / "pictures" / f"{name}.png",
                                  processor=load_processor(vit_dir))["self"]
        expected = kv_group_similarity(cube, measures=("js",), pseudo_group_size=2, n_permutations=10, seed=0)
        keys = ["layer", "first_token"]
        mine = found[found["prompt_id"].astype(str) == str(index)].sort_values(keys)
        expected = expected.sort_values(keys)
        np.testing.assert_allclose(mine[["within", "between"]], expected[["within", "between"]], rtol=1e-6)


def test_compare_sets_of_the_cross_site_compares_the_cross_metrics_of_each_record(bart_dir, tmp_path, capsys):
    from llm_heatmap.analyses.heads.cross_metrics import alignment, coverage

    more = [{"prompt": "the mat", "target": "a cat on the mat"}, {"prompt": "a cat", "target": "the mat"}]
    set_a, set_b = write_jsonl(tmp_path / "a.jsonl", SOURCES), write_jsonl(tmp_path / "b.jsonl", more)
    argv = ["compare", set_a, set_b, "--sets", "--model", bart_dir, "--out", tmp_path / "out", "--name", "cmp",
            "--resamples", "50", "--permutations", "50", "--quiet"]
    assert main([*map(str, argv), "--site", "cross", "--metric", "alignment", "--metric", "coverage"]) == 0
    heads = pd.read_csv(tmp_path / "out" / "cmp.heads.csv")
    assert set(heads["metric"]) == {"alignment", "coverage"}
    cubes_a, cubes_b = eager_cross_cubes(bart_dir, SOURCES), eager_cross_cubes(bart_dir, more)
    for metric, function in (("alignment", alignment), ("coverage", coverage)):
        means = [torch.stack([function(cube.pattern) for cube in cubes]).double().mean(0) for cubes in (cubes_a, cubes_b)]
        expected = (means[1] - means[0]).flatten().numpy()  # "l h", layer-major as the table
        mine = heads[heads["metric"] == metric].sort_values(["layer", "head"])
        np.testing.assert_allclose(mine["delta"].to_numpy(), expected, atol=1e-4)  # correlations of near-uniform rows
    assert capsys.readouterr().out.splitlines()[0].endswith(": dense cross, MHA 4q:4kv x 2 layers")

    assert main([*map(str, argv), "--name", "none"]) == 2
    assert "and a set comparison reads one; pass --site encoder." in capsys.readouterr().err
    assert main([*map(str, argv), "--name", "none", "--site", "cross", "--target", "a cat"]) == 2
    assert "with --sets each record names its own" in capsys.readouterr().err
    assert main([*map(str, argv), "--name", "none", "--metric", "alignment"]) == 2  # a site's column needs --site
    assert "metric 'alignment' does not exist" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("none*"))


def test_every_column_of_a_sites_table_is_a_metric_the_cli_takes(bart_dir):
    """The names the CLI checks --metric against before loading hold the columns `site_metrics` computes."""
    from llm_heatmap.analyses.bounds import metric_choices
    from llm_heatmap.analyses.heads.measure import capture_site_cubes, site_metrics
    from llm_heatmap.models import load_model

    model, tokenizer, _ = load_model(bart_dir)
    cubes = capture_site_cubes(model, tokenizer, SOURCES[0]["prompt"], target=SOURCES[0]["target"])
    columns = {c for cube in cubes.values() for c in site_metrics(cube).columns} - {"layer", "head", "kv_group"}
    assert columns <= set(metric_choices(sites=True)) and "alignment" in columns
    assert "alignment" not in metric_choices()


def test_compare_sets_of_the_decoder_site_writes_its_name_into_the_files(bart_dir, tmp_path):
    site = "decoder"
    set_a = write_jsonl(tmp_path / "a.jsonl", SOURCES[:2])
    set_b = write_jsonl(tmp_path / "b.jsonl", SOURCES[1:])
    assert main(["compare", str(set_a), str(set_b), "--sets", "--model", str(bart_dir), "--out", str(tmp_path / "out"),
                 "--site", site, "--resamples", "20", "--permutations", "20", "--quiet"]) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert any(name.endswith(f".{site}.heads.csv") for name in files), files
    settings = json.loads(next((tmp_path / "out").glob("*.sets/sets.json")).read_text())
    assert settings["site"] == site and settings["spec"] == "dense decoder, MHA 4q:4kv x 2 layers"


def test_compare_sets_of_a_vit_reads_each_records_image(vit_dir, tmp_path, capsys):
    from llm_heatmap.analyses.heads.measure import capture_site_cubes
    from llm_heatmap.analyses.heads.vision_metrics import vision_metrics
    from llm_heatmap.models import load_model
    from llm_heatmap.models.loading import load_processor

    write_images(tmp_path)
    set_a = write_jsonl(tmp_path / "a.jsonl", [{"image": "pictures/cat.png"}])
    set_b = write_jsonl(tmp_path / "b.jsonl", [{"image": "pictures/dog.png"}])
    assert main(["compare", str(set_a), str(set_b), "--sets", "--model", str(vit_dir), "--out", str(tmp_path / "out"),
                 "--name", "cmp", "--site", "vision", "--metric", "attention_distance", "--resamples", "20",
                 "--permutations", "20", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(": dense encoder, MHA 4q:4kv x 2 layers")  # a ViT: one stack
    model, tokenizer, _ = load_model(vit_dir)
    distances = [vision_metrics(capture_site_cubes(model, tokenizer, None, image=tmp_path / "pictures" / f"{name}.png",
                                                   processor=load_processor(vit_dir))["self"])["attention_distance"]
                 for name in ("cat", "dog")]
    heads = pd.read_csv(tmp_path / "out" / "cmp.heads.csv").sort_values(["layer", "head"])
    np.testing.assert_allclose(heads["delta"].to_numpy(), (distances[1] - distances[0]).to_numpy(), atol=1e-6)
