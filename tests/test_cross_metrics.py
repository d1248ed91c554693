"""Cross-attention metrics on hand-computed matrices, and on the shipped toy model that reverses digits."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from llm_heatmap.analyses.heads.cross_metrics import alignment, coverage, cross_metrics, monotonicity, source_entropy

TOY = Path(__file__).parents[1] / "examples" / "toy_models"


def _stack(*rows) -> torch.Tensor:
    return torch.stack([torch.tensor(r, dtype=torch.float32) for r in rows])[None]  # "h q k", one layer added below


def test_metrics_by_hand():
    diagonal = torch.eye(3)
    anti = torch.eye(3).flip(-1)
    uniform = torch.full((3, 3), 1 / 3)
    # two rows on key 0, then one on key 2: expected positions 0, 0, 2 -> correlation with 0, 1, 2 is sqrt(3)/2
    stepped = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    pattern = torch.stack([diagonal, anti, uniform, stepped])[None]  # "l h q k"
    torch.testing.assert_close(alignment(pattern)[0], torch.tensor([1.0, -1.0, 0.0, math.sqrt(3) / 2], dtype=torch.float64))
    torch.testing.assert_close(monotonicity(pattern)[0], torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    # key column sums: diagonal 1,1,1; anti 1,1,1; uniform 1,1,1; stepped 2,0,1 -> 2 of 3 keys reach 0.5
    torch.testing.assert_close(coverage(pattern)[0], torch.tensor([1.0, 1.0, 1.0, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(source_entropy(pattern)[0], torch.tensor([0.0, 0.0, math.log(3), 0.0], dtype=torch.float64))
    zigzag = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])[None, None]  # argmax 0, 2, 1: one step of two goes back
    assert monotonicity(zigzag).item() == pytest.approx(0.5)


def test_the_toy_reverser_reverses_and_its_cross_attention_is_anti_diagonal():
    from transformers import BartForConditionalGeneration

    from llm_heatmap.probes import capture_sites

    sys.path.insert(0, str(TOY))
    try:
        from train_digit_reverser import EOS, digit_tokenizer, tokens
    finally:
        sys.path.remove(str(TOY))
    model = BartForConditionalGeneration.from_pretrained(TOY / "digit-reverser").eval()
    tokenizer = digit_tokenizer()
    for digits in ("3141592", "27182", "9081726354"):
        source = torch.tensor([tokens(digits) + [EOS]])
        with torch.no_grad():
            output = model.generate(source, max_new_tokens=len(digits) + 2, do_sample=False, num_beams=1)
        written = "".join(tokenizer.convert_ids_to_tokens(output[0, 1:-1]))
        assert written == digits[::-1], f"the toy model wrote {written} for {digits}"
        target = output[:, : len(digits)]  # <s> and all but the last digit written: row i writes digit i of the reversal
        with torch.no_grad(), capture_sites(model, sites="cross") as probe:
            model(input_ids=source, decoder_input_ids=target)
        table = cross_metrics(probe.cubes(source, decoder_input_ids=target, tokenizer=tokenizer)["cross"])
        last = table[table.layer == table.layer.max()]
        assert last.alignment.min() < -0.9, table  # the heads that copy read the source back to front
        assert last.loc[last.alignment.idxmin(), "monotonicity"] == 1.0
        # the copying head's argmax on row i is source position n-1-i: the answer the task implies
        cube = probe.cubes(source, decoder_input_ids=target, tokenizer=tokenizer)["cross"]
        head = cube.heads.index(int(last.loc[last.alignment.idxmin(), "head"]))
        argmax = cube.pattern[-1, head].argmax(-1)
        assert argmax.tolist() == list(range(len(digits) - 1, -1, -1))
