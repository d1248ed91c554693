"""Towers that pack several images (Qwen2-VL) or windows (Qwen2.5-VL) into one sequence and call the attention
kernel once per image or window: the captured layer is the block-diagonal pattern over all the tower's patches,
in the tower's own order, equal within 1e-5 to the tower's attention recomputed from each module's inputs (its
`output_attentions` records nothing); the axis says which image and cell each position is."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl

from eager_reference import to_eager
from llm_heatmap import InputError
from llm_heatmap.analyses.maps.image_maps import head_image_maps
from llm_heatmap.probes import capture, capture_sites
from llm_heatmap.probes.sites import axis_labels
from tiny_models import qwen_image_inputs, tiny_qwen2_5_vl, tiny_qwen2_vl

ROTARY = {"qwen2_vl": modeling_qwen2_vl.apply_rotary_pos_emb_vision,
          "qwen2_5_vl": modeling_qwen2_5_vl.apply_rotary_pos_emb_vision}


def tower_reference(model, inputs):
    """Per tower layer: softmax(q k^T * scaling) over the whole packed sequence with every key outside the query's
    segment (the module's `cu_seqlens`) masked, q and k rebuilt from the module's inputs with the tower's own
    rotary embedding; and the (cos, sin) each layer got, in the tower's order."""
    patterns, rotations = [], []
    rotate = ROTARY[model.config.model_type]

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        q, k, _ = module.qkv(hidden).reshape(hidden.shape[0], 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = rotate(q, k, cos, sin)
        bounds = kwargs["cu_seqlens"].tolist()
        segment = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff())
        scores = torch.einsum("qhd,khd->hqk", q, k) * module.scaling
        scores = scores.masked_fill(segment[:, None] != segment[None, :], float("-inf"))
        patterns.append(scores.softmax(-1))
        rotations.append((cos, sin))

    handles = [block.attn.register_forward_pre_hook(record, with_kwargs=True) for block in model.model.visual.blocks]
    try:
        with torch.no_grad():
            model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(patterns), rotations


def capture_all(model, inputs, **options):
    with torch.no_grad(), capture_sites(model, **options) as probe:
        model(**inputs)
    return probe.cubes(inputs["input_ids"])


def check_axis_is_the_towers_order(model, cube, rotations, grids):
    """The axis's (row, col) of every position, put through the tower's rotary embedding, gives the (cos, sin) the
    tower's layers got: the axis names the patch each position of the tower's sequence is."""
    axis = cube.key_axis
    cells = torch.tensor([axis.row, axis.col]).T
    tower = model.model.visual
    cos, sin = tower.rotary_pos_emb(torch.zeros(len(cells), 1), cells)
    torch.testing.assert_close(cos, rotations[0][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, rotations[0][1], atol=1e-6, rtol=0)
    assert axis.grids == tuple(grids)
    images = torch.tensor(axis.image)
    for index, (rows, cols) in enumerate(grids):
        chosen = images == index
        assert sorted(map(tuple, cells[chosen].tolist())) == [(r, c) for r in range(rows) for c in range(cols)]
    return images


def check_zero_between_images(cube, images):
    between = images[:, None] != images[None, :]
    assert bool((cube.pattern[..., between] == 0).all())


def test_qwen2_vl_two_images_of_different_sizes_in_one_pass():
    model = tiny_qwen2_vl()
    grids = [(4, 6), (2, 4)]
    inputs = qwen_image_inputs(grids)
    cubes = capture_all(model, inputs)
    reference, rotations = tower_reference(model, inputs)
    vision = cubes["vision"]
    assert vision.pattern.shape == (2, 4, 32, 32)
    torch.testing.assert_close(vision.pattern, reference, atol=1e-5, rtol=0)
    images = check_axis_is_the_towers_order(model, vision, rotations, grids)
    assert images.tolist() == [0] * 24 + [1] * 8, "Qwen2-VL's tower keeps the images in the order of the input"
    check_zero_between_images(vision, images)
    assert vision.tokens[24] == "i1,r0,c0" and vision.tokens[0] == "i0,r0,c0"
    # the language model over both images: each run of image tokens one image, on its merged grid
    with torch.no_grad():
        out = to_eager(model)(**inputs, output_attentions=True)
    torch.testing.assert_close(cubes["self"].pattern, torch.stack(out.attentions, 1)[0], atol=1e-5, rtol=0)
    assert cubes["self"].key_axis.grids == ((2, 3), (1, 2))
    # per image: the maps of a patch of image 1 lie on image 1's grid, and none of its attention reaches image 0
    last = head_image_maps(vision, "last", image=1)
    assert last.grid == (2, 4) and last.query_cell == (1, 3)
    torch.testing.assert_close(last.mass, torch.ones_like(last.mass), atol=1e-5, rtol=0)
    assert bool((head_image_maps(vision, "last", image=0).mass == 0).all())


@pytest.mark.parametrize("grids", [[(4, 8)], [(6, 4), (4, 8)]], ids=["one image", "two images"])
def test_qwen2_5_vl_windowed_and_full_layers(grids):
    """Layer 0 attends within windows (one kernel call per window, windows of 16 and 8 patches), layer 1 over each
    whole image; both in the tower's window order, which the axis describes."""
    model = tiny_qwen2_5_vl()
    inputs = qwen_image_inputs(grids)
    cubes = capture_all(model, inputs)
    reference, rotations = tower_reference(model, inputs)
    vision = cubes["vision"]
    torch.testing.assert_close(vision.pattern, reference, atol=1e-5, rtol=0)
    images = check_axis_is_the_towers_order(model, vision, rotations, grids)
    check_zero_between_images(vision, images)
    windowed, full = (vision.pattern[layer].gt(0).all(0) for layer in (0, 1))
    assert torch.equal(full, images[:, None] == images[None, :]), "the full layer attends over each whole image"
    assert int(windowed.sum()) < int(full.sum()), "the windowed layer attends within smaller blocks"
    # a window is 2x2 merged tokens: positions that see each other in layer 0 lie in one 4x4-patch window
    rows, cols = torch.tensor(vision.key_axis.row), torch.tensor(vision.key_axis.col)
    window = images * 10_000 + (rows // 4) * 100 + cols // 4
    assert torch.equal(windowed, window[:, None] == window[None, :])
    with torch.no_grad():
        out = to_eager(model)(**inputs, output_attentions=True)
    torch.testing.assert_close(cubes["self"].pattern, torch.stack(out.attentions, 1)[0], atol=1e-5, rtol=0)
    assert axis_labels(vision.key_axis) == vision.tokens


def test_computed_output_of_a_packed_tower_equals_the_kernels():
    """compute_output=True computes each image's (window's) output from its own block: the model's output is the
    untouched one within fp32 rounding, and the captured cube is the same."""
    model = tiny_qwen2_5_vl()
    inputs = qwen_image_inputs([(6, 4), (4, 8)])
    with torch.no_grad():
        expected = model(**inputs).logits
    for compute in (False, True):
        with torch.no_grad(), capture_sites(model, sites="vision", compute_output=compute) as probe:
            logits = model(**inputs).logits
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        cube = probe.cubes(inputs["input_ids"])["vision"]
        if not compute:
            kept = cube.pattern
    torch.testing.assert_close(cube.pattern, kept, atol=1e-6, rtol=0)


def test_head_subset_and_side_tensors_of_a_packed_tower():
    """Chosen heads are the same rows of the full capture; the kept queries and keys of every segment join into one
    sequence in the tower's order."""
    model = tiny_qwen2_vl()
    inputs = qwen_image_inputs([(4, 6), (2, 4)])
    full = capture_all(model, inputs)["vision"]
    subset = capture_all(model, inputs, sites="vision", heads=[1, 3], queries_and_keys=True)["vision"]
    torch.testing.assert_close(subset.pattern, full.pattern[:, [1, 3]], atol=0, rtol=0)
    assert subset.queries.shape == (2, 2, 32, 4) and subset.keys.shape == (2, 4, 32, 4)
    scores = torch.einsum("lhqd,lhkd->lhqk", subset.queries, subset.keys[:, [1, 3]]) * 4 ** -0.5
    torch.testing.assert_close(scores[:, :, :24, :24].softmax(-1), full.pattern[:, [1, 3], :24, :24], atol=1e-5, rtol=0)


def test_streaming_a_packed_tower_is_refused_in_one_sentence():
    model = tiny_qwen2_vl()
    inputs = qwen_image_inputs([(4, 6), (2, 4)])
    spec = capture_sites(model, sites="vision").specs["vision"]

    class Keeper:
        def consume(self, part):
            pass

    for options in (dict(consumers=[Keeper()], keep=False), dict(last_queries=3)):
        with pytest.raises(InputError, match=r"attends per image or per window of one packed sequence.*pass one image "
                                             r"at a time\.$"):
            with torch.no_grad(), capture(model, spec=spec, **options):
                model(**inputs)


def test_one_image_is_one_segment_and_keeps_the_plain_capture():
    """cu_seqlens of one image name one segment: the layer is captured by the ordinary path, equal to the reference."""
    model = tiny_qwen2_vl()
    inputs = qwen_image_inputs([(4, 6)])
    cube = capture_all(model, inputs)["vision"]
    reference, _ = tower_reference(model, inputs)
    torch.testing.assert_close(cube.pattern, reference, atol=1e-5, rtol=0)
    assert cube.tokens[4] == "r0,c2"


def test_a_packed_layer_that_skips_a_segment_is_refused_in_one_sentence():
    """The module's cu_seqlens name two images, but (a hook of the user's cutting the input to the first image) it
    calls the kernel once: the capture refuses rather than keep rows no call wrote."""
    model = tiny_qwen2_vl()
    inputs = qwen_image_inputs([(4, 6), (2, 4)])
    attention = model.model.visual.blocks[0].attn

    def first_image_only(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        cos, sin = kwargs["position_embeddings"]
        kwargs.update(cu_seqlens=kwargs["cu_seqlens"][:2], position_embeddings=(cos[:24], sin[:24]))
        return (hidden[:24],), kwargs

    with capture_sites(model, sites="vision"):
        handle = attention.register_forward_pre_hook(first_image_only, with_kwargs=True)
        try:
            with pytest.raises(InputError, match=r"called the attention kernel for 1 of the 2 segments its cu_seqlens "
                                                 r"name; load the model with attn_implementation='sdpa' or 'eager'\.$"):
                with torch.no_grad():
                    model(**inputs)
        finally:
            handle.remove()


def test_a_packed_layer_attends_within_its_segments_in_the_geometry_and_the_metrics(tmp_path):
    """The cube's spec holds each packed layer's segments: `attendable()` is the block-diagonal of the tower's own
    reference (a key outside the query's image or window is no cell of the row), so `norm_entropy` divides each
    row's entropy by the log of its segment's size; the segments survive a save and load."""
    from llm_heatmap.analyses.heads.metrics import head_metrics
    from llm_heatmap.probes import AttentionCube

    model = tiny_qwen2_5_vl()
    inputs = qwen_image_inputs([(6, 4), (4, 8)])
    vision = capture_all(model, inputs)["vision"]
    reference, _ = tower_reference(model, inputs)
    assert len(vision.spec.segments) == vision.spec.num_layers and all(vision.spec.segments)
    assert torch.equal(vision.attendable(), reference.gt(0).any(1))  # "l q k", every head alike
    entropy = -torch.special.xlogy(reference.double(), reference.double()).sum(-1)  # "l h q"
    sizes = reference.gt(0).sum(-1).double()
    expected = (entropy / sizes.log()).mean(-1)  # "l h": every row has a segment of several patches
    table = head_metrics(vision).sort_values(["layer", "head"])
    torch.testing.assert_close(torch.tensor(table["norm_entropy"].to_numpy()), expected.flatten(), atol=1e-5, rtol=0)
    vision.save(tmp_path / "v.safetensors")
    assert AttentionCube.load(tmp_path / "v.safetensors").spec.segments == vision.spec.segments
