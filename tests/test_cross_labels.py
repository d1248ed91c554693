"""A cross-attention grid is rectangular and labelled: target tokens name its rows, source tokens its
columns, in the PNG's figure and in the HTML view (the trained digit reverser, 5 digits -> 6 target tokens)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

from llm_heatmap.probes import capture_sites
from llm_heatmap.viz import html_view, plot_grid

from test_html import embedded

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy_models"
sys.path.insert(0, str(TOY))
from train_digit_reverser import BOS, EOS, digit_tokenizer, tokens  # noqa: E402


def cross_cube():
    model = transformers.BartForConditionalGeneration.from_pretrained(TOY / "digit-reverser").eval()
    source = torch.tensor([tokens("31415") + [EOS]])
    target = torch.tensor([[BOS] + tokens("5141")])  # 5 query rows over 6 source keys
    with torch.no_grad(), capture_sites(model, sites="cross") as probe:
        model(input_ids=source, decoder_input_ids=target)
    return probe.cubes(source, decoder_input_ids=target, tokenizer=digit_tokenizer())["cross"]


def test_png_labels_rows_with_target_and_columns_with_source_tokens():
    cube = cross_cube()
    assert cube.pattern.shape[-2:] == (5, 6)
    drawn = plot_grid(cube)
    x0, y0, x1, y1 = drawn.layout.grid_box
    width, height = drawn.layout.width + 0.25, drawn.layout.height + 0.25
    placed = [(t.get_text(), t.get_position()[0] * width, drawn.layout.height - t.get_position()[1] * height)
              for t in drawn.figure.texts]
    left = [text for text, x, y in placed if x < x0 and y0 <= y <= y1]
    below = [text for text, x, y in placed if x0 <= x <= x1 and y > y1]
    layers = len(cube.layers)
    assert [t for t in left if t not in ("L0", "L1")] == ["<s>", "5", "1", "4", "1"] * layers
    assert {"L0", "L1"} <= set(left)
    assert below == ["3", "1", "4", "1", "5", "</s>"] * len(cube.heads)


def test_html_rows_are_target_tokens_and_columns_source_tokens():
    meta, _, _ = embedded(html_view(cross_cube()).page)
    assert [row["r"] for row in meta["rows"]] == ["<s>", "5", "1", "4", "1"]
    assert [col["r"] for col in meta["cols"]] == ["3", "1", "4", "1", "5", "</s>"]
