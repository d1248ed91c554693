"""Row entropy and largest weight of a captured block: the log per entry, the entropy terms in torch, and the native
softmax that gives them in its own pass.

    .venv/bin/python benchmarks/bench_entropy.py [--lengths 2048 8192] [--threads 1 2]

The metrics reducer needs, per row of a block, the entropy -sum p ln p and the largest weight. It
computes them with a log per entry and a row maximum of the weights, or, where the capture hands
it the block's entropy terms (`probes/entropy_terms.py`, issue 26's "entropy from the scores"),
from p (s - max s) and the weight at the largest score. Timed on row blocks shaped as the capture
streams them for SmolLM2 (9 heads, the rows `stream.auto_chunk_rows` gives at that length, every
key), with the block's own softmax as the baseline measured in the same run:

  softmax                 the capture's softmax of the block (the baseline)
  p ln p + row max        the reducer's pass without terms: clamp, log, multiply, row sum; row maximum
  entropy terms           row maxima of the scores and of the weights, subtract, multiply (in place of the
                          scores), then the row sum: what the capture and the reducer now do
  copy of the scores      part of the line above here only: the timed call overwrites the scores, so
                          every repetition first copies them back; "less the copy" leaves it out
  native softmax + terms  `probes/native_softmax.py`: the softmax, the terms' row sums and the largest
                          weight in one pass per row; in place of the softmax and the line above together
                          (the "softmax + terms in torch" line)
  products in torch       what the streaming grid and metrics multiply each block by (`Factors`: the
                          metrics' five key features and two value-norm columns, its column sums' row
                          weights and the Downsampler's row bins), as matrix products after the softmax
  native + products       the native softmax with those factors, in its pass: in place of the native
                          line and the products in torch together
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llm_heatmap.probes import native_softmax
from llm_heatmap.probes.entropy_terms import EntropyTerms
from llm_heatmap.probes.stream import auto_chunk_rows

HEADS = 9


def block(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = auto_chunk_rows(1, HEADS, length, length)
    scores = torch.randn(HEADS, rows, length, generator=torch.Generator().manual_seed(length)) * 3
    return scores, torch.softmax(scores, -1)


def p_ln_p(probs: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    entropy = torch.clamp_min(probs, torch.finfo(probs.dtype).tiny, out=scratch).log_().mul_(probs).sum(-1).neg_()
    return entropy, probs.amax(-1)


def from_terms(scores: torch.Tensor, probs: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    terms = EntropyTerms.from_scores(scratch.copy_(scores), probs)
    return terms.entropy(probs.new_ones(probs.shape[:-1])), terms.peak


def native(scores: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _, sums, peak, _ = native_softmax.softmax(scores[None], probs[None])
    return -(sums[0, ..., 0] + peak[0].log()), peak[0]


def factors(scores: torch.Tensor) -> native_softmax.Factors:
    """The factors HeadMetricsReducer and Downsampler(256) ask for a block of the first rows (`CubeConsumer`)."""
    heads, rows, keys = scores.shape
    generator = torch.Generator().manual_seed(keys)
    features = torch.rand(5, keys, generator=generator)
    norms = torch.rand(heads, 2, keys, generator=generator)
    bins = torch.nn.functional.one_hot(torch.arange(rows) * 256 // keys).T.float()
    spread = torch.rand(1, rows, generator=generator)
    return native_softmax.Factors(key_columns=(features.expand(heads, -1, -1), norms), row_weights=(bins, spread))


def torch_products(probs: torch.Tensor, asked: native_softmax.Factors) -> list[torch.Tensor]:
    return [torch.matmul(probs, columns.transpose(-1, -2)) for columns in asked.key_columns] + \
        [torch.einsum("gq,hqk->hgk", weights, probs) for weights in asked.row_weights]


def median_ms(run, reps: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    if not native_softmax.available():
        raise SystemExit("the native softmax could not be built here (no C compiler?); see probes/native_softmax.py")
    print(f"{'threads':>7} {'keys':>6} {'rows':>5} {'path':<29} {'ms/block':>9} {'x softmax':>9}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for length in args.lengths:
            scores, probs = block(length)
            scratch = torch.empty_like(probs)
            reference, peak = p_ln_p(probs, scratch)
            entropy, terms_peak = from_terms(scores, probs, scratch)
            torch.testing.assert_close(entropy.double(), reference.double(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(terms_peak, peak)
            native_entropy, native_peak = native(scores, torch.empty_like(probs))
            torch.testing.assert_close(native_entropy.double(), reference.double(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(native_peak, peak, atol=1e-6, rtol=1e-5)
            native_probs = torch.empty_like(probs)
            asked = factors(scores)
            products = native_softmax.softmax(scores[None], native_probs[None], factors=asked).products
            for given, expected in zip((*products.key_sums, *products.row_sums), torch_products(probs, asked)):
                torch.testing.assert_close(given[0], expected, atol=1e-4, rtol=1e-4)
            paths = {
                "softmax": lambda: torch.softmax(scores, -1),
                "p ln p + row max": lambda: p_ln_p(probs, scratch),
                "entropy terms": lambda: from_terms(scores, probs, scratch),
                "copy of the scores": lambda: scratch.copy_(scores),
                "native softmax + terms": lambda: native(scores, native_probs),
                "products in torch": lambda: torch_products(probs, asked),
                "native + products": lambda: native_softmax.softmax(scores[None], native_probs[None], factors=asked),
            }
            times = {name: median_ms(run, args.reps) for name, run in paths.items()}
            times["entropy terms, less the copy"] = times["entropy terms"] - times["copy of the scores"]
            times["softmax + terms in torch"] = times["softmax"] + times["entropy terms, less the copy"]
            times["native, then products in torch"] = times["native softmax + terms"] + times["products in torch"]
            for name, ms in times.items():
                print(f"{threads:>7} {length:>6} {scores.shape[1]:>5} {name:<29} {ms:>9.3f} {ms / times['softmax']:>8.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
