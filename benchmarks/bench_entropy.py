"""Row entropy of a captured block: -sum p ln p (what the metrics reducer does) against the entropy from the scores.

    .venv/bin/python benchmarks/bench_entropy.py [--lengths 2048 8192] [--threads 1 2]

Issue 26 asked for H = ln Z - sum_j p_j s_j, computed from the scores the capture already holds,
in place of the log per entry. This times both on row blocks shaped as the capture streams them
for SmolLM2 (9 heads, the rows `stream.auto_chunk_rows` gives at that length, every key), with the
block's own softmax as the baseline measured in the same run:

  softmax                the capture's softmax of the block (the baseline)
  p ln p                 the reducer's pass: clamp, log, multiply, row sum
  from scores (shifted)  `score_entropy.entropy_from_scores`: row max, shift, multiply, row sum, gather
  from scores (unshifted) ln Z sum p - sum p s with ln Z = s_max - ln p_max: one row max of the scores
                         and one dot product, no shift (the two terms cancel in float32 when the
                         scores are large; shown for its speed only)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llm_heatmap.probes.score_entropy import entropy_from_scores
from llm_heatmap.probes.stream import auto_chunk_rows

HEADS = 9


def block(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = auto_chunk_rows(1, HEADS, length, length)
    scores = torch.randn(HEADS, rows, length, generator=torch.Generator().manual_seed(length)) * 3
    return scores, torch.softmax(scores, -1)


def p_ln_p(probs: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    return torch.clamp_min(probs, torch.finfo(probs.dtype).tiny, out=scratch).log_().mul_(probs).sum(-1).neg_()


def unshifted(scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    log_z = scores.amax(-1) - probs.amax(-1).log()  # ln Z = s_max - ln p_max
    return log_z * probs.sum(-1) - torch.linalg.vecdot(probs, scores)


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
    print(f"{'threads':>7} {'keys':>6} {'rows':>5} {'path':<24} {'ms/block':>9} {'x softmax':>9}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for length in args.lengths:
            scores, probs = block(length)
            scratch = torch.empty_like(probs)
            reference = p_ln_p(probs, scratch).double()
            torch.testing.assert_close(entropy_from_scores(scores, probs).double(), reference, atol=1e-5, rtol=1e-5)
            paths = {
                "softmax": lambda: torch.softmax(scores, -1),
                "p ln p": lambda: p_ln_p(probs, scratch),
                "from scores (shifted)": lambda: entropy_from_scores(scores, probs),
                "from scores (unshifted)": lambda: unshifted(scores, probs),
            }
            times = {name: median_ms(run, args.reps) for name, run in paths.items()}
            for name, ms in times.items():
                print(f"{threads:>7} {length:>6} {scores.shape[1]:>5} {name:<24} {ms:>9.3f} {ms / times['softmax']:>8.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
