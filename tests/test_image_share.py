"""The share of text-query attention on image tokens, per layer and head, against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from llm_heatmap import InputError
from llm_heatmap.analyses.heads.image_share import image_share
from llm_heatmap.models import spec_from_model
from llm_heatmap.probes import AttentionCube
from llm_heatmap.probes.axes import language_axis, text_axis


def _spec():
    config = transformers.LlamaConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    return spec_from_model(transformers.LlamaForCausalLM(config))


def test_image_share_by_hand():
    ids = [1, 9, 9, 2, 3]  # text, two image tokens, two text tokens
    head0 = [[1, 0, 0, 0, 0], [.5, .5, 0, 0, 0], [.2, .3, .5, 0, 0], [.1, .2, .3, .4, 0], [.1, .1, .1, .3, .4]]
    head1 = [[1, 0, 0, 0, 0], [.5, .5, 0, 0, 0], [.2, .3, .5, 0, 0], [.25, .25, .25, .25, 0], [0, .4, .4, .1, .1]]
    pattern = torch.tensor([[head0, head1]])
    cube = AttentionCube.from_pattern(pattern, _spec(), torch.tensor(ids), key_axis=language_axis(ids, 9))
    table = image_share(cube)
    # counted rows: the text tokens after the image (3 and 4); row 0 cannot reach the image, rows 1, 2 are image
    assert table["text_rows"].tolist() == [2, 2]
    assert table["image_share"].tolist() == pytest.approx([(0.5 + 0.2) / 2, (0.5 + 0.8) / 2], abs=1e-7)  # the cube holds float32
    assert table[["layer", "head"]].values.tolist() == [[0, 0], [0, 1]]


def test_no_text_row_after_the_image_is_nan_and_a_text_cube_is_refused():
    ids = [1, 2, 9]
    pattern = torch.tensor([[[[1, 0, 0], [.5, .5, 0], [.3, .3, .4]]] * 2])
    table = image_share(AttentionCube.from_pattern(pattern, _spec(), torch.tensor(ids), key_axis=language_axis(ids, 9)))
    assert all(math.isnan(v) for v in table["image_share"]) and table["text_rows"].tolist() == [0, 0]
    with pytest.raises(InputError, match="marks no image tokens"):
        image_share(AttentionCube.from_pattern(pattern, _spec(), torch.tensor(ids), key_axis=text_axis(3)))
