"""The other site paths, each against the plain work of the same tokens in the same run: an encoder-decoder's
decode steps, head ablation on one of its sites, and a speech model's recording.

    .venv/bin/python benchmarks/bench_site_paths.py [--tokens 256] [--new-tokens 32] [--reps 3] [--threads 1]

Random models (no trained weights are needed for the cost): a BART with an LM head (6+6 layers, d_model 512,
8 heads) and a Whisper (4+4 layers, d_model 384, 6 heads, 80 mel bins, 30 s of audio). One process,
interleaved repetitions, median wall-clock and process CPU seconds (one torch thread by default); each path's
ratio is to its own baseline, named beside it:

  decode steps       `capture_decode_sites` (decoder and cross rows of every step) against `generate()` of the
                     same source and the same number of new tokens (greedy, min_new_tokens = max_new_tokens)
  site ablation      `site_head_ablation_rows` on the cross site (every head ablated alone, the target's
                     teacher-forced log p) against one plain forward of the same source and target
  audio features     the model's feature extractor on 30 s of audio (what `--audio` adds), against the plain
                     Whisper forward of those features and a 32-token decoder input
  audio sites        `capture_sites` of the Whisper's three sites against the same plain forward
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import (BartConfig, BartForConditionalGeneration, WhisperConfig, WhisperFeatureExtractor,
                          WhisperForConditionalGeneration)

from llm_heatmap.analyses.importance.site_ablation import TARGET, site_head_ablation_rows
from llm_heatmap.models import spec_from_model
from llm_heatmap.models.audio import audio_features
from llm_heatmap.probes.decode_sites import capture_decode_sites
from llm_heatmap.probes.sites import capture_sites

sys.path.insert(0, str(Path(__file__).parent))
from bench_capture import interleaved_medians  # noqa: E402


def bart(tokens: int):
    config = BartConfig(vocab_size=1000, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                        max_position_embeddings=tokens + 2)
    torch.manual_seed(0)
    return BartForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def whisper():
    config = WhisperConfig(vocab_size=1000, d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                           decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536, num_mel_bins=80,
                           max_source_positions=1500, max_target_positions=64, decoder_start_token_id=1,
                           pad_token_id=0, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    return WhisperForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256, help="source and target tokens of the BART")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated in the decode-steps path")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    model = bart(args.tokens)
    source = torch.randint(3, 1000, (1, args.tokens), generator=generator)
    target = torch.randint(3, 1000, (1, args.tokens), generator=generator)
    cross = spec_from_model(model, "cross")
    generation = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, num_beams=1)

    speech = whisper()
    extractor = WhisperFeatureExtractor(feature_size=80)
    samples = np.random.default_rng(0).uniform(-0.5, 0.5, extractor.n_samples).astype(np.float32)
    features = audio_features(extractor, samples, extractor.sampling_rate)
    decoder_ids = torch.randint(3, 1000, (1, 32), generator=generator)

    def forward(on, **inputs):
        with torch.no_grad():
            on(**inputs, use_cache=False)

    def sites_of(on, **inputs):
        with torch.no_grad(), capture_sites(on) as probe:
            on(**inputs, use_cache=False)
        return probe

    paths = {
        "BART generate()": lambda: model.generate(input_ids=source, **generation),
        "  decode steps": lambda: capture_decode_sites(model, None, {"input_ids": source}, **generation),
        "BART plain forward": lambda: forward(model, input_ids=source, decoder_input_ids=target),
        "  site ablation (cross)": lambda: site_head_ablation_rows(
            model, {"input_ids": source, "decoder_input_ids": target}, spec=cross, output=TARGET),
        "Whisper plain forward": lambda: forward(speech, input_features=features, decoder_input_ids=decoder_ids),
        "  audio features": lambda: audio_features(extractor, samples, extractor.sampling_rate),
        "  audio sites": lambda: sites_of(speech, input_features=features, decoder_input_ids=decoder_ids),
    }
    times = interleaved_medians(paths, args.reps)
    print(f"BART 6+6 x 8 heads, {args.tokens} source + {args.tokens} target tokens, {args.new_tokens} new tokens; "
          f"Whisper 4+4 x 6 heads, 30 s; {args.threads} thread(s), median of {args.reps}")
    print(f"{'path':<28}{'wall s':>9}{'cpu s':>9}{'wall x':>8}{'cpu x':>8}")
    base = None
    for name, (wall, cpu) in times.items():
        if not name.startswith(" "):
            base = (wall, cpu)
        print(f"{name:<28}{wall:>9.3f}{cpu:>9.3f}{wall / base[0]:>8.2f}{cpu / base[1]:>8.2f}")


if __name__ == "__main__":
    main()
