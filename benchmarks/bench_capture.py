"""Capture cost on SmolLM2-135M: forward time and peak memory against the plain and eager baselines.

    /work/venv/bin/python benchmarks/bench_capture.py [--lengths 128 512 2048] [--reps 3]

Time (one torch thread by default, so process CPU seconds measure the work even on a busy shared
machine where wall time is noise): median wall-clock and CPU seconds of interleaved repetitions of (plain sdpa forward, sdpa forward under `capture`
keeping the full fp32 cube, eager forward with output_attentions=True), same process, same
inputs. Memory: peak resident set (VmHWM) of a fresh subprocess per mode, each loading the
model and running one forward: plain sdpa, eager output_attentions, and streaming capture
into a Downsampler(256) with keep=False. Every forward uses use_cache=False and
logits_to_keep=1 so the LM head's [T, vocab] logits do not dominate any column.
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

TEXT = ("Attention heads in a small language model each learn a habit: some look at the previous token, some at "
        "the first token, some copy what followed an earlier occurrence of the current token. ")


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    ids = tokenizer(TEXT * (length // 20 + 1), return_tensors="pt")["input_ids"][:, :length]
    assert ids.shape[1] == length, "benchmark text too short"
    return ids


def forward(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, logits_to_keep=1, **kwargs)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def child(mode: str, length: int) -> None:
    """One mode in a fresh process; prints a JSON line with the peak RSS and wall time."""
    from llm_heatmap.models import load_model
    from llm_heatmap.probes import Downsampler, capture

    kernel = "eager" if mode == "eager" else "sdpa"
    model, tokenizer, _ = load_model("smollm2-135m", attn_implementation=kernel)
    ids = prompt_ids(tokenizer, length)
    loaded = peak_rss_mb()
    start = time.perf_counter()
    if mode == "plain":
        forward(model, ids)
    elif mode == "eager":
        out = forward(model, ids, output_attentions=True)
        assert len(out.attentions) == 30
    elif mode == "stream":
        sampler = Downsampler(256)
        with capture(model, consumers=[sampler], keep=False):
            forward(model, ids)
        assert sampler.cube().pattern.shape == (30, 9, 256, 256)
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "length": length, "peak_mb": peak_rss_mb(), "loaded_mb": loaded, "seconds": seconds}))


def run_child(mode: str, length: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", mode, str(length)], capture_output=True, text=True)
    if result.returncode != 0:
        return {"mode": mode, "length": length, "error": result.stderr.strip().splitlines()[-1:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_modes(sdpa_model, eager_model, ids, reps: int) -> dict:
    from llm_heatmap.probes import capture

    def captured():
        with capture(sdpa_model) as probe:
            forward(sdpa_model, ids)
        return probe.cube(ids)

    modes = {
        "plain": lambda: forward(sdpa_model, ids),
        "capture": captured,
        "eager": lambda: forward(eager_model, ids, output_attentions=True),
    }
    for run in modes.values():  # warm-up; each result is dropped before the next run
        run()
    wall = {name: [] for name in modes}
    cpu = {name: [] for name in modes}
    for _ in range(reps):
        for name, run in modes.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            result = run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            del result
    return ({name: statistics.median(values) for name, values in wall.items()},
            {name: statistics.median(values) for name, values in cpu.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--memory-length", type=int, default=2048)
    parser.add_argument("--long-length", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the timing table (1: CPU seconds then measure work, not spin-waiting)")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return

    from llm_heatmap.models import load_model

    torch.set_num_threads(args.threads)
    sdpa_model, tokenizer, _ = load_model("smollm2-135m")
    eager_model, _, _ = load_model("smollm2-135m", attn_implementation="eager")
    print(f"SmolLM2-135M fp32 on CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("\nforward time, median of interleaved reps (capture keeps the full fp32 cube).")
    print("wall = seconds on the clock; cpu = process CPU seconds, the steadier measure on a shared machine")
    print(f"{'tokens':>7} {'reps':>5} {'plain wall':>11} {'capture':>8} {'eager':>8} {'plain cpu':>10} {'capture':>8} "
          f"{'eager':>8} {'capture/plain (wall, cpu)':>26} {'eager/plain (wall, cpu)':>24}")
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length)
        reps = args.reps + 2 if length <= 128 else args.reps if length <= 512 else max(1, args.reps - 1)
        wall, cpu = time_modes(sdpa_model, eager_model, ids, reps)
        print(f"{length:>7} {reps:>5} {wall['plain']:>11.3f} {wall['capture']:>8.3f} {wall['eager']:>8.3f} "
              f"{cpu['plain']:>10.3f} {cpu['capture']:>8.3f} {cpu['eager']:>8.3f} "
              f"{wall['capture'] / wall['plain']:>17.2f}x {cpu['capture'] / cpu['plain']:>6.2f}x "
              f"{wall['eager'] / wall['plain']:>15.2f}x {cpu['eager'] / cpu['plain']:>6.2f}x", flush=True)
    del sdpa_model, eager_model

    print("\npeak resident memory (MiB, fresh process per mode; 'loaded' = peak after loading the model)")
    print(f"{'mode':>30} {'tokens':>7} {'loaded':>8} {'peak':>8} {'seconds':>8}")
    rows = [("plain", args.memory_length), ("eager", args.memory_length), ("stream", args.memory_length),
            ("stream", args.long_length)]
    labels = {"plain": "plain sdpa forward", "eager": "eager output_attentions", "stream": "streaming capture, Downsampler"}
    results = {}
    for mode, length in rows:
        r = run_child(mode, length)
        results[(mode, length)] = r
        if "error" in r:
            print(f"{labels[mode]:>30} {length:>7} FAILED: {r['error']}", flush=True)
        else:
            print(f"{labels[mode]:>30} {length:>7} {r['loaded_mb']:>8.0f} {r['peak_mb']:>8.0f} {r['seconds']:>8.1f}", flush=True)
    stream, eager = results[("stream", args.memory_length)], results[("eager", args.memory_length)]
    if "error" not in stream and "error" not in eager:
        print(f"\nstreaming peak / eager peak at {args.memory_length} tokens: {stream['peak_mb'] / eager['peak_mb']:.0%} (target <= 25%)")
    long = results[("stream", args.long_length)]
    print(f"streaming capture at {args.long_length} tokens: {'completed' if 'error' not in long else 'FAILED'}")


if __name__ == "__main__":
    main()
