"""What "does a head matter?" costs on SmolLM2-135M, against the plain forward of the same tokens in the same run.

    python benchmarks/bench_attribution.py [--lengths 64 128 256] [--reps 3]

Rows (interleaved repetitions, median wall-clock and CPU seconds, fp32):
- plain sdpa forward (last logits row only), the baseline;
- plain sdpa forward with every logits row (what DLA and knockout run);
- direct logit attribution of the last position (one forward with hooks, then per-head work in float64);
- one forward with an edge set knocked out inside the sdpa kernel (last position -> tokens 1-3, every layer);
- knockout_effect (a clean and a knocked forward);
- ALTI contributions and rollout (one capture forward, then `"i j m"` vectors per layer in float64);
- every head ablated alone (`head_ablation_rows`: 270 copies of the prompt, batched, every logits row).

Expected: DLA and a knocked forward cost about one forward; ALTI grows with T^2 x model width per layer;
ablating every head costs about 270 forwards with every logits row, less what batching saves.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from bench_capture import forward, interleaved_medians, prompt_ids  # noqa: E402

from llm_heatmap.analyses.importance.ablation import head_ablation_rows  # noqa: E402
from llm_heatmap.analyses.importance.attribution import logit_attribution  # noqa: E402
from llm_heatmap.analyses.importance.contributions import token_contributions  # noqa: E402
from llm_heatmap.analyses.importance.knockout import Edges, knocked_out, knockout_effect  # noqa: E402
from llm_heatmap.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, so CPU time measures work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, spec = load_model("smollm2-135m")
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} thread(s), median of {args.reps}")
    print("| tokens | mode | wall s | CPU s | / plain forward |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length)
        edges = [Edges(queries=(length - 1,), keys=(1, 2, 3))]

        def knocked():
            with knocked_out(model, edges, spec):
                forward(model, ids)

        modes = {
            "plain sdpa forward": lambda: forward(model, ids),
            "plain forward, every logits row": lambda: model(input_ids=ids, use_cache=False),
            "direct logit attribution": lambda: logit_attribution(model, input_ids=ids, spec=spec),
            "one knocked-out forward": knocked,
            "knockout_effect (clean + knocked)": lambda: knockout_effect(model, input_ids=ids, edges=edges, spec=spec),
            "ALTI contributions + rollout": lambda: token_contributions(model, input_ids=ids, spec=spec),
            f"every head ablated alone ({spec.num_layers * spec.num_heads} heads, batched)":
                lambda: head_ablation_rows(model, ids, spec=spec),
        }
        with torch.no_grad():
            times = interleaved_medians(modes, args.reps)
        plain = times["plain sdpa forward"][1]
        for name, (wall, cpu) in times.items():
            print(f"| {length} | {name} | {wall:.3f} | {cpu:.3f} | {cpu / plain:.2f}x |")


if __name__ == "__main__":
    main()
