"""Head ablation on the sites of encoder-decoder and vision models, against a reference written here: a copy of
the model whose output projection has that head's columns of W_O zeroed (mean ablation: zeroed, and the head's
mean output written into the bias), scored by a plain forward (an encoder-decoder's target teacher-forced, an
image classifier's predicted class). Then the toy models (the reverser's cross-attention carries the reversal,
the shape-ViT's heads carry its class), the CLI end to end on the reverser, and the refusals of methods that
cannot score a model's output: exit 2, one sentence, no output folder left behind."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from einops import rearrange
from PIL import Image

from llm_heatmap import InputError
from llm_heatmap.analyses.importance.ablation import run_head_ablation
from llm_heatmap.analyses.importance.site_ablation import site_head_ablation_rows
from llm_heatmap.analyses.runs.prompts import read_prompts
from llm_heatmap.models import spec_from_model
from llm_heatmap.models.inputs import site_inputs
from llm_heatmap.models.sites import find_sites
from test_cli_sites import REVERSER, clip_dir, picture, reverser_dir, run, vit_dir  # noqa: F401 (fixtures)
from test_site_runs import bart_dir  # noqa: F401 (fixture)

TOY = Path(__file__).parents[1] / "examples" / "toy_models"
sys.path.insert(0, str(TOY))
from train_shape_vit import pictures  # noqa: E402


def ablated_copy(model, projection: str, head: int, head_dim: int, mean: torch.Tensor | None = None):
    """A copy of `model` whose `projection` ignores `head`'s slice of its input (its W_O columns zeroed); with
    `mean`, that slice is read as the constant `mean` instead (W_O[:, slice] @ mean moved into the bias)."""
    edited = copy.deepcopy(model)
    linear = edited.get_submodule(projection)
    columns = slice(head * head_dim, (head + 1) * head_dim)
    with torch.no_grad():
        if mean is not None:
            linear.bias += linear.weight[:, columns] @ mean
        linear.weight[:, columns] = 0
    return edited


@torch.no_grad()
def target_log_prob(model, source_ids, decoder_ids) -> tuple[float, float]:
    """(log p of decoder_ids[1:] teacher-forced, summed; the mean loss per target token) of one plain forward."""
    logits = model(input_ids=source_ids, decoder_input_ids=decoder_ids).logits[0, :-1].double()
    picked = torch.log_softmax(logits, -1).gather(-1, decoder_ids[0, 1:, None])[:, 0]
    return float(picked.sum()), float(-picked.mean())


def seq2seq_inputs(model, tokenizer, source: str, target: str) -> dict:
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    return {"input_ids": tokenizer(source, return_tensors="pt")["input_ids"],
            "decoder_input_ids": torch.tensor([[model.config.decoder_start_token_id, *ids]])}


def check_against_edited_copies(model, inputs, site, rows, means=None):
    spec = spec_from_model(model, site)
    clean, clean_loss = target_log_prob(model, inputs["input_ids"], inputs["decoder_input_ids"])
    assert len(rows) == spec.num_layers * spec.num_heads
    for row in rows.itertuples():
        mean = None if means is None else means[row.layer, row.head].double().float()
        edited = ablated_copy(model, spec.output_projections[row.layer], row.head, spec.head_dim, mean)
        ablated, ablated_loss = target_log_prob(edited, inputs["input_ids"], inputs["decoder_input_ids"])
        assert row.log_prob == pytest.approx(clean, abs=1e-9)
        assert row.delta_log_prob == pytest.approx(ablated - clean, abs=2e-4)
        assert row.delta_loss == pytest.approx(ablated_loss - clean_loss, abs=5e-5)


# a tiny random BART: every head of every site


@pytest.fixture(scope="module")
def bart(bart_dir):
    model = transformers.BartForConditionalGeneration.from_pretrained(bart_dir).eval()
    return model, transformers.AutoTokenizer.from_pretrained(bart_dir)


@pytest.mark.parametrize("site", ["encoder", "decoder", "cross"])
def test_each_bart_head_alone_equals_zeroing_its_columns_of_w_o(bart, site):
    model, tokenizer = bart
    inputs = seq2seq_inputs(model, tokenizer, "a cat on the mat", "the cat on a mat")
    rows = site_head_ablation_rows(model, inputs, spec=spec_from_model(model, site), batch_size=3)
    check_against_edited_copies(model, inputs, site, rows)
    assert (rows.n_target_tokens == 5).all() and (rows.target_id == -1).all()


def test_mean_ablation_of_bart_cross_heads_equals_the_mean_written_into_the_bias(bart):
    model, tokenizer = bart
    records = [seq2seq_inputs(model, tokenizer, "a cat", "the mat"), seq2seq_inputs(model, tokenizer, "on the mat", "a cat a")]
    spec = spec_from_model(model, "cross")
    seen = {layer: [] for layer in range(spec.num_layers)}  # the projections' inputs, kept by hand
    hooks = [model.get_submodule(path).register_forward_pre_hook(lambda m, a, layer=layer: seen[layer].append(a[0][0]))
             for layer, path in enumerate(spec.output_projections)]
    with torch.no_grad():
        for inputs in records:
            model(**inputs)
    for hook in hooks:
        hook.remove()
    means = torch.stack([rearrange(torch.cat(seen[layer]).mean(0), "(h d) -> h d", h=spec.num_heads)
                         for layer in range(spec.num_layers)])
    from llm_heatmap.analyses.importance.site_ablation import site_mean_head_outputs

    computed = site_mean_head_outputs(model, records, spec)
    torch.testing.assert_close(computed, means, atol=1e-6, rtol=0)
    rows = site_head_ablation_rows(model, records[1], spec=spec, means=computed)
    check_against_edited_copies(model, records[1], "cross", rows, computed)


# the toy digit reverser: the cross-attention of its copying layer carries the reversal


@pytest.fixture(scope="module")
def reverser():
    model = transformers.BartForConditionalGeneration.from_pretrained(REVERSER).eval()
    return model, transformers.AutoTokenizer.from_pretrained(REVERSER)


def test_a_cross_head_of_the_reversers_layer_1_carries_the_reversal(reverser):
    model, tokenizer = reverser
    inputs = seq2seq_inputs(model, tokenizer, "3141592", "2951413")
    rows = site_head_ablation_rows(model, inputs, spec=spec_from_model(model, "cross"))
    check_against_edited_copies(model, inputs, "cross", rows)
    assert rows.log_prob.iloc[0] > -0.5  # the model reverses the digits
    layer_1 = rows[rows.layer == 1]
    assert layer_1.delta_log_prob.min() < -5  # without that head the reversal is lost


def test_without_a_target_the_greedy_output_is_scored(reverser):
    model, tokenizer = reverser
    generated = site_inputs(model, tokenizer, None, find_sites(model), prompt="27182")["decoder_input_ids"]
    rows = site_head_ablation_rows(model, site_inputs(model, tokenizer, None, find_sites(model), prompt="27182"),
                                   spec=spec_from_model(model, "cross"))
    inputs = {"input_ids": tokenizer("27182", return_tensors="pt")["input_ids"], "decoder_input_ids": generated}
    check_against_edited_copies(model, inputs, "cross", rows)
    assert (rows.n_target_tokens == generated.shape[-1] - 1).all()
    assert tokenizer.decode(generated[0, 1:], skip_special_tokens=True).replace(" ", "") == "28172"


# the toy shape-ViT: log p of the class it predicts


@pytest.fixture(scope="module")
def shape_vit():
    return transformers.ViTForImageClassification.from_pretrained(TOY / "shape-vit").eval()


def test_each_shape_vit_head_alone_equals_zeroing_its_columns_of_w_o(shape_vit):
    pixels, labels, _ = pictures(torch.Generator().manual_seed(7), 1)
    inputs = {"pixel_values": (pixels - 0.5) / 0.5}
    spec = spec_from_model(shape_vit, "self")
    rows = site_head_ablation_rows(shape_vit, inputs, spec=spec, batch_size=5)
    with torch.no_grad():
        clean = torch.log_softmax(shape_vit(**inputs).logits[0].double(), -1)
    predicted = int(clean.argmax())
    assert predicted == int(labels[0]) and (rows.target_id == predicted).all()
    assert len(rows) == spec.num_layers * spec.num_heads and rows.delta_loss.isna().all()
    for row in rows.itertuples():
        edited = ablated_copy(shape_vit, spec.output_projections[row.layer], row.head, spec.head_dim)
        with torch.no_grad():
            ablated = torch.log_softmax(edited(**inputs).logits[0].double(), -1)[predicted]
        assert row.delta_log_prob == pytest.approx(float(ablated - clean[predicted]), abs=1e-5)


def test_ablate_over_image_records_of_the_shape_vit(tmp_path):
    pixels, _, _ = pictures(torch.Generator().manual_seed(11), 2)
    records = []
    for index, picture in enumerate(pixels):
        Image.fromarray((rearrange(picture, "c h w -> h w c") * 255).round().byte().numpy()).save(tmp_path / f"{index}.png")
        records.append({"image": f"{index}.png"})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run("ablate", tmp_path / "p.jsonl", "--model", TOY / "shape-vit", "--out", tmp_path / "out") == 0
    rows = pd.read_parquet(tmp_path / "out" / "ablation.parquet")
    assert rows.groupby("prompt_id").size().to_dict() == {"0": 8, "1": 8}  # 2 layers x 4 heads per picture
    importance = pd.read_csv(tmp_path / "out" / "importance.csv")
    assert len(importance) == 8 and importance.delta_log_prob.notna().all()


# the CLI end to end on the reverser


def test_ablate_cross_site_of_the_reverser_writes_what_the_api_computes(reverser, tmp_path, capsys):
    model, tokenizer = reverser
    records = [{"prompt": "31415", "target": "51413"}, {"prompt": "2718", "target": "8172"}, {"prompt": "9081"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    assert run("ablate", tmp_path / "p.jsonl", "--model", REVERSER, "--site", "cross", "--out", out) == 0
    rows = pd.read_parquet(out / "ablation.parquet")
    for prompt in read_prompts(tmp_path / "p.jsonl"):
        inputs = site_inputs(model, tokenizer, None, find_sites(model), prompt=prompt.text, target=prompt.target)
        expected = site_head_ablation_rows(model, inputs, spec=spec_from_model(model, "cross"))
        mine = rows[rows.prompt_id == prompt.id].reset_index(drop=True)
        np.testing.assert_allclose(mine.delta_log_prob, expected.delta_log_prob, atol=1e-5, rtol=0)
        np.testing.assert_allclose(mine.delta_loss, expected.delta_loss, atol=1e-5, rtol=0)
    importance = pd.read_csv(out / "importance.csv")
    wide = rows.pivot_table(index="prompt_id", columns=["layer", "head"], values="delta_log_prob")
    np.testing.assert_allclose(importance.delta_log_prob, wide.mean().to_numpy(), atol=1e-9)
    assert (out / "importance.png").stat().st_size > 0
    assert run("ablate", tmp_path / "p.jsonl", "--model", REVERSER, "--site", "cross", "--out", out, "--resume") == 0
    assert run("ablate", tmp_path / "p.jsonl", "--model", REVERSER, "--site", "encoder", "--out", tmp_path / "mean",
               "--mode", "mean") == 0
    assert len(pd.read_parquet(tmp_path / "mean" / "ablation.parquet")) == 3 * 4


def test_the_api_reads_a_site_and_refuses_a_missing_one(reverser, tmp_path):
    model, tokenizer = reverser
    prompts = read_prompts(_write(tmp_path / "p.txt", "31415\n"))
    result = run_head_ablation(model, tokenizer, prompts, tmp_path / "run", site="decoder")
    assert len(result.importance) == 4 and result.rows.n_target_tokens.iloc[0] >= 1
    with pytest.raises(InputError, match=r"^BartForConditionalGeneration has several attention sites \(encoder, "
                       r"decoder, cross\) and a head ablation reads one; pass site=encoder\.$"):
        run_head_ablation(model, tokenizer, prompts, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# refusals: exit 2, one sentence, nothing left behind


def refused(capsys, *argv) -> str:
    assert run(*argv) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.endswith(".")
    return error


def test_ablate_on_the_reverser_without_a_site_asks_for_one(tmp_path, capsys):
    error = refused(capsys, "ablate", _write(tmp_path / "p.txt", "31415\n"), "--model", REVERSER,
                    "--out", tmp_path / "D")
    assert error.endswith("has several attention sites (encoder, decoder, cross) and a head ablation reads one; "
                          "pass --site encoder.")
    assert not (tmp_path / "D").exists()


def test_attribute_on_the_reverser_names_an_encoder_decoder(tmp_path, capsys):
    error = refused(capsys, "attribute", "31415", "--model", REVERSER, "--out", tmp_path / "D")
    assert "BartForConditionalGeneration is an encoder-decoder, and direct logit attribution" in error
    assert "LM head" not in error.split(",")[0]
    assert not (tmp_path / "D").exists()


@pytest.mark.parametrize("model, sentence", [
    ("vit", "ViTModel has no classification head and no LM head, so an ablation has no class or token probability "
            "to change"),
    ("clip", "CLIPModel has no classification head and no LM head"),
])
def test_ablate_refuses_a_vision_model_without_a_head(model, sentence, vit_dir, clip_dir, picture, tmp_path, capsys):
    records = _write(tmp_path / "p.jsonl", json.dumps({"prompt": "a cat", "image": str(picture)}
                                                      if model == "clip" else {"image": str(picture)}) + "\n")
    folder = {"vit": vit_dir, "clip": clip_dir}[model]
    error = refused(capsys, "ablate", records, "--model", folder, "--out", tmp_path / "D" / "E")
    assert sentence in error
    assert not (tmp_path / "D").exists()


def test_knockout_and_attribution_name_what_the_model_is(reverser, shape_vit):
    from llm_heatmap.analyses.importance.attribution import logit_attribution
    from llm_heatmap.analyses.importance.knockout import Edges, knockout_effect

    model, tokenizer = reverser
    with pytest.raises(InputError, match=r"^BartForConditionalGeneration is an encoder-decoder, and a knockout cuts "):
        knockout_effect(model, tokenizer, "31415", [Edges(layers=[0], queries=[1], keys=[0])])
    with pytest.raises(InputError, match=r"^ViTForImageClassification is an image classifier, and direct logit "):
        logit_attribution(shape_vit, input_ids=torch.zeros(1, 3, dtype=torch.long))


# the atlas's importance columns on a site


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_the_cross_atlas_of_the_reverser_carries_each_heads_ablation(reverser, mode, tmp_path):
    from llm_heatmap.analyses.atlas.run import run_atlas
    from llm_heatmap.analyses.importance.site_ablation import record_inputs, site_mean_head_outputs

    model, tokenizer = reverser
    file = tmp_path / "p.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": "31415", "target": "51413"},
                                                          {"prompt": "27182", "target": "28172"}]))
    prompts = read_prompts(file)
    run_atlas({"rev": str(REVERSER)}, prompts, tmp_path / "out", site="cross", ablation=mode, probe_length=0,
              n_resamples=50, quiet=True)
    spec = spec_from_model(model, "cross")
    inputs = [record_inputs(model, tokenizer, None, p) for p in prompts]
    means = site_mean_head_outputs(model, inputs, spec) if mode == "mean" else None
    expected = np.mean([site_head_ablation_rows(model, i, spec=spec, means=means).delta_log_prob for i in inputs], 0)
    heads = pd.read_parquet(tmp_path / "out" / "heads.parquet").sort_values(["layer", "head"])
    np.testing.assert_allclose(heads["ablation_delta_log_prob_mean"].to_numpy(), expected, atol=1e-5)


def test_one_head_of_the_shape_vits_first_layer_carries_its_class(shape_vit):
    """Over 48 pictures it never saw, zeroing L0H0 lowers log p of the predicted class the most (every other head
    of the 2 x 4 barely matters): the head whose [CLS] row finds the square."""
    pixels, _, _ = pictures(torch.Generator().manual_seed(2024), 48)
    spec = spec_from_model(shape_vit, "self")
    rows = pd.concat([site_head_ablation_rows(shape_vit, {"pixel_values": (p[None] - 0.5) / 0.5}, spec=spec)
                      for p in pixels])
    drops = rows.groupby(["layer", "head"]).delta_log_prob.agg(["mean", "min"])
    assert drops["mean"].idxmin() == (0, 0) and drops.loc[(0, 0), "min"] < -1
    assert (drops.drop(index=(0, 0))["min"] > -0.1).all()


def test_a_failed_claim_removes_the_empty_folders_it_made_and_nothing_else(tmp_path):
    from llm_heatmap.models.files import claim_outputs

    (tmp_path / "kept").mkdir()
    with pytest.raises(InputError, match="refused"), claim_outputs([tmp_path / "kept" / "a" / "b" / "x.csv"], force=False):
        assert (tmp_path / "kept" / "a" / "b").is_dir()
        raise InputError("refused.")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not list((tmp_path / "kept").iterdir())
    with pytest.raises(InputError, match="refused"), claim_outputs([tmp_path / "new" / "x.csv"], force=False):
        (tmp_path / "new" / "notes.txt").write_text("written by someone else")
        raise InputError("refused.")
    assert (tmp_path / "new" / "notes.txt").exists()
