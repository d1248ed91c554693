"""The native softmax (`probes/native_softmax.py`) against torch: probabilities, entropy terms, largest weights and key
column products, on blocks laid out as the capture writes them; its build and its fallback; and the metrics table of
a capture whose reducer takes the key column products from it."""

from __future__ import annotations

import shutil

import pytest
import torch

from llm_heatmap.analyses import HeadMetricsReducer, head_metrics
from llm_heatmap.errors import InputError
from llm_heatmap.probes import Downsampler, capture, downsample
from llm_heatmap.probes import native_softmax
from llm_heatmap.probes.entropy_terms import EntropyTerms
from eager_reference import softmax_with_sinks
from tiny_models import VOCAB, tiny_model

FLOOR = torch.finfo(torch.float32).min


@pytest.mark.parametrize("softmax_path", ["native"], indirect=True)
def test_native_block_with_heads_sinks_value_norms_and_strided_rows(softmax_path):
    """A "b h q k" block written into the rows of a wider cube buffer, as the kept capture does: probabilities,
    sums and peaks per head against torch, and nothing outside those rows touched."""
    generator = torch.Generator().manual_seed(12)
    heads, rows, keys = 4, 7, 37
    scores = torch.randn(1, heads, rows, keys, generator=generator) * 5
    scores[..., 30:] = FLOOR
    sinks, norms = torch.randn(heads, generator=generator) * 4, torch.rand(heads, keys, generator=generator)
    cube = torch.full((1, 3, heads, 20, 40), 7.0)
    into = cube[:, 1, :, 5:12, :keys]
    probs, sums, peak, _ = native_softmax.softmax(scores, into, sinks, norms)
    assert probs.data_ptr() == into.data_ptr()
    expected = softmax_with_sinks(scores, sinks[None, :, None, None])
    torch.testing.assert_close(into, expected, atol=1e-6, rtol=2e-6)
    untouched = cube.clone()
    untouched[:, 1, :, 5:12, :keys] = 7.0
    assert (untouched == 7.0).all()
    reference = EntropyTerms.from_scores(scores.clone(), expected, norms)
    torch.testing.assert_close(sums, reference.sums, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(peak, reference.peak, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("softmax_path", ["native"], indirect=True)
def test_native_softmax_splits_rows_over_threads_and_batches(softmax_path):
    scores = torch.randn(2, 3, 50, 64, generator=torch.Generator().manual_seed(13)) * 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        probs, sums, _, _ = native_softmax.softmax(scores)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(probs, scores.softmax(-1), atol=1e-6, rtol=2e-6)
    torch.testing.assert_close(sums, EntropyTerms.from_scores(scores.clone(), scores.softmax(-1)).sums, atol=2e-6, rtol=1e-5)


def test_the_native_softmax_leaves_what_it_does_not_take_to_torch():
    scores = torch.randn(1, 2, 3, 8)
    assert native_softmax.softmax(scores.half()) is None
    assert native_softmax.softmax(scores.transpose(-1, -2)) is None  # keys not contiguous


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine: the torch softmax is used")
def test_the_native_softmax_builds_on_a_machine_with_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_HEATMAP_CACHE", str(tmp_path))
    monkeypatch.delenv("LLM_HEATMAP_NATIVE", raising=False)
    native_softmax._kernel.cache_clear()
    try:
        assert native_softmax.available()
        assert len(list((tmp_path / "native").glob("softmax_rows-*.so"))) == 1
    finally:
        native_softmax._kernel.cache_clear()


def test_a_required_native_softmax_that_cannot_be_built_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_HEATMAP_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "llm-heatmap-no-such-compiler")
    native_softmax._kernel.cache_clear()
    try:
        monkeypatch.setenv("LLM_HEATMAP_NATIVE", "auto")
        assert not native_softmax.available()  # falls back to torch
        native_softmax._kernel.cache_clear()
        monkeypatch.setenv("LLM_HEATMAP_NATIVE", "1")
        with pytest.raises(native_softmax.NativeUnavailable, match="no C compiler"):
            native_softmax.available()
    finally:
        native_softmax._kernel.cache_clear()


@pytest.mark.parametrize("softmax_path", ["native"], indirect=True)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("heads, rows", [(3, 11), (1, 50)])
@pytest.mark.parametrize("with_row_weights", [True, False])
def test_key_columns_and_row_weights_are_multiplied_in_the_pass(softmax_path, threads, heads, rows, with_row_weights):
    """Key columns shared by every head (an expanded "f k") and per head, and two groups of row weights (rows may
    count in several groups, or none), against einsum. The rows are cut into equal ranges, one a thread (at least
    16 rows each): with two or three threads a range begins inside a head (3 x 11 rows: head 1 at its sixth row;
    1 x 50: the head is cut in three), which adds its share of the head's row sums after the others. 11 rows a head:
    the C loop multiplies four rows of a head at a time, so heads end on a partial four."""
    generator = torch.Generator().manual_seed(14)
    keys = 40
    scores = torch.randn(1, heads, rows, keys, generator=generator) * 4
    scores[..., 33:] = FLOOR
    shared = torch.randn(2, keys, generator=generator) * torch.arange(keys)
    per_head = torch.randn(heads, 3, keys, generator=generator)
    bins = torch.nn.functional.one_hot(torch.arange(rows) // 4).T.float()  # "g q": 3 bins of rows
    spread = (torch.rand(1, rows, generator=generator) > 0.3).float() * 0.5
    factors = native_softmax.Factors(key_columns=(shared.expand(heads, -1, -1), per_head),
                                     row_weights=(bins, spread) if with_row_weights else ())
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        result = native_softmax.softmax(scores, factors=factors).products
    finally:
        torch.set_num_threads(saved)
    probs = softmax_with_sinks(scores)
    torch.testing.assert_close(result.key_sums[0], torch.einsum("bhqk,fk->bhqf", probs, shared), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(result.key_sums[1], torch.einsum("bhqk,hfk->bhqf", probs, per_head), atol=1e-5, rtol=1e-5)
    assert len(result.row_sums) == (2 if with_row_weights else 0)
    for sums, weights in zip(result.row_sums, (bins, spread)):
        torch.testing.assert_close(sums, torch.einsum("gq,bhqk->bhgk", weights, probs), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("softmax_path", ["native", "torch"], indirect=True)
def test_a_block_in_place_is_written_over_its_scores_and_leaves_out_untouched(softmax_path):
    """`KernelCall.pattern(in_place=True)`, as a streaming capture calls it: the native softmax writes the block over
    its scores (the call's scores memory) and never touches `out`; torch's writes into `out`. Both equal the
    block computed out of place."""
    from llm_heatmap.probes.tap import KernelCall

    generator = torch.Generator().manual_seed(8)
    query, key = torch.randn(1, 4, 9, 8, generator=generator), torch.randn(1, 2, 9, 8, generator=generator)
    call = KernelCall(query=query, key=key, mask=None, scaling=0.3, causal="top_left")
    heads = torch.arange(4)
    expected = call.pattern(heads, 3, 7, pad=False).clone()
    out = torch.full((1, 4, 4, 7), float("nan"))
    got = call.pattern(heads, 3, 7, pad=False, out=out, in_place=True)
    torch.testing.assert_close(got, expected)
    scores = call.scores_memory.view((1, 4, 4, 7), torch.float32, "cpu")
    if softmax_path == "native":
        assert got.data_ptr() == scores.data_ptr() and out.isnan().all()
    else:
        assert got.data_ptr() == out.data_ptr()


def _rule_allowed(rows: int, keys: int, rule: native_softmax.KeyRule) -> torch.Tensor:
    """bool "q k", written out from the kernels' rule: row i's own key is d = diagonal + i; causal rows see j <= d,
    a window of w keys only |j - d| < w."""
    d = torch.arange(rows)[:, None] + rule.diagonal
    j = torch.arange(keys)[None, :]
    allowed = j <= d if rule.causal else torch.ones(rows, keys, dtype=torch.bool)
    return allowed & ((d - j).abs() < rule.window) if rule.window else allowed


@pytest.mark.parametrize("softmax_path", ["native"], indirect=True)
@pytest.mark.parametrize("rule", [native_softmax.KeyRule(29, True), native_softmax.KeyRule(0, True),
                                  native_softmax.KeyRule(25, True, 6), native_softmax.KeyRule(10, False, 7)],
                         ids=["causal", "causal-first-block", "causal-window", "bidirectional-window"])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_key_rule_applied_in_the_pass_equals_the_rule_filled_into_the_scores(softmax_path, rule, threads):
    """The kernel's causal / window rule applied by the pass (no score of a blocked key read: they hold NaN here)
    against the same pass over scores with the rule filled in as the lowest score, as `KernelCall` does without
    it: probabilities (also against torch), entropy sums with value norms, largest weights and the products,
    with a sink; twice, so that the second call's row sums land in memory the first one's left behind."""
    generator = torch.Generator().manual_seed(21)
    heads, rows, keys = 3, 11, 40
    scores = torch.randn(1, heads, rows, keys, generator=generator) * 4
    allowed = _rule_allowed(rows, keys, rule)
    sinks, norms = torch.randn(heads, generator=generator), torch.rand(heads, keys, generator=generator)
    bins = torch.nn.functional.one_hot(torch.arange(rows) // 4).T.float()
    factors = native_softmax.Factors(key_columns=(torch.randn(heads, 3, keys, generator=generator),),
                                     row_weights=(bins,))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for _ in range(2):
            ruled = native_softmax.softmax(scores.masked_fill(~allowed, float("nan")), sinks=sinks, key_weights=norms,
                                           factors=factors, rule=rule)
            filled = native_softmax.softmax(scores.masked_fill(~allowed, FLOOR), sinks=sinks, key_weights=norms,
                                            factors=factors)
            torch.testing.assert_close(ruled.probs, filled.probs, atol=1e-7, rtol=1e-6)
            assert (ruled.probs[..., ~allowed] == 0).all()
            torch.testing.assert_close(ruled.probs, softmax_with_sinks(scores.masked_fill(~allowed, float("-inf")),
                                                                       sinks[None, :, None, None]), atol=1e-6, rtol=2e-6)
            for got, expected in [(ruled.sums, filled.sums), (ruled.peaks, filled.peaks),
                                  *zip(ruled.products.key_sums, filled.products.key_sums),
                                  *zip(ruled.products.row_sums, filled.products.row_sums)]:
                torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
            del ruled, filled
    finally:
        torch.set_num_threads(saved)


class _ProductsRecorder:
    takes_trimmed_parts = True

    def __init__(self, *consumers):
        self.consumers, self.given, self.parts = consumers, 0, 0

    def consume(self, part):
        self.parts += 1
        self.given += all((part.stream.products or {}).get(consumer) is not None for consumer in self.consumers)


@pytest.mark.parametrize("softmax_path", ["native", "torch"], indirect=True)
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("computed", [False, True])
@pytest.mark.parametrize("value_norms", [False, True])
def test_consumers_take_their_products_from_the_pass_and_their_results_stay_the_same(softmax_path, keep, computed,
                                                                                     value_norms):
    """Every part of a capture of every head carries the reducer's and the Downsampler's products where the native
    softmax runs (none with torch); the streamed table and pooled grid equal those of the kept cube, which they
    measure with their own matmuls and index sums."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 23), generator=torch.Generator().manual_seed(15))
    reducer, sampler = HeadMetricsReducer(), Downsampler(6, weighting="norms" if value_norms else "weights")
    recorder = _ProductsRecorder(reducer, sampler)
    with torch.no_grad(), capture(model, consumers=[reducer, sampler, recorder], chunk_rows=5, compute_output=computed,
                                  value_norms=value_norms, keep=keep):
        model(input_ids=ids)
    with torch.no_grad(), capture(model, value_norms=value_norms) as probe:
        model(input_ids=ids)
    cube = probe.cube(ids)
    assert recorder.given == (recorder.parts if softmax_path == "native" else 0) and recorder.parts > 0
    kept, streamed = head_metrics(cube), reducer.table()
    assert ("norm_weighted_entropy" in streamed.columns) == value_norms
    numeric = [c for c in kept.columns if kept[c].dtype.kind in "fi"]
    torch.testing.assert_close(torch.tensor(streamed[numeric].to_numpy(float)), torch.tensor(kept[numeric].to_numpy(float)),
                               atol=2e-6, rtol=1e-5)
    pooled = downsample(cube.norm_weighted() if value_norms else cube, 6)
    torch.testing.assert_close(sampler.cube().pattern, pooled.pattern, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("softmax_path", ["native"], indirect=True)
def test_factors_that_do_not_cover_the_block_are_refused_before_the_loop_reads_them(softmax_path):
    scores = torch.randn(1, 3, 4, 10)
    for factors in (native_softmax.Factors(key_columns=(torch.ones(3, 2, 9),)),
                    native_softmax.Factors(key_columns=(torch.ones(2, 2, 10),)),
                    native_softmax.Factors(row_weights=(torch.ones(1, 5),)),
                    native_softmax.Factors(key_columns=(torch.ones(3, 40, 10), torch.ones(3, 25, 10))),
                    native_softmax.Factors(row_weights=(torch.ones(1, 4),) * 65)):
        with pytest.raises(InputError, match="must cover the part"):
            native_softmax.softmax(scores, factors=factors)
    with pytest.raises(InputError, match=r"key weights \(3, 9\)"):
        native_softmax.softmax(scores, key_weights=torch.ones(3, 9))


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine: the torch softmax is used")
def test_a_compiler_without_openmp_builds_it_for_one_thread(monkeypatch, tmp_path):
    compiler = tmp_path / "cc-without-openmp"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && { echo "unsupported option -fopenmp" >&2; '
                        f'exit 1; }}; done\nexec {shutil.which("cc")} "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("LLM_HEATMAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLM_HEATMAP_NATIVE", "1")
    native_softmax._kernel.cache_clear()
    try:
        scores = torch.randn(1, 4, 30, 50, generator=torch.Generator().manual_seed(16))
        torch.testing.assert_close(native_softmax.softmax(scores).probs, scores.softmax(-1), atol=1e-6, rtol=2e-6)
    finally:
        native_softmax._kernel.cache_clear()


def test_an_unknown_native_setting_is_refused_in_one_sentence(monkeypatch):
    monkeypatch.setenv("LLM_HEATMAP_NATIVE", "yes")
    native_softmax._kernel.cache_clear()
    try:
        with pytest.raises(InputError, match="LLM_HEATMAP_NATIVE='yes' is not one of auto, 0, 1"):
            native_softmax.available()
    finally:
        monkeypatch.delenv("LLM_HEATMAP_NATIVE")
        native_softmax._kernel.cache_clear()
