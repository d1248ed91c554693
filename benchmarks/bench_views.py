"""What the views beyond weights cost on SmolLM2-135M, each against its baseline measured in the same run.

    python benchmarks/bench_views.py [--length 512] [--reps 5]

Rows (interleaved repetitions, median wall-clock and CPU seconds, fp32, one forward each):
- plain sdpa forward of the same tokens;
- full capture without value norms (`value_norms=False`);
- full capture with value and output norms (the default where the output projection is known);
- full capture with value norms and the queries and keys (`queries_and_keys=True`).
Then the query-key maps of one layer (every KV group, PCA) from that cube, drawn and written as a PNG.

Targets: the norms add at most 10% to a full capture at 512 tokens; one layer's maps drawn in under 2 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
from bench_capture import forward, interleaved_medians, prompt_ids, timed  # noqa: E402

from llm_heatmap.analyses.maps.qk_maps import qk_map  # noqa: E402
from llm_heatmap.models import load_model  # noqa: E402
from llm_heatmap.probes import capture  # noqa: E402
from llm_heatmap.viz import plot_qk_maps, save_figure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, so CPU time measures work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, spec = load_model("smollm2-135m")
    ids = prompt_ids(tokenizer, args.length)

    def captured(**options):
        def run():
            with capture(model, **options) as probe:
                forward(model, ids)
            probe.cube(ids)
        return run

    modes = {
        "plain sdpa forward": lambda: forward(model, ids),
        "capture, no norms": captured(value_norms=False),
        "capture + value/output norms": captured(value_norms=True),
        "capture + norms + queries/keys": captured(value_norms=True, queries_and_keys=True),
    }
    times = interleaved_medians(modes, args.reps)
    print(f"SmolLM2-135M fp32, {args.length} tokens, {torch.get_num_threads()} thread(s), median of {args.reps}")
    print("| mode | wall s | CPU s | / plain | / capture without norms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    plain, bare = times["plain sdpa forward"][1], times["capture, no norms"][1]
    for name, (wall, cpu) in times.items():
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {cpu / plain:.2f}x | {cpu / bare:.3f}x |")

    with capture(model, queries_and_keys=True) as probe:
        forward(model, ids)
    cube = probe.cube(ids, tokenizer=tokenizer)
    layer = spec.num_layers // 2
    with tempfile.TemporaryDirectory() as folder:
        def draw():
            maps = [qk_map(cube, layer, group=group) for group in range(spec.num_kv_heads)]
            save_figure(plot_qk_maps(maps, columns=spec.num_kv_heads), Path(folder) / "qk.png")
        draw()
        samples = [timed(draw) for _ in range(args.reps)]
    wall = statistics.median(t[0] for t in samples)
    print(f"\nquery-key maps of layer {layer} ({spec.num_kv_heads} KV groups x {spec.group_size} heads, "
          f"{args.length} tokens, PCA), drawn and written: {wall:.3f} s (target < 2 s)")


if __name__ == "__main__":
    main()
