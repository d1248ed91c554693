"""Capture and per-head metrics cost on SmolLM2-135M, each path against the plain SDPA forward of the same tokens.

    .venv/bin/python benchmarks/bench_capture.py [--lengths 512 2048 8192] [--reps 3] [--long-reps 1] [--threads 1]

Prompt: random vocabulary tokens (seeded), as in issue 11. Every forward uses use_cache=False and
logits_to_keep=1 so the LM head's [T, vocab] logits do not dominate any row.

Time: one process, interleaved repetitions of every path, median wall-clock and CPU seconds, and
each path's ratio to the plain forward of the same repetitions (one torch thread by default, so
process CPU seconds measure the work even on a busy shared machine where wall time is noise), and the
range of the ratios of single rounds (each path against the plain forward of its own round), which says
how far one round can be from the median on the machine of the day:

  plain                 the model's own SDPA forward
  eager attentions      eager forward with output_attentions=True (not at 8192: the weights alone are 72 GiB)
  capture, no consumer  streaming capture into a consumer that drops every part: the recomputed attention
  Downsampler only      streaming, consumers=[Downsampler(256)], keep=False
  metrics only          streaming, consumers=[HeadMetricsReducer()], keep=False
  Downsampler + metrics streaming, both consumers, keep=False
  kept cube             capture(model) keeping the full fp32 cube, no metrics (not at 8192)
  head_metrics alone    head_metrics(cube) on that kept cube, timed on its own
  kept cube + metrics   the two above, one after the other
  ... (computed)        the same capture with compute_output=True: the probe's P V replaces the SDPA kernel

Memory: peak resident set (VmHWM) of a fresh subprocess per mode, each loading the model and running
one forward, with that forward's time: plain, eager output_attentions, and streaming capture into
[Downsampler(256), HeadMetricsReducer()] with keep=False, untouched and computed.

--paths picks some time paths by name (plain always runs), --memory-modes some memory modes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KEPT_MAX_TOKENS = 2048  # a kept fp32 cube of SmolLM2 is 30 x 9 x T x T x 4 bytes: 4.5 GiB at 2048, 72 GiB at 8192


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    return torch.randint(0, len(tokenizer), (1, length), generator=torch.Generator().manual_seed(length))


def timed(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_medians(modes: dict, reps: int) -> dict[str, tuple[float, float]]:
    """(median wall s, median CPU s) of each mode: every mode run once to warm up, then `reps` rounds of every
    mode in turn, so a load that comes and goes hits all modes alike."""
    for run in modes.values():
        run()
    times = {name: [] for name in modes}
    for _ in range(reps):
        for name, run in modes.items():
            times[name].append(timed(run))
    return {name: tuple(statistics.median(t[i] for t in samples) for i in (0, 1)) for name, samples in times.items()}


def forward(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs)


class Discard:
    """A consumer that drops every part: capture with it costs the recomputed attention alone."""

    takes_trimmed_parts = True
    takes_value_norms = False

    def consume(self, part) -> None:
        pass


def streamed(model, ids, consumers, compute_output: bool = False) -> None:
    from llm_heatmap.probes import capture

    with capture(model, consumers=consumers, keep=False, compute_output=compute_output):
        forward(model, ids)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def child(mode: str, length: int, threads: int) -> None:
    """One mode in a fresh process; prints a JSON line with the peak RSS and the forward's seconds."""
    from llm_heatmap.analyses import HeadMetricsReducer
    from llm_heatmap.models import load_model
    from llm_heatmap.probes import Downsampler

    torch.set_num_threads(threads)
    model, tokenizer, _ = load_model("smollm2-135m", attn_implementation="eager" if mode == "eager" else "sdpa")
    ids = prompt_ids(tokenizer, length)
    loaded = peak_rss_mb()
    start = time.perf_counter()
    if mode == "plain":
        forward(model, ids)
    elif mode == "eager":
        assert len(forward(model, ids, output_attentions=True).attentions) == 30
    elif mode in ("stream", "stream-computed"):
        sampler, reducer = Downsampler(256), HeadMetricsReducer()
        streamed(model, ids, [sampler, reducer], compute_output=mode == "stream-computed")
        assert sampler.cube().pattern.shape == (30, 9, min(256, length), min(256, length)) and len(reducer.table()) == 270
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "length": length, "peak_mb": peak_rss_mb(), "loaded_mb": loaded, "seconds": seconds}))


def run_child(mode: str, length: int, threads: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", mode, str(length), "--threads", str(threads)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return {"mode": mode, "length": length, "error": result.stderr.strip().splitlines()[-1:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_paths(sdpa_model, eager_model, ids, reps: int, only=None) -> tuple[dict, dict]:
    """Median (wall, cpu) seconds of every path, repetitions interleaved, and each path's (lowest, highest)
    wall ratio to the plain forward of the same round."""
    from llm_heatmap.analyses import HeadMetricsReducer, head_metrics
    from llm_heatmap.probes import Downsampler, capture

    length = ids.shape[1]
    kept = {}

    def keep_cube():
        with capture(sdpa_model) as probe:
            forward(sdpa_model, ids)
        kept["cube"] = probe.cube(ids)

    paths = {
        "plain": lambda: forward(sdpa_model, ids),
        "eager attentions": lambda: forward(eager_model, ids, output_attentions=True),
        "capture, no consumer": lambda: streamed(sdpa_model, ids, [Discard()]),
        "Downsampler only": lambda: streamed(sdpa_model, ids, [Downsampler(256)]),
        "metrics only": lambda: streamed(sdpa_model, ids, [HeadMetricsReducer()]),
        "Downsampler + metrics": lambda: streamed(sdpa_model, ids, [Downsampler(256), HeadMetricsReducer()]),
        "kept cube": keep_cube,
        "head_metrics alone": lambda: head_metrics(kept["cube"]),
        "no consumer (computed)": lambda: streamed(sdpa_model, ids, [Discard()], compute_output=True),
        "Ds + metrics (computed)": lambda: streamed(sdpa_model, ids, [Downsampler(256), HeadMetricsReducer()],
                                                    compute_output=True),
    }
    if only:
        paths = {name: run for name, run in paths.items() if name == "plain" or name in only
                 or (name == "kept cube" and "head_metrics alone" in only)}
    if length > KEPT_MAX_TOKENS:
        for name in ("eager attentions", "kept cube", "head_metrics alone"):
            paths.pop(name, None)
    wall = {name: [] for name in paths}
    cpu = {name: [] for name in paths}
    for rep in range(reps + 1):  # the first round warms up
        for name, run in paths.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            if rep:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
        kept.clear()  # one kept cube at a time
    times = {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in paths}
    if "kept cube" in times and "head_metrics alone" in times:
        times["kept cube + metrics"] = tuple(a + b for a, b in zip(times["kept cube"], times["head_metrics alone"]))
        wall["kept cube + metrics"] = [a + b for a, b in zip(wall["kept cube"], wall["head_metrics alone"])]
    ratios = {name: [w / p for w, p in zip(wall[name], wall["plain"])] for name in times}
    return times, {name: (min(r), max(r)) for name, r in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 2048, 8192],
                        help="token counts of the time table (none: memory table only)")
    parser.add_argument("--reps", type=int, default=3, help="rounds at every length up to 2,048 tokens")
    parser.add_argument("--long-reps", type=int, default=1, help="rounds above 2,048 tokens")
    parser.add_argument("--memory-lengths", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU seconds then measure work, not spin-waiting)")
    parser.add_argument("--paths", nargs="+", help="time only these paths (by name) besides plain")
    parser.add_argument("--memory-modes", nargs="+", default=["plain", "eager", "stream", "stream-computed"])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.threads)
        return

    from llm_heatmap.models import load_model

    torch.set_num_threads(args.threads)
    sdpa_model, tokenizer, _ = load_model("smollm2-135m")
    eager_model, _, _ = load_model("smollm2-135m", attn_implementation="eager")
    print(f"SmolLM2-135M fp32 on CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("\ntime: median of interleaved repetitions; x = ratio to the plain forward of the same run (wall, cpu)")
    print(f"{'tokens':>7} {'path':<22} {'wall s':>8} {'cpu s':>8} {'x wall':>7} {'x cpu':>7} {'rounds x wall':>14}")
    for length in args.lengths:
        reps = args.reps if length <= KEPT_MAX_TOKENS else args.long_reps
        times, ranges = time_paths(sdpa_model, eager_model, prompt_ids(tokenizer, length), reps, args.paths)
        plain_wall, plain_cpu = times["plain"]
        for name, (wall, cpu) in times.items():
            low, high = ranges[name]
            print(f"{length:>7} {name:<22} {wall:>8.2f} {cpu:>8.2f} {wall / plain_wall:>6.2f}x {cpu / plain_cpu:>6.2f}x "
                  f"{f'{low:.2f}-{high:.2f}x':>14}", flush=True)
    del sdpa_model, eager_model

    print("\npeak resident memory (MiB, fresh process per mode; 'loaded' = peak after loading the model) "
          "and the forward's seconds")
    print(f"{'mode':>36} {'tokens':>7} {'loaded':>8} {'peak':>8} {'/ plain':>8} {'seconds':>8} {'/ plain':>8}")
    labels = {"plain": "plain sdpa forward", "eager": "eager output_attentions",
              "stream": "streaming, Downsampler + metrics", "stream-computed": "streaming, computed output"}
    for length in args.memory_lengths:
        modes = [mode for mode in args.memory_modes if mode != "eager" or length <= KEPT_MAX_TOKENS]
        modes = ["plain", *(mode for mode in modes if mode != "plain")]
        results = {mode: run_child(mode, length, args.threads) for mode in modes}
        plain = results["plain"]
        for mode, r in results.items():
            if "error" in r:
                print(f"{labels[mode]:>36} {length:>7} FAILED: {r['error']}", flush=True)
                continue
            ratios = ("", "") if "error" in plain else (f"{r['peak_mb'] / plain['peak_mb']:.2f}x",
                                                         f"{r['seconds'] / plain['seconds']:.2f}x")
            print(f"{labels[mode]:>36} {length:>7} {r['loaded_mb']:>8.0f} {r['peak_mb']:>8.0f} {ratios[0]:>8} "
                  f"{r['seconds']:>8.1f} {ratios[1]:>8}", flush=True)


if __name__ == "__main__":
    main()
