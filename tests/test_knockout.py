"""Attention knockout inside the kernel, against eager forwards with the same edges masked: a custom 4D mask
handed to an eager model (every layer), and per-layer masks put into chosen eager layers by forward pre-hooks
(a layer window, chosen heads). Neither reference goes through transformers' attention registries."""

from __future__ import annotations

import pytest
import torch

from llm_heatmap.analyses.importance.knockout import Edges, knocked_out, knockout_effect, knockout_scan
from llm_heatmap.errors import InputError
from llm_heatmap.models import spec_from_model
from tiny_models import ENCODERS, FAMILIES, SDPA_UNSUPPORTED, VOCAB, tiny_model

DECODERS = [family for family in FAMILIES if family not in ENCODERS]
LENGTH = 9
BLOCKED = torch.finfo(torch.float32).min


def prompt_ids(length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def additive_mask(length: int, window: int | None, cut: list[tuple[int, int]], heads: int = 1) -> torch.Tensor:
    """`"1 h q k"` float: causal (and sliding-window) cells blocked, then the `cut` (query, key) cells."""
    rows, columns = torch.arange(length)[:, None], torch.arange(length)[None, :]
    visible = columns <= rows
    if window is not None:
        visible &= rows - columns < window
    mask = torch.zeros(length, length).masked_fill(~visible, BLOCKED)
    mask = mask.expand(heads, length, length).clone()
    for query, key in cut:
        mask[:, query, key] = BLOCKED
    return mask[None]


def eager_reference(family: str, ids: torch.Tensor, cut: list[tuple[int, int]]) -> torch.Tensor:
    """Logits of the eager model given a custom 4D mask with `cut` blocked (per layer type where the model
    mixes full and sliding layers)."""
    model = tiny_model(family, "eager")
    window = getattr(model.config, "sliding_window", None)
    full, sliding = additive_mask(LENGTH, None, cut), additive_mask(LENGTH, window, cut)
    types = set(getattr(model.config, "layer_types", None) or [])
    mask = {"full_attention": full, "sliding_attention": sliding} if "sliding_attention" in types else \
        (sliding if window is not None and family == "mistral" else full)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[0]


CUT = [(8, 2), (8, 3), (8, 4), (6, 1)]


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("family", DECODERS)
def test_knockout_equals_an_eager_forward_with_the_edges_masked(family, kernel):
    if kernel == "sdpa" and family in SDPA_UNSUPPORTED:
        pytest.skip(f"{family} runs eager only")
    model, ids = tiny_model(family, kernel), prompt_ids()
    edges = [Edges(queries=(8,), keys=(2, 3, 4)), Edges(queries=(6,), keys=(1,))]
    with torch.no_grad():
        plain = model(input_ids=ids).logits[0]
        with knocked_out(model, edges):
            assert model.config._attn_implementation not in ("sdpa", "eager")
            knocked = model(input_ids=ids).logits[0]
        after = model(input_ids=ids).logits[0]
    assert model.config._attn_implementation == kernel
    torch.testing.assert_close(knocked, eager_reference(family, ids, CUT), rtol=1e-5, atol=1e-5)
    assert (knocked - plain).abs().max() > 1e-3  # the cut changed something...
    assert torch.equal(after, plain)  # ...and nothing of it stays behind
    torch.testing.assert_close(knocked[:6], plain[:6])  # rows before the first cut query are untouched


def per_layer_reference(model, ids, layers, heads, cut):
    """Eager logits with `cut` blocked only in `layers` and `heads`: a forward pre-hook on each chosen decoder
    layer replaces the mask it is handed by a per-head one."""
    spec = spec_from_model(model)
    mask = additive_mask(LENGTH, None, [], spec.num_heads)
    for query, key in cut:
        mask[0, list(heads), query, key] = BLOCKED

    def swap_mask(module, args, kwargs):
        return args, {**kwargs, "attention_mask": mask}

    hooks = [model.get_submodule(spec.attention_modules[layer].rpartition(".")[0])
             .register_forward_pre_hook(swap_mask, with_kwargs=True) for layer in layers]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    for hook in hooks:
        hook.remove()
    return logits


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_layer_window_and_chosen_heads_equal_per_layer_eager_masks(family):
    ids = prompt_ids()
    model = tiny_model(family, "sdpa")
    edges = [Edges(queries=(8,), keys=(2, 5), layers=(1,), heads=(0, 3))]
    with torch.no_grad(), knocked_out(model, edges):
        knocked = model(input_ids=ids).logits[0]
    reference = per_layer_reference(tiny_model(family, "eager"), ids, (1,), (0, 3), [(8, 2), (8, 5)])
    torch.testing.assert_close(knocked, reference, rtol=1e-5, atol=1e-5)
    everywhere = per_layer_reference(tiny_model(family, "eager"), ids, (0, 1), (0, 1, 2, 3), [(8, 2), (8, 5)])
    assert (knocked - everywhere).abs().max() > 1e-4  # the window and the heads are respected


def test_effect_and_scan():
    model, ids = tiny_model("llama"), prompt_ids()
    edges = [Edges(queries=(-1,), keys=(2, 3))]
    effect = knockout_effect(model, input_ids=ids, edges=edges)
    with torch.no_grad():
        log_probs = torch.log_softmax(eager_reference("llama", ids, [(8, 2), (8, 3)])[-1].double(), -1)
    assert effect.knocked_log_prob == pytest.approx(float(log_probs[effect.target_id]), abs=1e-5)
    assert effect.change == pytest.approx(effect.knocked_log_prob - effect.log_prob)
    # an edge the causal mask already forbids changes nothing
    assert knockout_effect(model, input_ids=ids, edges=[Edges(queries=(3,), keys=(7,))]).change == 0.0

    scan = knockout_scan(model, input_ids=ids, spans={"2-3": (2, 3), "5": (5,)}, window=3)
    assert list(scan.columns) == ["layer", "span", "log_prob", "knocked_log_prob", "change",
                                  "relative_probability_change"]
    assert len(scan) == 2 * 2
    both_layers = scan[(scan.layer == 0) & (scan.span == "2-3")].iloc[0]  # window 3 around layer 0: layers 0-1
    assert both_layers.knocked_log_prob == pytest.approx(effect.knocked_log_prob, abs=1e-9)
    assert len(knockout_scan(model, input_ids=ids, window=1)) == 2 * (LENGTH - 1)


def test_refusals():
    model, ids = tiny_model("llama"), prompt_ids()
    with pytest.raises(InputError, match="cuts every key a query position may see"):
        knockout_effect(model, input_ids=ids, edges=[Edges(queries=(0,), keys=(0,))])
    with pytest.raises(InputError, match="knockout layer 5 is outside the model's 2 layers; pass 0 to 1"):
        knockout_effect(model, input_ids=ids, edges=[Edges(queries=(8,), keys=(1,), layers=(5,))])
    with pytest.raises(InputError, match="no LM head"):
        knockout_effect(tiny_model("bert"), input_ids=ids, edges=[Edges(queries=(8,), keys=(1,))])
    with pytest.raises(InputError, match="not nested"), knocked_out(model, []), knocked_out(model, []):
        pass
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_smollm2_knockout_equals_eager_masking(smollm2, smollm2_eager):
    model, tokenizer, spec = smollm2
    prompt = "The Eiffel Tower is located in the city of"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    length = ids.shape[1]
    subject = (1, 2, 3)  # " E", "iffel", " Tower"
    effect = knockout_effect(model, tokenizer, prompt, edges=[Edges(queries=(-1,), keys=subject)], spec=spec)
    cut = [(length - 1, key) for key in subject]
    mask = torch.zeros(length, length).masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), BLOCKED)
    for query, key in cut:
        mask[query, key] = BLOCKED
    with torch.no_grad():
        logits = smollm2_eager[0](input_ids=ids, attention_mask=mask[None, None]).logits[0, -1]
    reference = float(torch.log_softmax(logits.double(), -1)[effect.target_id])
    assert effect.target == " Paris"
    assert effect.knocked_log_prob == pytest.approx(reference, abs=2e-3)  # sdpa against eager in fp32
    assert effect.change < -0.2  # far beyond the tolerance: cutting the subject costs " Paris" probability


def test_the_scan_figure_has_one_row_per_span():
    from llm_heatmap.viz.contributions import plot_knockout_scan

    model, ids = tiny_model("llama"), prompt_ids()
    scan = knockout_scan(model, input_ids=ids, spans={"b": (5,), "a": (2, 3)}, window=1)
    figure = plot_knockout_scan(scan)
    image = figure.axes[0].images[0].get_array()
    assert image.shape == (2, 2)  # spans x layers, spans in the order given
    row = scan[(scan.span == "b") & (scan.layer == 1)].relative_probability_change.iloc[0]
    assert float(image[0, 1]) == pytest.approx(100 * row)
    with pytest.raises(InputError, match="lacks column"):
        plot_knockout_scan(scan.drop(columns="span"))
