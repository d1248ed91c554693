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
