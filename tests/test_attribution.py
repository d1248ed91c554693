"""Direct logit attribution: the shares add up to the model's logit on every decoder family and SmolLM2; each
head's share equals a direct computation (the projection module called on that head's slice alone, the final
norm written out by hand); encoders are refused in one sentence."""

from __future__ import annotations

import json

import pytest
import torch

from llm_heatmap.analyses.importance.attribution import logit_attribution
from llm_heatmap.errors import InputError
from llm_heatmap.models import spec_from_model
from tiny_models import EXTRA_FAMILIES, ENCODERS, FAMILIES, SDPA_UNSUPPORTED, VOCAB, tiny_model

DECODERS = [family for family in [*FAMILIES, *EXTRA_FAMILIES] if family not in ENCODERS]


def prompt_ids(length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", DECODERS)
def test_shares_add_up_to_the_logit(family):
    model = tiny_model(family, "eager" if family in SDPA_UNSUPPORTED else "sdpa")
    ids = prompt_ids()
    for position, target in ((-1, None), (4, 17)):
        result = logit_attribution(model, input_ids=ids, position=position, target=target)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, position]
        expected = logits.argmax() if target is None else target
        assert result.target_id == int(expected)
        assert result.logit == pytest.approx(float(logits[expected]), abs=1e-6)
        assert result.reconstructed_logit == pytest.approx(result.logit, abs=1e-4)
        assert result.heads.shape == (model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers")
                                      else model.config.n_layer, spec_from_model(model).num_heads)
        table = result.table()
        assert table.share.sum() == pytest.approx(result.total, abs=1e-9)
        assert len(table) == result.heads.numel() + 2 * result.heads.shape[0] + 2


def direct_head_shares(model, ids, position: int, target: int) -> torch.Tensor:
    """`"l h"`: each head's write from the output projection module itself (called on that head's slice of its
    input, minus its value on zero), through the final norm written out by hand (RMSNorm or LayerNorm)."""
    spec = spec_from_model(model)
    inputs, hooks = {}, []
    projections = [model.get_submodule(path) for path in spec.output_projections]
    for layer, projection in enumerate(projections):
        hooks.append(projection.register_forward_pre_hook(
            lambda module, args, layer=layer: inputs.__setitem__(layer, args[0][0, position].detach())))
    final_norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    hooks.append(final_norm.register_forward_pre_hook(
        lambda module, args: inputs.__setitem__("final", args[0][0, position].detach().double())))
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    x = inputs["final"]
    if isinstance(final_norm, torch.nn.LayerNorm):
        def frozen(write):
            return (write - write.mean()) / torch.sqrt(x.var(unbiased=False) + final_norm.eps) * final_norm.weight.double()
    else:
        def frozen(write):
            return write / torch.sqrt(x.pow(2).mean() + final_norm.variance_epsilon) * final_norm.weight.double()
    unembed = model.get_output_embeddings().weight[target].double()
    shares = torch.zeros(spec.num_layers, spec.num_heads, dtype=torch.float64)
    with torch.no_grad():
        for layer, projection in enumerate(projections):
            for head in range(spec.num_heads):
                alone = torch.zeros_like(inputs[layer])
                span = slice(head * spec.head_dim, (head + 1) * spec.head_dim)
                alone[span] = inputs[layer][span]
                write = (projection(alone[None]) - projection(torch.zeros_like(alone)[None]))[0].double()
                shares[layer, head] = frozen(write) @ unembed
    return shares


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_head_shares_equal_a_direct_computation(family):
    model = tiny_model(family)
    ids = prompt_ids(11, seed=3)
    result = logit_attribution(model, input_ids=ids, position=6, target=5)
    torch.testing.assert_close(result.heads, direct_head_shares(model, ids, 6, 5), rtol=1e-5, atol=1e-6)


def test_head_table_for_the_map():
    model = tiny_model("llama")
    table = logit_attribution(model, input_ids=prompt_ids()).head_table()
    assert list(table.columns) == ["layer", "head", "kv_group", "share"]
    assert table.kv_group.tolist() == [h // 2 for h in table["head"]]


def test_encoders_and_bad_positions_are_refused():
    with pytest.raises(InputError, match="encoder without an LM head"):
        logit_attribution(tiny_model("bert"), input_ids=prompt_ids())
    with pytest.raises(InputError, match="outside the prompt's 9 tokens"):
        logit_attribution(tiny_model("llama"), input_ids=prompt_ids(), position=9)
    with pytest.raises(InputError, match="outside the vocabulary"):
        logit_attribution(tiny_model("llama"), input_ids=prompt_ids(), target=VOCAB)


@pytest.mark.slow
def test_smollm2_shares_add_up_to_the_logit(smollm2):
    model, tokenizer, spec = smollm2
    result = logit_attribution(model, tokenizer, "The Eiffel Tower is located in the city of", spec=spec)
    assert result.target == " Paris"
    assert result.reconstructed_logit == pytest.approx(result.logit, abs=1e-4)
    other = logit_attribution(model, tokenizer, "The Eiffel Tower is located in the city of", spec=spec,
                              position=3, target=" London")
    assert other.reconstructed_logit == pytest.approx(other.logit, abs=1e-4)


@pytest.mark.slow
def test_minilm_is_refused_in_one_sentence(minilm):
    model, tokenizer, spec = minilm
    with pytest.raises(InputError, match=r"^BertModel is an encoder without an LM head .*\.$"):
        logit_attribution(model, tokenizer, "The cat sat on the mat.", spec=spec)


@pytest.mark.slow
def test_cli_writes_the_table_and_map_or_one_sentence(monkeypatch, capsys, tmp_path, smollm2):
    import pandas as pd

    from llm_heatmap import cli

    monkeypatch.setattr("llm_heatmap.models.load_model", lambda source, **options: smollm2)
    prompt = "The Eiffel Tower is located in the city of"
    assert cli.main(["attribute", prompt, "--out", str(tmp_path), "--name", "eiffel", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    table = pd.read_csv(tmp_path / "eiffel.dla.csv")
    assert summary["target"] == " Paris"
    assert table.share.sum() == pytest.approx(summary["logit"], abs=1e-4)
    assert (tmp_path / "eiffel.dla.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli.main(["attribute", prompt, "--out", str(tmp_path / "bad"), "--target", " Eiffel Tower"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llm-heatmap attribute: target ' Eiffel Tower' is")
    assert not any((tmp_path / "bad").glob("*.dla.*"))
