"""EntropyTerms (p ln p from the softmax's scores), from torch and from the native softmax, against the direct
-sum p ln p, on rows built to break it, and the metrics table of a capture that hands the terms to the reducer
against the table from the weights alone (both softmaxes)."""

from __future__ import annotations

import pytest
import torch

from llm_heatmap.analyses import HeadMetricsReducer, head_metrics
from llm_heatmap.probes import AttentionCube, capture
from llm_heatmap.probes import native_softmax
from llm_heatmap.probes.entropy_terms import EntropyTerms
from eager_reference import softmax_with_sinks
from tiny_models import VOCAB, tiny_gpt_oss, tiny_model

FLOOR = torch.finfo(torch.float32).min
PATHS = ["torch", "native"]


def _direct(probs: torch.Tensor) -> torch.Tensor:
    probs = probs.double()
    return -torch.xlogy(probs, probs).sum(-1)


def _terms(scores: torch.Tensor, path: str, sinks: torch.Tensor | None = None,
           key_weights: torch.Tensor | None = None) -> tuple[EntropyTerms, torch.Tensor]:
    """Terms and probabilities of rows `"... k"` (`sinks` `"... 1"`: one per row; `key_weights` `"... k"`)."""
    if path == "torch":
        probs = softmax_with_sinks(scores, sinks)
        weights = None if key_weights is None else key_weights.reshape(-1, scores.shape[-1])
        flat = EntropyTerms.from_scores(scores.reshape(1, -1, 1, scores.shape[-1]).clone(),
                                        probs.reshape(1, -1, 1, scores.shape[-1]), weights)
    else:  # every row its own head, so that a sink and key weights can differ per row
        block = scores.reshape(1, -1, 1, scores.shape[-1])
        probs, sums, peak, _ = native_softmax.softmax(
            block, sinks=None if sinks is None else sinks.reshape(-1),
            key_weights=None if key_weights is None else key_weights.reshape(-1, scores.shape[-1]))
        flat = EntropyTerms(sums, peak)
        torch.testing.assert_close(probs.reshape(scores.shape), softmax_with_sinks(scores, sinks), atol=1e-6, rtol=2e-6)
        probs = probs.reshape(scores.shape)
    return EntropyTerms(flat.sums.reshape(*scores.shape[:-1], -1), flat.peak.reshape(scores.shape[:-1])), probs


def _check(scores: torch.Tensor, path: str, sinks: torch.Tensor | None = None, atol: float = 2e-6) -> torch.Tensor:
    key_weights = torch.rand(scores.shape, generator=torch.Generator().manual_seed(11)) * 3
    terms, probs = _terms(scores, path, sinks, key_weights)
    mine = terms.entropy(probs.sum(-1))
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine.double(), _direct(probs), atol=atol, rtol=1e-5)
    torch.testing.assert_close(terms.peak, probs.amax(-1), atol=1e-7, rtol=1e-6)
    # weighted by the value norms: sum_j p_j ln p_j w_j
    weighted = terms.plogp_sums(torch.stack([probs.sum(-1), (probs * key_weights).sum(-1)], -1))[..., 1]
    direct = (torch.xlogy(probs.double(), probs.double()) * key_weights).sum(-1)
    torch.testing.assert_close(weighted.double(), direct, atol=3 * atol, rtol=1e-5)
    return mine


@pytest.mark.parametrize("softmax_path", PATHS, indirect=True)
def test_random_rows_with_large_offsets(softmax_path):
    """Scores of a few hundred: ln Z and sum p s are each ~300 and would cancel without the shift."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 6, 64, generator=generator) * 3 + torch.linspace(-300, 300, 6)[None, :, None]
    _check(scores, softmax_path)


@pytest.mark.parametrize("softmax_path", PATHS, indirect=True)
def test_peaked_rows(softmax_path):
    scores = torch.full((3, 50), -10.0)
    scores[0, 7] = 40.0  # one key has essentially all the mass
    scores[1, :2] = 25.0  # two keys split it
    scores[2, 3] = 12.0  # a peak with a visible tail
    entropy = _check(scores, softmax_path, atol=1e-6)
    assert entropy[0] >= 0 and entropy[1] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)


@pytest.mark.parametrize("softmax_path", PATHS, indirect=True)
def test_keys_masked_at_the_float32_minimum_and_fully_masked_rows(softmax_path):
    scores = torch.randn(3, 10, generator=torch.Generator().manual_seed(1)) * 5
    scores[0, 3:] = FLOOR  # causal-style mask at float32's minimum (what the capture writes)
    scores[1, :] = FLOOR  # fully masked row: softmax is uniform, entropy ln 10
    scores[2, 1:] = FLOOR  # one key left: entropy 0
    entropy = _check(scores, softmax_path)
    assert entropy[1] == pytest.approx(torch.log(torch.tensor(10.0)).item(), abs=1e-6)
    assert entropy[2] == 0


@pytest.mark.parametrize("softmax_path", PATHS, indirect=True)
def test_a_score_of_minus_infinity_reads_as_not_finite(softmax_path):
    """A model's own -inf mask: 0 x -inf is NaN, which tells the caller to fall back to the log per entry."""
    scores = torch.randn(2, 10, generator=torch.Generator().manual_seed(4))
    scores[0, ::2] = float("-inf")
    terms, probs = _terms(scores, softmax_path)
    entropy = terms.entropy(probs.sum(-1))
    assert not entropy[0].isfinite() and entropy[1].isfinite()


@pytest.mark.parametrize("softmax_path", PATHS, indirect=True)
def test_softcapped_scores(softmax_path):
    raw = torch.randn(8, 32, generator=torch.Generator().manual_seed(2)) * 40
    softcap = 5.0
    _check(torch.tanh(raw / softcap) * softcap, softmax_path)


@pytest.mark.parametrize("softmax_path", PATHS, indirect=True)
def test_sinks_take_mass_outside_the_keys(softmax_path):
    scores = torch.randn(4, 20, generator=torch.Generator().manual_seed(3)) * 4
    sinks = torch.tensor([[3.0], [-2.0], [30.0], [0.0]])
    _check(scores, softmax_path, sinks)


@pytest.mark.parametrize("softmax_path", PATHS, indirect=True)
def test_a_row_whose_weights_are_all_zero_reads_as_not_finite(softmax_path):
    """Everything on a sink: the largest weight is 0, so ln of it is -inf; the caller falls back."""
    scores = torch.full((1, 20), FLOOR)
    terms, probs = _terms(scores, softmax_path, torch.tensor([[1.0]]))
    assert (probs == 0).all() and not terms.entropy(probs.sum(-1)).isfinite().any()


@pytest.mark.parametrize("softmax_path", PATHS, indirect=True)
def test_select_keeps_rows_and_peaks_together(softmax_path):
    scores = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(5)) * 6
    terms, probs = _terms(scores, softmax_path)
    rows = torch.tensor([0, 2])
    chosen = terms.select(1, rows)
    torch.testing.assert_close(chosen.entropy(probs[:, rows].sum(-1)), terms.entropy(probs.sum(-1))[:, rows])


# ---- through the capture: the reducer's table with the capture's terms equals the one from the weights alone ----

class _TermsRecorder:
    takes_trimmed_parts = True
    takes_entropy_terms = True

    def __init__(self):
        self.with_terms = 0

    def consume(self, part):
        terms = part.stream.entropy_terms
        if terms is not None:
            self.with_terms += 1
            columns = 1 if part.value_norms is None else 2
            assert terms.sums.shape == (*part.pattern.shape[:-1], columns)
            assert terms.peak.shape == part.pattern.shape[:-1]


def _streamed_and_kept(model, ids, **options):
    recorder, reducer = _TermsRecorder(), HeadMetricsReducer()
    with torch.no_grad(), capture(model, consumers=[recorder, reducer], chunk_rows=5, **options) as probe:
        model(input_ids=ids)
    return recorder, reducer.table(), head_metrics(probe.cube(ids))


@pytest.mark.parametrize("softmax_path", PATHS, indirect=True)
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_oss"])
@pytest.mark.parametrize("computed", [False, True])
def test_streamed_tables_from_terms_equal_the_tables_from_the_weights(family, computed, softmax_path):
    """Sliding windows (gemma3), sinks (gpt-oss), value norms, a head subset; the kept cube's table is computed
    from its weights alone (replayed parts carry no terms)."""
    model = tiny_gpt_oss() if family == "gpt_oss" else tiny_model(family)
    ids = torch.randint(0, VOCAB, (1, 23), generator=torch.Generator().manual_seed(7))
    recorder, streamed, kept = _streamed_and_kept(model, ids, compute_output=computed, value_norms=True, heads=(0, 2, 3))
    assert recorder.with_terms == len(streamed) // 3 * 5  # every part of every layer
    numeric = [c for c in kept.columns if kept[c].dtype.kind in "fi"]
    assert "norm_weighted_entropy" in numeric
    torch.testing.assert_close(torch.tensor(streamed[numeric].to_numpy(float)), torch.tensor(kept[numeric].to_numpy(float)),
                               atol=2e-6, rtol=1e-5)


def test_a_pattern_kept_in_another_dtype_gets_no_terms():
    """The terms are those of the fp32 weights; a part holding float16 weights is measured from them alone."""
    model = tiny_model("llama")
    recorder = _TermsRecorder()
    with torch.no_grad(), capture(model, consumers=[recorder], keep=False, dtype=torch.float16):
        model(input_ids=torch.randint(0, VOCAB, (1, 9)))
    assert recorder.with_terms == 0


def test_terms_that_are_not_finite_fall_back_to_the_log_of_every_weight():
    probs = torch.softmax(torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(8)), -1)
    broken = EntropyTerms(sums=torch.full_like(probs[..., :1], float("nan")), peak=probs.amax(-1))
    reducer = HeadMetricsReducer()
    mass = probs.sum(-1, keepdim=True)
    torch.testing.assert_close(reducer._plogp_sums(probs, broken, None, mass),
                               torch.xlogy(probs, probs).sum(-1, keepdim=True))


def test_a_part_with_terms_saves_where_it_sits_without_them(tmp_path):
    class Keep(_TermsRecorder):
        def consume(self, part):
            super().consume(part)
            self.part = part

    keeper, model = Keep(), tiny_model("llama")
    with torch.no_grad(), capture(model, consumers=[keeper], keep=False, chunk_rows=4):
        model(input_ids=torch.randint(0, VOCAB, (1, 10)))
    assert keeper.part.stream.entropy_terms is not None
    loaded = AttentionCube.load(keeper.part.save(tmp_path / "part.safetensors"))
    assert loaded.stream.entropy_terms is None
    assert loaded.stream.header() == keeper.part.stream.header() and loaded.stream.row_start == 8
