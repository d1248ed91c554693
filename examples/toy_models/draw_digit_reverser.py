"""Draw every attention site of the toy digit reverser (the README's figures): `python examples/toy_models/draw_digit_reverser.py`."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BartForConditionalGeneration

from llm_heatmap.analyses.heads.cross_metrics import cross_metrics
from llm_heatmap.probes import capture_sites
from llm_heatmap.viz import GridStyle, save_grid

from train_digit_reverser import EOS, OUT, digit_tokenizer, tokens

DOCS = Path(__file__).parents[2] / "docs" / "sites"

if __name__ == "__main__":
    model = BartForConditionalGeneration.from_pretrained(OUT).eval()
    tokenizer, digits = digit_tokenizer(), "31415926"
    source = torch.tensor([tokens(digits) + [EOS]])
    target = model.generate(source, max_new_tokens=len(digits) + 2, do_sample=False, num_beams=1)[:, : len(digits)]
    with torch.no_grad(), capture_sites(model) as probe:
        model(input_ids=source, decoder_input_ids=target)
    cubes = probe.cubes(source, decoder_input_ids=target, tokenizer=tokenizer, prompt=digits)
    DOCS.mkdir(parents=True, exist_ok=True)
    for site, cube in cubes.items():
        print(site, save_grid(cube, DOCS / f"digit-reverser.{site}.png", GridStyle(sink="keep", cell_px=24)).path)
    print(cross_metrics(cubes["cross"]).round(3).to_string(index=False))
