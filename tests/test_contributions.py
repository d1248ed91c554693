"""Token-to-token contributions (Kobayashi 2021, ALTI): the per-token vectors add up to the attention block's
output the model computed (read by hooks), and the contribution matrices equal a direct computation from an
eager forward (`output_attentions`, hooked value projections, the output projection's weight, the norm written
out by hand) with the measures written as loops."""

from __future__ import annotations

import pytest
import torch

from llm_heatmap.analyses.importance.contributions import layer_blocks, token_contributions
from llm_heatmap.errors import InputError
from llm_heatmap.models import spec_from_model
from tiny_models import FAMILIES, SDPA_UNSUPPORTED, VOCAB, tiny_model

LENGTH = 7


def prompt_ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, LENGTH), generator=torch.Generator().manual_seed(seed))


def observed_block_outputs(model, spec, ids) -> list[torch.Tensor]:
    """Per layer, the residual after the attention block as the model holds it: the input of the norm in front
    of the MLP (pre-norm decoders), or the output of the norm after attention (BERT)."""
    seen, hooks = {}, []
    for layer, path in enumerate(spec.attention_modules):
        block = model.get_submodule(path.rpartition(".")[0])
        if hasattr(getattr(block, "output", None), "LayerNorm"):  # BERT: block is BertAttention
            hooks.append(block.output.LayerNorm.register_forward_hook(
                lambda m, args, out, layer=layer: seen.__setitem__(layer, out[0])))
            continue
        norm = next(getattr(block, n) for n in ("pre_feedforward_layernorm", "ln_2", "post_attention_layernorm")
                    if hasattr(block, n))
        hooks.append(norm.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__(layer, args[0][0])))
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return [seen[layer].double() for layer in range(spec.num_layers)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_vectors_add_up_to_the_block_output(family):
    model, ids = tiny_model(family, "eager" if family in SDPA_UNSUPPORTED else "sdpa"), prompt_ids()
    spec = spec_from_model(model)
    blocks = layer_blocks(model, ids, spec)
    for block, observed in zip(blocks, observed_block_outputs(model, spec, ids)):
        vectors, output = block.vectors()
        _, last_rows = block.vectors(slice(3, None))
        torch.testing.assert_close(last_rows, output[3:])
        assert vectors.shape == (LENGTH, LENGTH, observed.shape[-1])
        torch.testing.assert_close(output, observed, rtol=1e-5, atol=1e-5)
        if spec.causal:  # a later token carries nothing to an earlier row
            assert torch.all(vectors.norm(dim=-1).triu(1) == 0)


@torch.no_grad()
def direct_vectors(family: str, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(z `"i j m"`, y `"i m"`) per layer from an eager forward, written out head by head and token by token."""
    model = tiny_model(family, "eager")
    spec = spec_from_model(model)
    values, inputs, norm_inputs, hooks = {}, {}, {}, []
    d, g = spec.head_dim, spec.num_kv_heads
    for layer, path in enumerate(spec.attention_modules):
        attention, block = model.get_submodule(path), model.get_submodule(path.rpartition(".")[0])
        if family == "gpt2":
            source, pick = attention.c_attn, (lambda out: out[..., 2 * spec.num_heads * d:])
        elif family == "bert":
            source, pick = attention.value, (lambda out: out)
            hooks.append(model.get_submodule(path.rpartition(".")[0] + ".output.LayerNorm").register_forward_pre_hook(
                lambda m, args, layer=layer: norm_inputs.__setitem__(layer, args[0][0].double())))
        else:
            source, pick = attention.v_proj, (lambda out: out)
        hooks.append(source.register_forward_hook(
            lambda m, args, out, layer=layer, pick=pick: values.__setitem__(layer, pick(out)[0].double())))
        hooks.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, layer=layer: inputs.__setitem__(layer, (args[0] if args else kwargs["hidden_states"])[0].double()),
            with_kwargs=True))
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    for hook in hooks:
        hook.remove()
    result = []
    for layer in range(spec.num_layers):
        projection = model.get_submodule(spec.output_projections[layer])
        weight = (projection.weight if family == "gpt2" else projection.weight.T).double()  # "(h d) m"
        x, pattern = inputs[layer], attentions[layer][0].double()
        z = torch.zeros(LENGTH, LENGTH, x.shape[-1], dtype=torch.float64)
        for i in range(LENGTH):
            z[i, i] += x[i]
            for j in range(LENGTH):
                for h in range(spec.num_heads):
                    kv = h // (spec.num_heads // g)
                    z[i, j] += pattern[h, i, j] * values[layer][j, kv * d:(kv + 1) * d] @ weight[h * d:(h + 1) * d]
        bias = projection.bias.double() if projection.bias is not None else torch.zeros(x.shape[-1], dtype=torch.float64)
        if family == "bert":
            norm = model.get_submodule(spec.output_projections[layer].rpartition(".")[0] + ".LayerNorm")
            rows = norm_inputs[layer]
            scale = 1 / torch.sqrt(rows.var(-1, unbiased=False) + norm.eps)
            z = (z - z.mean(-1, keepdim=True)) * scale[:, None, None] * norm.weight.double()
            bias = (bias - bias.mean()) * scale[:, None] * norm.weight.double() + norm.bias.double()
        result.append((z, z.sum(1) + bias))
    return result


def direct_matrix(z: torch.Tensor, y: torch.Tensor, measure: str) -> torch.Tensor:
    matrix = torch.zeros(LENGTH, LENGTH, dtype=torch.float64)
    for i in range(LENGTH):
        for j in range(LENGTH):
            if measure == "norm":
                matrix[i, j] = torch.linalg.vector_norm(z[i, j])
            else:
                matrix[i, j] = max(0.0, float(y[i].abs().sum() - (y[i] - z[i, j]).abs().sum()))
        matrix[i] /= matrix[i].sum()
    return matrix


@pytest.mark.parametrize("measure", ["alti", "norm"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "bert"])
def test_contributions_equal_a_direct_computation(family, measure):
    ids = prompt_ids()
    result = token_contributions(tiny_model(family), input_ids=ids, measure=measure)
    expected = torch.stack([direct_matrix(z, y, measure) for z, y in direct_vectors(family, ids)])
    torch.testing.assert_close(result.per_layer, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.rollout[-1], expected[1] @ expected[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.rollout.sum(-1), torch.ones(2, LENGTH, dtype=torch.float64))
    assert torch.equal(result.input_attribution(), result.rollout[-1, -1])


def test_refusals():
    with pytest.raises(InputError, match="measure 'l2' is not one of alti, norm"):
        token_contributions(tiny_model("llama"), input_ids=prompt_ids(), measure="l2")
    with pytest.raises(InputError, match=r"shape \[1, tokens\]"):
        token_contributions(tiny_model("llama"), input_ids=prompt_ids()[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "minilm"])
def test_real_models_add_up(name, request):
    model, tokenizer, spec = request.getfixturevalue(name)
    ids = tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")["input_ids"]
    for block, observed in zip(layer_blocks(model, ids, spec), observed_block_outputs(model, spec, ids)):
        torch.testing.assert_close(block.vectors()[1], observed, rtol=1e-4, atol=1e-4)
    result = token_contributions(model, tokenizer, "The Eiffel Tower is located in the city of", spec=spec)
    torch.testing.assert_close(result.rollout.sum(-1), torch.ones_like(result.rollout.sum(-1)))


def test_the_figure_draws_every_layer_and_both_rollouts(tmp_path):
    from PIL import Image

    from llm_heatmap.viz import save_figure
    from llm_heatmap.viz.contributions import _shown_layers, plot_token_contributions

    result = token_contributions(tiny_model("llama"), input_ids=prompt_ids())
    attention = torch.full((LENGTH,), 1 / LENGTH)
    figure = plot_token_contributions(result.per_layer, result.input_attribution(), attention, result.tokens)
    assert len(figure.axes) == 2 + 1 + 1  # two layer panels, the colour bar, the bars
    bars = figure.axes[-1].patches
    assert [b.get_height() for b in bars] == pytest.approx([*result.input_attribution().tolist(), *attention.tolist()])
    path = save_figure(figure, tmp_path / "contributions.png")
    assert Image.open(path).size[0] > 300
    assert _shown_layers(30) == [0, 3, 5, 8, 11, 13, 16, 18, 21, 24, 26, 29]
    with pytest.raises(InputError, match="do not match 3 tokens"):
        plot_token_contributions(result.per_layer, result.input_attribution(), attention, ["a", "b", "c"])


def test_row_blocks_give_the_same_matrices(monkeypatch):
    from llm_heatmap.analyses.importance import contributions

    model, ids = tiny_model("qwen2"), prompt_ids()
    whole = token_contributions(model, input_ids=ids)
    monkeypatch.setattr(contributions, "ROW_BLOCK", 3)
    torch.testing.assert_close(token_contributions(model, input_ids=ids).per_layer, whole.per_layer)
