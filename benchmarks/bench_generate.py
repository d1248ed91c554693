"""What recording every decode step costs on SmolLM2-135M, against plain `generate()` of the same tokens in the same run.

    python benchmarks/bench_generate.py [--new-tokens 64 256] [--prompt-tokens 1000] [--threads 1 2] [--reps 2]

The prompt is the shipped haystack text cut to about `--prompt-tokens` tokens; both modes generate exactly
N tokens greedily (`min_new_tokens` = `max_new_tokens`), fp32, the model's sdpa kernel and dynamic cache:
- plain `generate()`, the baseline;
- `capture_decode`: the same generation with the probe on every attention call, keeping each step's row of
  every head (float32) and the prefill's last row.
Rows: median wall-clock and CPU seconds of interleaved repetitions, and the ratio of CPU seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from bench_capture import interleaved_medians  # noqa: E402

from llm_heatmap.models import load_model  # noqa: E402
from llm_heatmap.probes.decode import capture_decode  # noqa: E402


def haystack_prompt(tokenizer, tokens: int) -> str:
    text = resources.files("llm_heatmap.analyses.heads").joinpath("haystack.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < tokens:
        ids = ids + ids
    return tokenizer.decode(ids[:tokens])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    model, tokenizer, spec = load_model("smollm2-135m")
    prompt = haystack_prompt(tokenizer, args.prompt_tokens)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    print(f"SmolLM2-135M fp32, {ids.shape[-1]}-token prompt, greedy, median of {args.reps}")
    print("| threads | new tokens | mode | wall s | CPU s | / plain generate |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for new in args.new_tokens:
            options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
            modes = {
                "plain generate": lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                         pad_token_id=tokenizer.eos_token_id, **options),
                "capture_decode": lambda: capture_decode(model, tokenizer, prompt, spec=spec, **options),
            }
            with torch.no_grad():
                times = interleaved_medians(modes, args.reps)
            plain = times["plain generate"][1]
            for name, (wall, cpu) in times.items():
                print(f"| {threads} | {new} | {name} | {wall:.2f} | {cpu:.2f} | {cpu / plain:.2f}x |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
