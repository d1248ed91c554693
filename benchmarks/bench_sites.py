"""Cost of capturing every site of an encoder-decoder: a random BART (6+6 layers, d_model 512, 8 heads)
at 512 source and 512 target tokens, against the plain SDPA forward of the same tokens.

    .venv/bin/python benchmarks/bench_sites.py [--tokens 512] [--reps 3] [--threads 1]

One process, interleaved repetitions, median wall-clock and process CPU seconds (one torch thread by
default, so CPU seconds measure the work on a busy machine); the ratio is to the plain forward of the
same repetitions. "capture every site" keeps the fp32 cubes of the encoder, decoder and cross sites (the
model's kernel untouched) with their value and output norms (as by default); "computed once" is the same capture
with compute_output=True (the tap's blockwise softmax also gives the attention output, so the kernel does not run
a second time); "patterns only" leaves the norms out (value_norms=False).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import BartConfig, BartModel

from llm_heatmap.probes.sites import capture_sites

sys.path.insert(0, str(Path(__file__).parent))
from bench_capture import interleaved_medians  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = BartConfig(vocab_size=1000, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                        max_position_embeddings=args.tokens + 2)
    torch.manual_seed(0)
    model = BartModel._from_config(config, attn_implementation="sdpa").eval()
    generator = torch.Generator().manual_seed(0)
    source = torch.randint(3, 1000, (1, args.tokens), generator=generator)
    target = torch.randint(3, 1000, (1, args.tokens), generator=generator)

    def plain():
        with torch.no_grad():
            model(input_ids=source, decoder_input_ids=target, use_cache=False)

    def captured(**options):
        def run():
            with torch.no_grad(), capture_sites(model, **options) as probe:
                model(input_ids=source, decoder_input_ids=target, use_cache=False)
            probe.cubes(source, decoder_input_ids=target)
        return run

    paths = {"plain forward": plain, "capture every site": captured(), "  computed once": captured(compute_output=True),
             "  patterns only": captured(value_norms=False),
             "  computed, patterns only": captured(compute_output=True, value_norms=False)}
    times = interleaved_medians(paths, args.reps)
    base_wall, base_cpu = times["plain forward"]
    print(f"BART 6+6 x 8 heads, {args.tokens} source + {args.tokens} target tokens, {args.threads} thread(s), "
          f"median of {args.reps}")
    print(f"{'path':<28}{'wall s':>9}{'cpu s':>9}{'wall x':>8}{'cpu x':>8}")
    for name, (wall, cpu) in times.items():
        print(f"{name:<28}{wall:>9.3f}{cpu:>9.3f}{wall / base_wall:>8.2f}{cpu / base_cpu:>8.2f}")


if __name__ == "__main__":
    main()
