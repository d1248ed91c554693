"""The head atlas on SmolLM2-135M: prompts per second on 1 and 2 processes, and the all-heads similarity
against the old pair-by-pair JS and the model's forward pass.

    .venv/bin/python benchmarks/bench_atlas.py [--prompts 200] [--words 56] [--tokens 512]
    .venv/bin/python benchmarks/bench_atlas.py --prompts 20      # a quick run

Atlas: `llm-heatmap atlas` on generated prompts of about 64 tokens, run end to end as a user runs it
(start-up, model load, every prompt, tables and page), each run in a fresh output folder: one
process, and `torchrun --standalone --nproc_per_node 2`; one torch thread per process (torchrun's
default with several processes; set for the one-process run too, since intra-op threads that
wait for each other on a busy shared machine make every small operation slow). Wall time and the
CPU seconds of all processes together; the two-process tables are asserted equal to the
one-process tables.

Similarity: one SmolLM2 prompt of `--tokens` tokens, all 270 heads. The plain sdpa forward (no
capture; use_cache=False, logits_to_keep=1, as in bench_capture.py), `head_similarity_matrix`'s
exact JS (`divergence.js_divergence_matrix`) and Hellinger/Bhattacharyya, and the old pair-by-pair
JS (tests/js_reference.py) on the same distributions, one torch thread; the JS results are asserted
equal within 1e-6 nats and the largest difference is printed.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bench_capture import forward, prompt_ids  # noqa: E402
from js_reference import pairwise_js_divergence  # noqa: E402

WORDS = ("the a model head token attends first previous copies layer query key value prompt sentence word river "
         "mountain cat dog runs sleeps quickly slowly because although when after before small large red blue "
         "theorem proof number function integral entropy signal noise memory story child teacher city night "
         "morning light dark open closed writes reads learns forgets again twice never always").split()


def write_prompts(path: Path, count: int, words: int) -> None:
    rng = random.Random(0)
    lines = []
    for _ in range(count):
        sentence = [rng.choice(WORDS) for _ in range(words)]
        for cut in range(8, words, 9):
            sentence[cut] += "."
        lines.append(" ".join(sentence).capitalize())
    path.write_text("\n".join(lines) + "\n")


def timed_run(argv: list[str], threads: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children) of one command."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def atlas_rows(prompts: Path, count: int, folder: Path) -> list[tuple]:
    cli = [sys.executable, "-m", "llm_heatmap.cli", "atlas", str(prompts), "--model", "smollm2-135m", "--quiet"]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m",
                "llm_heatmap.cli", "atlas", str(prompts), "--model", "smollm2-135m", "--quiet"]
    runs = [("1 process", cli, 1, "one"), ("torchrun, 2 processes", torchrun, 1, "two")]
    rows = []
    for name, argv, threads, out in runs:
        wall, cpu = timed_run(argv + ["--out", str(folder / out)], threads)
        rows.append((name, wall, cpu, count / wall))
        print(f"  {name}: {wall:.1f} s", flush=True)
    for table in ("prompt_heads", "heads", "layers", "models", "prompt_layers", "top_prompts", "head_distances"):
        pd.testing.assert_frame_equal(pd.read_parquet(folder / "one" / f"{table}.parquet"),
                                      pd.read_parquet(folder / "two" / f"{table}.parquet"))
    return rows


def best(function, repeats: int):
    """(result, best wall seconds, CPU seconds of that run) over `repeats` runs."""
    times = []
    for _ in range(repeats):
        cpu, start = time.process_time(), time.perf_counter()
        result = function()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    wall, cpu = min(times)
    return result, wall, cpu


def similarity_rows(tokens: int) -> tuple[list[tuple], float]:
    from llm_heatmap.analyses.similarity.divergence import bhattacharyya_matrix, js_divergence_matrix
    from llm_heatmap.analyses.similarity.kv_similarity import head_distributions
    from llm_heatmap.models import load_model
    from llm_heatmap.probes import capture

    model, tokenizer, _ = load_model("smollm2-135m")
    ids = prompt_ids(tokenizer, tokens)
    with torch.no_grad(), capture(model) as probe:
        forward(model, ids)
    p = head_distributions(probe.cube(ids, tokenizer=tokenizer))
    forward(model, ids)  # warm-up
    _, t_forward, c_forward = best(lambda: forward(model, ids), 3)
    fast, t_fast, c_fast = best(lambda: js_divergence_matrix(p), 2)
    _, t_bc, c_bc = best(lambda: bhattacharyya_matrix(p), 2)
    old, t_old, c_old = best(lambda: pairwise_js_divergence(p), 1)
    error = float((fast - old).abs().max())
    assert error < 1e-6, error
    heads = p.shape[0]
    rows = [(f"plain sdpa forward ({tokens} tokens)", t_forward, c_forward, t_forward),
            (f"JS, all {heads} heads (library, exact)", t_fast, c_fast, t_forward),
            ("Hellinger / Bhattacharyya (library, one GEMM)", t_bc, c_bc, t_forward),
            ("JS, old pair-by-pair (tests/js_reference.py)", t_old, c_old, t_forward)]
    return rows, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200, help="prompts in the atlas runs (default 200)")
    parser.add_argument("--words", type=int, default=56, help="words per prompt (default 56: about 64 tokens)")
    parser.add_argument("--tokens", type=int, default=512, help="prompt length of the similarity timing (default 512)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-atlas-") as folder:
        folder = Path(folder)
        prompts = folder / "prompts.txt"
        write_prompts(prompts, args.prompts, args.words)
        from llm_heatmap.models import load_model

        _, tokenizer, _ = load_model("smollm2-135m")
        lengths = [len(tokenizer(line)["input_ids"]) for line in prompts.read_text().splitlines()]
        print(f"atlas: {args.prompts} prompts of {min(lengths)}-{max(lengths)} tokens "
              f"(mean {sum(lengths) / len(lengths):.0f})", flush=True)
        atlas = atlas_rows(prompts, args.prompts, folder)
    similarity, error = similarity_rows(args.tokens)
    print(f"load average after: {os.getloadavg()[0]:.1f}")

    print("\n| atlas run (SmolLM2-135M, one thread per process) | wall | CPU (all processes) | prompts / s | speed vs 1 process |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, wall, cpu, rate in atlas:
        print(f"| {name} | {wall:.1f} s | {cpu:.1f} s | {rate:.2f} | {atlas[0][1] / wall:.2f}x |")
    print("\nthe 2-process tables equal the 1-process tables (all seven, exactly)")
    print(f"\n| all-heads similarity, one thread | wall | CPU | wall / forward |")
    print("| --- | ---: | ---: | ---: |")
    for name, wall, cpu, reference in similarity:
        print(f"| {name} | {wall:.2f} s | {cpu:.2f} s | {wall / reference:.1f}x |")
    old, fast = similarity[3][1], similarity[1][1]
    print(f"\nlibrary JS vs old pair-by-pair: {old / fast:.1f}x faster; largest difference {error:.1e} nats")


if __name__ == "__main__":
    main()
