"""TransformerLens head_detector scores: equal to TransformerLens's own functions, for every head at once."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from transformer_lens import head_detector as tl

from llm_heatmap.analyses import HeadMetricsReducer, detection_patterns, head_detector_scores, repeated_random_tokens
from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec
from llm_heatmap.probes import AttentionCube

NAMES = {"previous_token": "previous_token_head", "duplicate_token": "duplicate_token_head",
         "induction": "induction_head"}


def causal_spec(layers, heads, kv_heads=None):
    return ModelSpec(model_type="test", architecture="Test", num_layers=layers, num_heads=heads,
                     num_kv_heads=kv_heads or heads, head_dim=4, causal=True, layer_types=("full_attention",) * layers)


def cube_from(pattern, spec, ids, tokens=None):
    return AttentionCube.from_pattern(pattern, spec, torch.as_tensor(ids).long(), tokens)


def random_pattern(layers, heads, keys, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(layers, heads, keys, keys, generator=generator)
    causal = torch.ones(keys, keys, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def tl_scores(pattern, ids, **options):
    """TransformerLens's per-head loop, on the same pattern: `"l h d"`."""
    tokens = torch.as_tensor(ids)[None]
    out = torch.empty(*pattern.shape[:2], 3)
    for d, name in enumerate(NAMES.values()):
        detection = getattr(tl, f"get_{name}_detection_pattern")(tokens)
        for layer, head in itertools.product(range(pattern.shape[0]), range(pattern.shape[1])):
            out[layer, head, d] = tl.compute_head_attention_similarity_score(
                pattern[layer, head], detection_pattern=detection, **options)
    return out


def ours(cube, **options):
    table = head_detector_scores(cube, **options)
    return torch.tensor(table[["previous_token_score", "duplicate_token_score", "induction_score"]].to_numpy()).reshape(
        cube.num_layers, cube.num_heads, 3).float()


IDS = [7, 3, 4, 5, 3, 4, 5, 9, 3, 4, 2, 7]


def test_detection_patterns_equal_transformer_lens_builders():
    ids = torch.tensor(IDS)
    mine = detection_patterns(ids)
    for d, name in enumerate(NAMES.values()):
        theirs = getattr(tl, f"get_{name}_detection_pattern")(ids[None])
        assert torch.equal(mine[d], theirs.float()), name


@pytest.mark.parametrize("exclude_bos,exclude_current_token", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("error_measure", ["mul", "abs"])
def test_scores_equal_transformer_lens_on_random_patterns(exclude_bos, exclude_current_token, error_measure):
    pattern = random_pattern(2, 5, len(IDS), seed=1)
    options = dict(exclude_bos=exclude_bos, exclude_current_token=exclude_current_token, error_measure=error_measure)
    expected = tl_scores(pattern, IDS, **options)
    got = ours(cube_from(pattern, causal_spec(2, 5), IDS), **options)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


class _PatternModel:
    """The surface `detect_head` reads (cfg, to_tokens, run_with_cache), serving a fixed pattern."""

    def __init__(self, pattern, ids):
        layers, heads, keys, _ = pattern.shape
        self.cfg = SimpleNamespace(n_layers=layers, n_heads=heads, n_ctx=keys + 1, device="cpu", dtype=torch.float32)
        self._pattern, self._ids = pattern, torch.as_tensor(ids)[None]

    def to_tokens(self, seq):
        return self._ids

    def run_with_cache(self, tokens, remove_batch_dim=True):
        return None, {("pattern", layer, "attn"): self._pattern[layer] for layer in range(self.cfg.n_layers)}


@pytest.mark.parametrize("exclude_bos,exclude_current_token", [(False, False), (True, True)])
def test_scores_equal_detect_head(exclude_bos, exclude_current_token):
    pattern = random_pattern(3, 4, len(IDS), seed=2)
    model = _PatternModel(pattern, IDS)
    got = ours(cube_from(pattern, causal_spec(3, 4), IDS), exclude_bos=exclude_bos,
               exclude_current_token=exclude_current_token)
    for d, name in enumerate(NAMES.values()):
        expected = tl.detect_head(model, "unused", name, exclude_bos=exclude_bos, exclude_current_token=exclude_current_token)
        torch.testing.assert_close(got[..., d], expected, atol=1e-4, rtol=0)


def test_reducer_columns_equal_head_detector_scores_and_last_rows():
    pattern = random_pattern(2, 3, len(IDS), seed=3)
    cube = cube_from(pattern, causal_spec(2, 3), IDS)
    for flags in ({}, {"exclude_bos": True, "exclude_current_token": True}):
        reducer = HeadMetricsReducer(**flags)
        reducer.consume(cube)
        table = reducer.table()
        torch.testing.assert_close(torch.tensor(table[["previous_token_score", "duplicate_token_score",
                                                       "induction_score"]].to_numpy()).reshape(2, 3, 3).float(),
                                   ours(cube, **flags), atol=1e-6, rtol=0)
    # only the last rows kept: the "mul" sums run over those rows of TransformerLens's patterns
    last = cube_from(pattern[..., -4:, :], causal_spec(2, 3), IDS)
    last.query_positions = torch.arange(len(IDS) - 4, len(IDS))
    last.query_mask = torch.ones(4, dtype=torch.bool)
    detection = detection_patterns(torch.tensor(IDS))[:, -4:]
    expected = torch.einsum("lhqk,dqk->lhd", pattern[..., -4:, :], detection) / pattern[..., -4:, :].sum((-1, -2))[..., None]
    torch.testing.assert_close(ours(last), expected, atol=1e-6, rtol=0)
    with pytest.raises(InputError):
        head_detector_scores(last, error_measure="abs")


def test_repeated_random_tokens(smollm2_eager, minilm):
    _, tokenizer, _ = smollm2_eager
    ids = repeated_random_tokens(tokenizer, 25, seed=3)
    assert ids.shape == (1, 51) and ids.dtype == torch.long
    assert ids[0, 0] == tokenizer.bos_token_id
    assert torch.equal(ids[0, 1:26], ids[0, 26:]) and len(set(ids[0, 1:26].tolist())) == 25
    assert not set(ids[0, 1:].tolist()) & set(tokenizer.all_special_ids)
    assert torch.equal(ids, repeated_random_tokens(tokenizer, 25, seed=3))
    assert not torch.equal(ids, repeated_random_tokens(tokenizer, 25, seed=4))
    _, bert_tokenizer, _ = minilm
    assert repeated_random_tokens(bert_tokenizer, 5)[0, 0] == bert_tokenizer.cls_token_id
    with pytest.raises(InputError):
        repeated_random_tokens(tokenizer, 0)


def _eager_cube(model, tokenizer, spec, ids):
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    pattern = torch.stack(out.attentions, 1)[0]
    return cube_from(pattern, spec, ids[0], tokens=tokenizer.convert_ids_to_tokens(ids[0]))


def test_real_smollm2_patterns_equal_transformer_lens(smollm2_eager):
    model, tokenizer, spec = smollm2_eager
    text = tokenizer("The cat sat on the mat. The cat sat on the mat again.", return_tensors="pt")["input_ids"]
    probe = repeated_random_tokens(tokenizer, 20, seed=0)
    induction = {}
    for name, ids in (("text", text), ("repeated", probe)):
        cube = _eager_cube(model, tokenizer, spec, ids)
        for flags in ({}, {"exclude_bos": True, "exclude_current_token": True}):
            torch.testing.assert_close(ours(cube, **flags), tl_scores(cube.pattern, ids[0], error_measure="mul", **{
                "exclude_bos": False, "exclude_current_token": False, **flags}), atol=1e-4, rtol=0)
        induction[name] = ours(cube, exclude_bos=True)[..., 2]
    # induction is defined on the repeated half: a few SmolLM2 heads do it, most do not
    assert induction["repeated"].max() > 0.5 and induction["repeated"].median() < 0.1


def test_induction_probe_finds_induction_heads_on_smollm2(smollm2, smollm2_eager):
    from llm_heatmap.analyses import induction_probe_scores

    model, tokenizer, spec = smollm2
    scores = induction_probe_scores(model, tokenizer, spec=spec, length=30)
    assert len(scores) == spec.num_layers * spec.num_heads
    assert list(scores.columns[3:]) == ["probe_previous_token_score", "probe_duplicate_token_score",
                                        "probe_induction_score"]
    # copying the repeated half is what a trained decoder learns: some heads do it, most do not
    assert scores["probe_induction_score"].max() > 0.5 > scores["probe_induction_score"].median()
    # reference: TransformerLens's own score on eager output_attentions of the same sequence
    ids = repeated_random_tokens(tokenizer, 30, 0)
    with torch.no_grad():
        attentions = smollm2_eager[0](input_ids=ids, output_attentions=True).attentions
    detection = tl.get_induction_head_detection_pattern(ids[0]).float()
    for row in scores.nlargest(3, "probe_induction_score").itertuples():
        pattern = attentions[row.layer][0, row.head].float()
        expected = tl.compute_head_attention_similarity_score(pattern, detection, exclude_bos=True,
                                                              exclude_current_token=False, error_measure="mul")
        assert abs(row.probe_induction_score - expected) < 1e-3
