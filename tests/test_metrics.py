"""Per-head metrics: hand-computed values, an independent per-row reference, streaming = in-memory."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from llm_heatmap.analyses import HeadMetricsReducer, head_metrics, is_special_token, segment_ids
from llm_heatmap.analyses.heads.metrics import COLUMNS
from llm_heatmap.probes.stream import iter_parts
from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec
from llm_heatmap.probes import AttentionCube, attendable_mask
from llm_heatmap.probes.cube import StreamPart
from llm_heatmap.probes.native_softmax import Products
from eager_reference import eager_cube


def make_spec(layers=1, heads=2, kv_heads=None, causal=True, window=None, layer_types=None):
    types = layer_types or ("sliding_attention" if window else "full_attention",) * layers
    return ModelSpec(model_type="test", architecture="Test", num_layers=layers, num_heads=heads,
                     num_kv_heads=kv_heads or heads, head_dim=4, causal=causal, layer_types=tuple(types),
                     sliding_window=window)


def make_cube(pattern, spec, tokens=None, ids=None, query_positions=None, key_mask=None, query_mask=None):
    layers, heads, rows, keys = pattern.shape
    tokens = tokens or [f"t{i}" for i in range(keys)]
    return AttentionCube(
        pattern=pattern.float(), spec=spec, tokens=list(tokens),
        token_ids=torch.as_tensor(ids if ids is not None else range(keys)).long(),
        layers=tuple(range(layers)), heads=tuple(range(heads)),
        query_positions=query_positions if query_positions is not None else torch.arange(keys),
        key_mask=key_mask if key_mask is not None else torch.ones(keys, dtype=torch.bool),
        query_mask=query_mask if query_mask is not None else torch.ones(rows, dtype=torch.bool))


def random_cube(spec, keys, seed=0, rows=None, tokens=None, ids=None, key_mask=None, temperature=2.0):
    """Softmax of random logits under the spec's own attendable mask (the model's masking)."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.arange(keys) if rows is None else torch.arange(keys - rows, keys)
    key_mask = torch.ones(keys, dtype=torch.bool) if key_mask is None else key_mask
    allowed = attendable_mask(spec, range(spec.num_layers), positions, key_mask)[:, None]
    logits = temperature * torch.randn(spec.num_layers, spec.num_heads, len(positions), keys, generator=generator)
    pattern = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return make_cube(pattern, spec, tokens=tokens, ids=ids, query_positions=positions, key_mask=key_mask)


def reference_metrics(cube) -> pd.DataFrame:
    """The metric definitions written out row by row, head by head, in numpy."""
    pattern = cube.pattern.double().numpy()
    allowed = cube.attendable().numpy()
    positions = cube.query_positions.numpy()
    real_rows = cube.query_mask.numpy().astype(bool)
    first = int(np.flatnonzero(cube.key_mask.numpy())[0])
    special = np.array([is_special_token(t) for t in cube.tokens])
    segments = segment_ids(cube.tokens).numpy()
    records = []
    for li, layer in enumerate(cube.layers):
        for hi, head in enumerate(cube.heads):
            acc = {k: [] for k in ("entropy", "norm_entropy", "effective_keys", "effective_keys_frac", "max_weight",
                                   "prev_token_mass", "current_token_mass", "next_token_mass", "mean_distance",
                                   "distance_ratio", "special_mass", "local_mass", "diag_uniform", "block",
                                   "block_uniform")}
            sink_all, sink_no0 = [], []
            for r, pos in enumerate(positions):
                if not real_rows[r]:
                    continue
                keys = np.flatnonzero(allowed[li, r])
                weights = pattern[li, hi, r, keys]
                if first in keys:
                    sink_all.append(pattern[li, hi, r, first])
                    if pos != first:
                        sink_no0.append(pattern[li, hi, r, first])
                n = len(keys)
                if n < 2:
                    continue
                entropy = -sum(w * math.log(w) for w in weights if w > 0)
                acc["entropy"].append(entropy)
                acc["norm_entropy"].append(entropy / math.log(n))
                acc["effective_keys"].append(math.exp(entropy))
                acc["effective_keys_frac"].append(math.exp(entropy) / n)
                acc["max_weight"].append(weights.max())
                by_key = dict(zip(keys.tolist(), weights.tolist()))
                acc["prev_token_mass"].append(by_key.get(pos - 1, 0.0))
                acc["current_token_mass"].append(by_key.get(pos, 0.0))
                acc["next_token_mass"].append(by_key.get(pos + 1, 0.0))
                dist = np.abs(pos - keys)
                acc["mean_distance"].append((weights * dist).sum())
                acc["distance_ratio"].append((weights * dist).sum() / dist.mean())
                acc["special_mass"].append(weights[special[keys]].sum())
                acc["local_mass"].append(weights[dist <= 1].sum())
                acc["diag_uniform"].append((dist <= 1).mean())
                same = segments[keys] == segments[pos]
                acc["block"].append(weights[same].sum())
                acc["block_uniform"].append(same.mean())
            means = {k: float(np.mean(v)) for k, v in acc.items()}
            means["diagonal_score"] = means["local_mass"] - means.pop("diag_uniform")
            means["block_score"] = means.pop("block") - means.pop("block_uniform")
            means["sink_score"] = float(np.mean(sink_all)) if sink_all else 0.0
            means["sink_score_no_q0"] = float(np.mean(sink_no0)) if sink_no0 else 0.0
            records.append({"layer": layer, "head": head, **means})
    return pd.DataFrame.from_records(records)


REFERENCE_COLUMNS = ["entropy", "norm_entropy", "effective_keys", "effective_keys_frac", "max_weight", "sink_score",
                     "sink_score_no_q0", "prev_token_mass", "current_token_mass", "next_token_mass", "mean_distance",
                     "distance_ratio", "special_mass", "local_mass", "diagonal_score", "block_score"]


def assert_matches_reference(cube, atol=1e-6):
    """Metrics are computed per row in float32 (summed in float64): agreement to float32 precision."""
    table = head_metrics(cube)
    expected = reference_metrics(cube)
    assert list(table.columns) == list(COLUMNS)
    assert table[["layer", "head"]].values.tolist() == expected[["layer", "head"]].values.tolist()
    np.testing.assert_allclose(table[REFERENCE_COLUMNS].to_numpy(float), expected[REFERENCE_COLUMNS].to_numpy(float),
                               atol=atol, rtol=1e-5)
    assert not table[REFERENCE_COLUMNS].isna().any().any()
    return table


def test_hand_computed_uniform_and_previous_token_heads():
    uniform = torch.tril(torch.ones(4, 4))
    uniform = uniform / uniform.sum(-1, keepdim=True)
    previous = torch.zeros(4, 4)
    previous[0, 0] = 1
    previous[torch.arange(1, 4), torch.arange(0, 3)] = 1
    cube = make_cube(torch.stack([uniform, previous])[None], make_spec(heads=2))
    t = head_metrics(cube).set_index("head")
    u, p = t.loc[0], t.loc[1]
    assert u.n_rows == 3  # row 0 has one attendable key: left out
    assert u.entropy == pytest.approx((math.log(2) + math.log(3) + math.log(4)) / 3)
    assert u.norm_entropy == pytest.approx(1.0) and u.effective_keys_frac == pytest.approx(1.0)
    assert u.max_weight == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert u.sink_score == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert u.sink_score_no_q0 == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert u.mean_distance == pytest.approx((0.5 + 1 + 1.5) / 3)
    assert u.distance_ratio == pytest.approx(1.0)
    assert u.diagonal_score == pytest.approx(0.0, abs=1e-6) and u.vertical_score == pytest.approx(0.0, abs=1e-6)
    assert u.next_token_mass == 0.0
    assert p.entropy == 0.0 and p.max_weight == 1.0 and p.prev_token_mass == 1.0 and p.current_token_mass == 0.0
    assert p.mean_distance == 1.0
    assert p.distance_ratio == pytest.approx((1 / 0.5 + 1 / 1 + 1 / 1.5) / 3)
    assert p.sink_score == pytest.approx(2 / 4) and p.sink_score_no_q0 == pytest.approx(1 / 3)
    assert bool(p.sink_head) and bool(u.sink_head)  # 1/3 and 0.36 both reach the 0.3 flag
    # TransformerLens "mul": 3 of the 4 units of mass sit on the previous-token diagonal
    assert p.previous_token_score == pytest.approx(3 / 4)


def test_matches_row_by_row_reference_causal_gqa():
    tokens = ["<s>", "The", "Ġcat", "Ġsat", ".", "ĠIt", "Ġran", "!", "ĠThe", "Ġcat", "Ġsat", ","]
    cube = random_cube(make_spec(layers=2, heads=6, kv_heads=2), 12, tokens=tokens)
    table = assert_matches_reference(cube)
    assert table.kv_group.tolist() == [0, 0, 0, 1, 1, 1] * 2


def test_matches_reference_bidirectional_with_padding_and_windows():
    tokens = ["[CLS]", "a", "b", ",", "c", "[SEP]", "d", "e", "[SEP]", "[PAD]"]
    key_mask = torch.tensor([True] * 9 + [False])
    cube = random_cube(make_spec(layers=1, heads=3, causal=False), 10, tokens=tokens, key_mask=key_mask)
    # a padded query row with junk in it must not count
    cube.query_mask = key_mask.clone()
    cube.pattern[..., 9, :] = 0.5
    table = assert_matches_reference(cube)
    assert (table.next_token_mass > 0).all()  # bidirectional: the next token is attendable
    sliding = random_cube(make_spec(layers=2, heads=2, window=3), 16, seed=1)
    table = assert_matches_reference(sliding)
    assert np.isfinite(table.vertical_score).all()  # no column is seen by half the rows; the window is the yardstick


def test_last_rows_only_cube_matches_reference():
    cube = random_cube(make_spec(layers=2, heads=3), 10, rows=4, seed=3)
    table = assert_matches_reference(cube)
    assert (table.n_rows == 4).all()


def test_padding_changes_nothing():
    tokens = ["<s>", "a", "b", ".", "c", "a", "b", "d"]
    plain = random_cube(make_spec(layers=2, heads=3), 8, tokens=tokens, ids=[0, 1, 2, 3, 4, 1, 2, 5], seed=4)
    pad = 2
    pattern = torch.full((2, 3, 8 + pad, 8 + pad), 0.25)  # junk everywhere, real block copied in
    pattern[..., pad:, pad:] = plain.pattern
    key_mask = torch.tensor([False] * pad + [True] * 8)
    padded = make_cube(pattern, plain.spec, tokens=["<pad>"] * pad + tokens, ids=[99] * pad + plain.token_ids.tolist(),
                       key_mask=key_mask, query_mask=key_mask.clone())
    a, b = head_metrics(plain), head_metrics(padded)
    numeric = [c for c in COLUMNS if c not in ("vertical_key", "pattern_class", "sink_head")]
    np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), atol=1e-6, rtol=1e-5)
    assert (b.vertical_key - a.vertical_key == pad).all()


def test_streaming_parts_split_by_hand_equal_in_memory():
    cube = random_cube(make_spec(layers=3, heads=4, kv_heads=2), 11, seed=5,
                       tokens=["<s>", "x", ".", "y", "z", "x", ".", "y", "z", "w", "!"],
                       ids=[0, 1, 2, 3, 4, 1, 2, 3, 4, 5, 6])
    whole = head_metrics(cube, row_block=cube.num_queries)
    reducer = HeadMetricsReducer()
    # layers out of order and interleaved, uneven row blocks, a table read half way
    blocks = ((2, 0, 7), (0, 0, 1), (2, 7, 11), (0, 1, 2), (1, 0, 5), (0, 2, 11), (1, 5, 6), (1, 6, 11))
    for index, (layer, start, stop) in enumerate(blocks):
        part = replace(cube, pattern=cube.pattern[layer:layer + 1, :, start:stop], layers=(layer,),
                       query_positions=cube.query_positions[start:stop], query_mask=cube.query_mask[start:stop])
        reducer.consume(part)
        if index == 3:
            assert len(reducer.table()) == 2 * 4
    reducer.finish()
    streamed = reducer.table()
    numeric = whole.select_dtypes("number").columns
    # a block's rows are reduced together in float32 (column sums, the keys before its first row), so
    # another split differs by float32 rounding only
    np.testing.assert_allclose(whole[numeric].to_numpy(float), streamed[numeric].to_numpy(float), atol=1e-6, rtol=0)
    assert whole.pattern_class.tolist() == streamed.pattern_class.tolist()
    assert len(list(iter_parts(cube, 4))) == 3 * 3


def test_reducer_rejects_mixed_sequences_and_empty_input():
    a = random_cube(make_spec(), 6, seed=0)
    b = random_cube(make_spec(), 7, seed=0)
    reducer = HeadMetricsReducer()
    reducer.consume(a)
    with pytest.raises(InputError):
        reducer.consume(b)
    with pytest.raises(InputError):
        HeadMetricsReducer().table()
    with pytest.raises(InputError, match="two"):
        head_metrics(make_cube(torch.ones(1, 2, 1, 1), make_spec()))


@pytest.mark.parametrize("window", [None, 3])
def test_a_stray_cell_counts_no_more_in_a_part_with_the_softmax_pass_products(window):
    """A part from the capture's softmax pass carries its products (`part.stream.products`); the check then reads
    the weights' mass on the cells no row may attend among the near keys (`RowBlock.near_holds_outside`). A
    stray weight there must still be masked out, and the products, which counted it, left aside."""
    cube = random_cube(make_spec(layers=1, heads=2, window=window), 12, seed=3)
    clean = head_metrics(cube)
    stray = cube.pattern.clone()
    stray[0, 1, 8, 10] = 0.25
    reducer = HeadMetricsReducer()
    part = replace(cube, pattern=stray, stream=StreamPart(pass_index=0, row_start=0, row_stop=12, num_queries=12))
    factors, weights = reducer.factors(part), stray[0]
    products = Products(key_sums=tuple(torch.einsum("hqk,hfk->hqf", weights, c)[None] for c in factors.key_columns),
                        row_sums=tuple(torch.einsum("gq,hqk->hgk", u, weights)[None] for u in factors.row_weights))
    reducer.consume(replace(part, stream=replace(part.stream, products={reducer: products})))
    pd.testing.assert_frame_equal(reducer.table(), clean)


def _pattern_from_rows(rows):
    pattern = torch.stack(rows)
    return pattern / pattern.sum(-1, keepdim=True)


def test_pattern_classes_on_hand_made_heads():
    # three sentences of eight tokens each
    words = ["Ġw"] * 7
    tokens = ["<s>"] + words[:6] + ["."] + words + ["."] + words + ["."]
    keys = len(tokens)
    segments = segment_ids(tokens)
    causal = torch.tril(torch.ones(keys, keys))
    eye = torch.eye(keys)
    previous = torch.diag(torch.ones(keys - 1), -1)
    previous[0, 0] = 1
    sink = torch.zeros(keys, keys)
    sink[:, 0] = 1
    block = causal * (segments[:, None] == segments[None, :])
    heads = {
        "vertical": 0.85 * sink + 0.15 * causal / causal.sum(-1, keepdim=True),
        "diagonal": 0.7 * previous + 0.3 * eye,
        "vertical+diagonal": 0.5 * sink + 0.5 * previous,
        "block": block / block.sum(-1, keepdim=True),
        "heterogeneous": causal / causal.sum(-1, keepdim=True),
    }
    pattern = torch.stack([h / h.sum(-1, keepdim=True) for h in heads.values()])[None]
    table = head_metrics(make_cube(pattern, make_spec(heads=len(heads)), tokens=tokens))
    assert table.pattern_class.tolist() == list(heads)
    assert table.vertical_key[0] == 0
    assert table.block_score[3] > 0.5 and abs(table.block_score[4]) < 1e-6


def test_special_token_rule_and_segments():
    for token in ["[CLS]", "[SEP]", "<s>", "</s>", "<|im_start|>", "<|endoftext|>", ".", "Ġ,", "##!", "▁?", "\"", "[unused0]"]:
        assert is_special_token(token), token
    for token in ["the", "Ġcat", "##ing", "42", "Ċ", "Ġ", "<", "a.b", "$"]:
        assert not is_special_token(token), token
    tokens = ["[CLS]", "a", "b", ".", "[SEP]", "c", "d", "[SEP]"]
    assert segment_ids(tokens).tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert segment_ids(["<s>", "Hi", "Ċ", "Ġthere", "!", "Ġyes"]).tolist() == [0, 0, 0, 1, 1, 2]


def test_real_minilm_cube(minilm_eager):
    cube = eager_cube(minilm_eager, "The cat sat on the mat. It was happy.")
    keys = cube.num_keys
    table = assert_matches_reference(cube)
    assert len(table) == 6 * 12 and (table.n_rows == keys).all()
    # BERT heads are known to park attention on [CLS]/[SEP]/punctuation
    assert table.special_mass.max() > 0.5
    assert table.next_token_mass.max() > 0.5


def test_real_smollm2_cube(smollm2_eager):
    model, tokenizer, spec = smollm2_eager
    ids = tokenizer("Attention sinks appear early. Most heads of a decoder park weight on the first token.",
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    keys = ids.shape[1]
    cube = make_cube(torch.stack(out.attentions, 1)[0], spec, tokens=tokenizer.convert_ids_to_tokens(ids[0]), ids=ids[0])
    table = assert_matches_reference(cube)
    assert len(table) == 30 * 9 and (table.n_rows == keys - 1).all()
    assert table.kv_group.tolist() == [h // 3 for h in range(9)] * 30
    assert (table.next_token_mass == 0).all()  # causal
    assert table.sink_head.sum() > 0 and (table.vertical_key[table.pattern_class == "vertical"] == 0).mean() > 0.5


@pytest.mark.parametrize("window", [None, 3])
def test_weight_on_one_cell_outside_the_rows_keys_does_not_count(window):
    """The check that the cells no row may attend are 0 (`RowBlock.outside_is_zero`) must see one stray
    cell of a corner: after a causal row's last key (right corner) and before a window's first key (left)."""
    spec = make_spec(layers=1, heads=2, window=window)
    cube = random_cube(spec, 12, seed=3)
    clean = head_metrics(cube)
    for row, key in ((8, 10), (9, 2)) if window else ((8, 10),):
        stray = cube.pattern.clone()
        stray[0, 1, row, key] = 0.25
        pd.testing.assert_frame_equal(head_metrics(replace(cube, pattern=stray)), clean)
