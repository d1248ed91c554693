"""Head ablation on one prompt, against models whose output projection weights were edited by hand: zeroing
W_O^h's columns removes head h (zero ablation); adding W_O^h m_h to the projection's bias and zeroing the
columns writes the mean instead (mean ablation)."""

from __future__ import annotations

import copy

import pytest
import torch

from llm_heatmap.analyses.importance.ablation import ablation_effect, heads_replaced, mean_head_outputs
from llm_heatmap.errors import InputError
from llm_heatmap.models import spec_from_model
from tiny_models import VOCAB, tiny_model


def prompt_ids(seed: int = 1, length: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def edited(model, spec, layer: int, head: int, mean: torch.Tensor | None):
    """A copy whose output projection of `layer` no longer reads head `head` (writing `mean` through it instead)."""
    copy_ = copy.deepcopy(model)
    projection = copy_.get_submodule(spec.output_projections[layer])
    span = slice(head * spec.head_dim, (head + 1) * spec.head_dim)
    with torch.no_grad():
        gpt2 = type(projection).__name__ == "Conv1D"  # weight "(h d) m", else "m (h d)"
        columns = projection.weight[span] if gpt2 else projection.weight[:, span]
        if mean is not None:
            write = mean @ columns if gpt2 else columns @ mean
            if projection.bias is None:
                projection.bias = torch.nn.Parameter(torch.zeros(projection.weight.shape[1 if gpt2 else 0]))
            projection.bias += write
        columns.zero_()
    return copy_


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_ablation_equals_an_edited_output_projection(family, kind):
    model, ids = tiny_model(family), prompt_ids()
    spec = spec_from_model(model)
    means = mean_head_outputs(model, [prompt_ids(2), prompt_ids(3, 5)], spec) if kind == "mean" else None
    with torch.no_grad(), heads_replaced(model, spec, {1: (2,)}, means):
        ablated = model(input_ids=ids).logits[0]
    reference_model = edited(model, spec, 1, 2, None if means is None else means[1, 2])
    with torch.no_grad():
        reference = reference_model(input_ids=ids).logits[0]
        plain = model(input_ids=ids).logits[0]
    torch.testing.assert_close(ablated, reference, rtol=1e-5, atol=1e-5)
    assert (ablated - plain).abs().max() > 1e-4

    effect = ablation_effect(model, ids, {1: (2,)}, spec=spec, means=means)
    log_probs = torch.log_softmax(reference[-1].double(), -1)
    assert effect.ablated_log_prob == pytest.approx(float(log_probs[effect.target_id]), abs=1e-5)


def test_mean_is_the_average_head_output():
    model = tiny_model("llama")
    spec = spec_from_model(model)
    rows = []
    hook = model.get_submodule(spec.output_projections[0]).register_forward_pre_hook(
        lambda m, args: rows.append(args[0][0]))
    prompts = [prompt_ids(2), prompt_ids(3, 5)]
    with torch.no_grad():
        for ids in prompts:
            model(input_ids=ids)
    hook.remove()
    expected = torch.cat(rows).mean(0).reshape(spec.num_heads, spec.head_dim)
    torch.testing.assert_close(mean_head_outputs(model, prompts, spec)[0], expected)


def test_refusals():
    model = tiny_model("llama")
    spec = spec_from_model(model)
    with pytest.raises(InputError, match="outside the model's 2 layers x 4 heads"), heads_replaced(model, spec, {0: (4,)}):
        pass
    with pytest.raises(InputError, match="means has shape"), heads_replaced(model, spec, {0: (1,)}, torch.zeros(3)):
        pass
    with pytest.raises(InputError, match="at least one prompt"):
        mean_head_outputs(model, [], spec)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["zero", "mean"])
def test_every_head_ablated_alone_in_batches_equals_its_edited_model(family, kind):
    """`head_ablation_rows` ablates head b in copy b of a batch; each row equals the model whose output
    projection was edited by hand for that head alone, for the target's log-probability and the loss."""
    from llm_heatmap.analyses.importance.ablation import head_ablation_rows

    model, ids = tiny_model(family), prompt_ids()
    spec = spec_from_model(model)
    means = mean_head_outputs(model, [prompt_ids(2), prompt_ids(3, 5)], spec) if kind == "mean" else None
    rows = head_ablation_rows(model, ids, spec=spec, means=means, batch_size=3)  # chunks cross layer boundaries
    assert len(rows) == spec.num_layers * spec.num_heads
    for row in rows.itertuples():
        reference = edited(model, spec, row.layer, row.head, None if means is None else means[row.layer, row.head])
        with torch.no_grad():
            log_probs = torch.log_softmax(reference(input_ids=ids).logits[0].double(), -1)
        loss = -log_probs[:-1].gather(-1, ids[0, 1:, None]).mean()
        assert row.ablated_log_prob == pytest.approx(float(log_probs[-1, row.target_id]), abs=1e-5)
        assert row.ablated_loss == pytest.approx(float(loss), abs=1e-5)
    with torch.no_grad():
        clean = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
    assert (rows["target_id"] == int(clean.argmax())).all()
    assert rows["delta_log_prob"].to_numpy() == pytest.approx((rows["ablated_log_prob"] - float(clean.max())).to_numpy(), abs=1e-9)
    assert rows["delta_log_prob"].abs().max() > 1e-4


def test_head_ablation_over_a_prompt_set_is_a_resumable_run_with_intervals(tiny_gguf, tmp_path):
    import numpy as np
    import pandas as pd

    from llm_heatmap.analyses.importance.ablation import head_ablation_rows, run_head_ablation
    from llm_heatmap.analyses.runs.engine import RunOptions
    from llm_heatmap.analyses.runs.prompts import Prompt
    from llm_heatmap.analyses.stats import Bootstrap
    from llm_heatmap.probes.capture import encode_prompt

    model, tokenizer, spec = tiny_gguf
    prompts = [Prompt(str(i), text) for i, text in enumerate(["the sky is blue", "cats sleep a lot", "rain falls on"])]
    bootstrap = Bootstrap(n_resamples=200, seed=1)
    result = run_head_ablation(model, tokenizer, prompts, tmp_path, spec=spec, bootstrap=bootstrap)
    first = head_ablation_rows(model, encode_prompt(tokenizer, prompts[0].text)[0], spec=spec)
    mine = result.rows[result.rows["prompt_id"] == "0"].reset_index(drop=True)
    np.testing.assert_allclose(mine["delta_log_prob"], first["delta_log_prob"], atol=1e-9)
    importance = result.importance.set_index(["layer", "head"])
    by_head = result.rows.groupby(["layer", "head"])["delta_log_prob"].mean()
    np.testing.assert_allclose(importance["delta_log_prob"].to_numpy(), by_head.to_numpy(), atol=1e-12)
    assert (importance["delta_log_prob_low"] <= importance["delta_log_prob"]).all()
    assert (importance["delta_log_prob"] <= importance["delta_log_prob_high"]).all()
    assert (importance["n_prompts"] == 3).all() and len(importance) == spec.num_layers * spec.num_heads

    parts = sorted((tmp_path / "parts").glob("*.parquet"))
    parts[1].unlink()  # interrupted after two prompts
    again = run_head_ablation(model, tokenizer, prompts, tmp_path, spec=spec, bootstrap=bootstrap,
                              run=RunOptions(resume=True))
    pd.testing.assert_frame_equal(again.importance, result.importance)
    with pytest.raises(InputError, match="mode='median'"):
        run_head_ablation(model, tokenizer, prompts, tmp_path / "x", spec=spec, mode="median")


def test_an_encoder_without_an_lm_head_is_refused():
    from llm_heatmap.analyses.importance.ablation import head_ablation_rows

    model = tiny_model("bert")
    with pytest.raises(InputError, match="no LM head"):
        head_ablation_rows(model, prompt_ids(), spec=spec_from_model(model))


def test_the_ablate_command_writes_the_rows_the_importance_table_and_its_map(tmp_path, monkeypatch, capsys):
    import pandas as pd

    from llm_heatmap.cli import main
    from tiny_models import write_tiny_gguf

    monkeypatch.setenv("LLM_HEATMAP_CACHE", str(tmp_path / "cache"))
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the sky is blue\ncats sleep a lot\n")
    out = tmp_path / "out"
    argv = ["ablate", str(prompts), "--out", str(out), "--model", str(model), "--mode", "mean", "--resamples", "100"]
    assert main(argv) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    importance = pd.read_csv(out / "importance.csv")
    assert len(importance) == 8 and (importance["n_prompts"] == 2).all() and "mean ablation of 8 heads" in stdout
    assert len(pd.read_parquet(out / "ablation.parquet")) == 16 and (out / "importance.png").stat().st_size > 0
    assert main(argv) == 2 and "--force" in capsys.readouterr().err  # a finished run is not overwritten silently
    assert main([*argv, "--resume"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "importance.csv"), importance)
