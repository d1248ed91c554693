"""Streaming capture: parts in layer order and row chunks, the Downsampler, consumer protocol."""

from __future__ import annotations

import pytest
import torch

from llm_heatmap.errors import InputError
from llm_heatmap.probes import AttentionCube, CubeConsumer, Downsampler, capture, capture_prompt, downsample, replay
from llm_heatmap.probes import stream
from tiny_models import VOCAB, tiny_model


class Recorder:
    def __init__(self):
        self.parts, self.finished = [], 0

    def consume(self, part):
        self.parts.append(part)

    def finish(self):
        self.finished += 1


@pytest.fixture(scope="module")
def gemma3():
    return tiny_model("gemma3", "sdpa")


def captured(model, ids, **options):
    with torch.no_grad(), capture(model, **options) as probe:
        model(input_ids=ids)
    return probe


def test_parts_are_layers_in_order_in_row_chunks(gemma3):
    ids = torch.randint(0, VOCAB, (1, 12))
    recorder = Recorder()
    probe = captured(gemma3, ids, consumers=[recorder], chunk_rows=5)
    cube = probe.cube(ids)
    assert isinstance(recorder, CubeConsumer) and recorder.finished == 1
    assert [(p.layers, p.query_positions.tolist()[0], p.num_queries) for p in recorder.parts] == [
        ((layer,), start, rows) for layer in range(3) for start, rows in ((0, 5), (5, 5), (10, 2))
    ]
    for part in recorder.parts:
        assert not part.batched and part.pattern.shape[:2] == (1, 4) and part.num_keys == 12
        assert part.token_ids.tolist() == ids[0].tolist()
    for layer in range(3):
        rows = torch.cat([p.pattern for p in recorder.parts if p.layers == (layer,)], dim=-2)
        assert torch.equal(rows[0], cube.pattern[layer])  # the same blocks fill the kept cube


def test_automatic_chunking_past_the_threshold(gemma3, monkeypatch):
    ids = torch.randint(0, VOCAB, (1, 16))
    full = captured(gemma3, ids).cube(ids)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 4 * 16 * 4 * 3)  # three rows of one layer's fp32 pattern
    monkeypatch.setattr(stream, "MIN_CHUNK_ROWS", 2)
    assert stream.auto_chunk_rows(1, 4, 16, 16) == 3
    recorder = Recorder()
    chunked = captured(gemma3, ids, consumers=[recorder]).cube(ids)
    assert max(p.num_queries for p in recorder.parts) == 3
    torch.testing.assert_close(chunked.pattern, full.pattern, atol=1e-6, rtol=0)


def test_long_rows_are_chunked_at_least_min_rows_at_a_time_within_the_bound(monkeypatch):
    """SmolLM2's shape: 16 MiB is 227 rows at 2,048 keys, 56 at 8,192 (then MIN_CHUNK_ROWS, 31.5 MiB), 28 at
    16,384 (then the 32 MiB bound: 56 rows)."""
    per_row = lambda keys: 9 * keys * 4
    assert stream.auto_chunk_rows(1, 9, 2048, 2048) == stream.CHUNK_BYTES // per_row(2048) == 227
    assert stream.auto_chunk_rows(1, 9, 8192, 8192) == stream.MIN_CHUNK_ROWS == 112
    assert stream.auto_chunk_rows(1, 9, 16384, 16384) == stream.MAX_CHUNK_BYTES // per_row(16384) == 56
    assert stream.auto_chunk_rows(1, 9, 8192, 40) == 40  # never more rows than there are
    assert stream.chunk_bytes(1, 9, 8192) == 112 * per_row(8192)
    monkeypatch.setattr(stream, "MIN_CHUNK_ROWS", 1000)
    assert stream.auto_chunk_rows(1, 9, 8192, 8192) == stream.MAX_CHUNK_BYTES // per_row(8192) == 113


@pytest.mark.parametrize("compute_output", [False, True])
def test_every_kernel_call_of_a_capture_computes_its_scores_in_one_allocation(monkeypatch, compute_output):
    """A fresh block-sized buffer per layer would be faulted in again at every layer (`reused_memory.py`)."""
    from llm_heatmap.probes import tap

    model = tiny_model("llama", "sdpa")
    made = []
    original = tap.KernelCall.from_arguments.__func__

    def recorded(cls, *args, **kwargs):
        made.append(original(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tap.KernelCall, "from_arguments", classmethod(recorded))
    captured(model, torch.randint(0, VOCAB, (1, 12)), consumers=[Recorder()], keep=False, chunk_rows=5,
             compute_output=compute_output)
    assert len(made) == model.config.num_hidden_layers >= 2
    assert len({id(call.scores_memory) for call in made}) == 1


def test_streaming_without_keeping(gemma3):
    ids = torch.randint(0, VOCAB, (1, 10))
    recorder = Recorder()
    probe = captured(gemma3, ids, consumers=[recorder], keep=False, last_queries=3)
    assert len(recorder.parts) == 3 and all(p.query_positions.tolist() == [7, 8, 9] for p in recorder.parts)
    with pytest.raises(InputError, match="keep=False"):
        probe.cube(ids)


class _TrimmedCopier:
    """Takes trimmed parts and copies each, as the protocol asks of a consumer that keeps values."""

    takes_trimmed_parts = True

    def __init__(self):
        self.patterns, self.addresses = [], set()

    def consume(self, part):
        self.patterns.append(part.pattern.clone())
        self.addresses.add(part.pattern.data_ptr())


def test_reused_memory_views_one_allocation_until_a_larger_or_other_one_is_asked():
    from llm_heatmap.probes.reused_memory import ReusedMemory

    memory = ReusedMemory()
    first = memory.view((2, 3), torch.float32, "cpu", reserve=10)
    assert memory.view((1, 10), torch.float32, "cpu").data_ptr() == first.data_ptr()  # within the reserve
    larger = memory.view((4, 4), torch.float32, "cpu")
    assert larger.shape == (4, 4) and larger.data_ptr() != first.data_ptr()
    assert memory.view((2, 2), torch.float32, "cpu").data_ptr() == larger.data_ptr()
    assert memory.view((2, 2), torch.float64, "cpu").dtype == torch.float64


@pytest.mark.parametrize("computed", [False, True])
def test_streamed_blocks_are_written_into_one_reused_memory(gemma3, computed):
    """Every trimmed part of a streaming capture is a view of the same allocation (a fresh block per part is
    returned to the system and faulted in again, a third of the forward at 16,384 tokens), and the copies the
    consumer took are still the kept cube's rows."""
    ids = torch.randint(0, VOCAB, (1, 12))
    kept = captured(gemma3, ids).cube(ids)
    copier = _TrimmedCopier()
    captured(gemma3, ids, consumers=[copier], keep=False, chunk_rows=5, compute_output=computed)
    assert len(copier.patterns) == 9 and len(copier.addresses) == 1
    for index, pattern in enumerate(copier.patterns):
        layer, start = divmod(index, 3)
        rows = kept.pattern[layer, :, start * 5 : start * 5 + 5]
        torch.testing.assert_close(pattern[0], rows[..., : pattern.shape[-1]], atol=1e-6, rtol=0)
        assert not rows[..., pattern.shape[-1]:].any()


def test_streaming_needs_one_sequence(gemma3):
    with pytest.raises(InputError, match="one sequence"), torch.no_grad(), capture(gemma3, consumers=[Recorder()]):
        gemma3(input_ids=torch.randint(0, VOCAB, (2, 6)))


def hand_cube(pattern: torch.Tensor) -> AttentionCube:
    from llm_heatmap.models import ModelSpec

    layers, heads, q, k = pattern.shape
    spec = ModelSpec(model_type="toy", architecture="Toy", num_layers=layers, num_heads=heads, num_kv_heads=heads,
                     head_dim=4, causal=False, layer_types=("full_attention",) * layers)
    return AttentionCube(pattern=pattern, spec=spec, tokens=[f"t{i}" for i in range(k)], token_ids=torch.arange(k),
                         layers=tuple(range(layers)), heads=tuple(range(heads)), query_positions=torch.arange(q),
                         key_mask=torch.ones(k, dtype=torch.bool), query_mask=torch.ones(q, dtype=torch.bool))


def test_downsampler_by_hand():
    pattern = torch.softmax(torch.randn(1, 1, 5, 5), -1)
    small = downsample(hand_cube(pattern), 2)  # 5 -> bins of 3 and 2
    p = pattern[0, 0]
    expected = torch.stack([
        torch.stack([p[0:3, 0:3].sum(1).mean(), p[0:3, 3:5].sum(1).mean()]),
        torch.stack([p[3:5, 0:3].sum(1).mean(), p[3:5, 3:5].sum(1).mean()]),
    ])
    torch.testing.assert_close(small.pattern[0, 0], expected)
    assert small.pooling.query_edges == (0, 3, 5) and small.pooling.key_edges == (0, 3, 5)
    assert small.pooling.query_first == (0, 3) and small.pooling.query_last == (2, 4)
    assert small.num_tokens == 5 and small.num_keys == 2
    assert small.query_positions.tolist() == [1, 3] and small.tokens == ["t0", "t3"]
    torch.testing.assert_close(small.pattern.sum(-1), torch.ones(1, 1, 2))


def test_downsampler_streamed_equals_downsampled_cube(gemma3):
    ids = torch.randint(0, VOCAB, (1, 23))
    sampler, same_size = Downsampler(7), Downsampler(64)
    full = captured(gemma3, ids, consumers=[sampler, same_size], chunk_rows=4).cube(ids)
    streamed = sampler.cube()
    assert streamed.pattern.shape == (3, 4, 7, 7) and streamed.layers == (0, 1, 2)
    torch.testing.assert_close(streamed.pattern, downsample(full, 7).pattern, atol=1e-6, rtol=0)
    torch.testing.assert_close(streamed.pattern.sum(-1), torch.ones(3, 4, 7), atol=1e-5, rtol=0)
    assert torch.equal(same_size.cube().pattern, full.pattern)  # bins of one position: an exact copy


def test_downsampler_keeps_only_the_latest_pass(gemma3):
    sampler = Downsampler(4)
    with torch.no_grad(), capture(gemma3, consumers=[sampler], keep=False):
        gemma3(input_ids=torch.randint(0, VOCAB, (1, 9)))
        gemma3(input_ids=torch.randint(0, VOCAB, (1, 6)))
    assert sampler.cube().num_tokens == 6
    with pytest.raises(InputError):
        Downsampler(4).cube()


def test_replay_feeds_a_saved_cube():
    cube = hand_cube(torch.softmax(torch.randn(2, 3, 6, 6), -1))
    recorder = Recorder()
    replay(cube, [recorder], chunk_rows=4)
    assert [(p.layers, p.num_queries) for p in recorder.parts] == [((0,), 4), ((0,), 2), ((1,), 4), ((1,), 2)]
    assert recorder.finished == 1


@pytest.mark.slow
def test_streamed_long_prompt_on_smollm2(smollm2):
    model, tokenizer, _ = smollm2
    prompt = " ".join(f"word{i}" for i in range(40))
    sampler = Downsampler(32)
    assert capture_prompt(model, tokenizer, prompt, consumers=[sampler], keep=False, chunk_rows=64, layers=[0, 15]) is None
    cube = sampler.cube()
    assert cube.pattern.shape[:3] == (2, 9, 32) and cube.num_tokens > 64
    torch.testing.assert_close(cube.pattern.sum(-1), torch.ones(2, 9, 32), atol=1e-4, rtol=0)


class OnDevice:
    """A consumer that records the device of every part and of its side tensors."""

    takes_trimmed_parts = True

    def __init__(self):
        self.devices = set()

    def consume(self, part):
        self.devices |= {t.device.type for t in (part.pattern, part.value_norms, part.output_norms) if t is not None}


ON_DEVICES = pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"))])


@ON_DEVICES
def test_a_kept_cube_of_a_model_on_its_device_equals_the_cpu_capture(gemma3, device):
    """The kept cube lives in host memory whatever the model's device: blocks computed on the device are copied
    into it (the softmax writes straight into the cube only where both are on one device)."""
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))

    def kept(on):
        model = gemma3.to(on)
        with torch.no_grad(), capture(model, chunk_rows=7) as probe:
            model(input_ids=ids.to(on))
        return probe.cube(ids)

    cube, reference = kept(device), kept("cpu")
    assert cube.pattern.device.type == "cpu"
    torch.testing.assert_close(cube.pattern, reference.pattern, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cube.value_norms, reference.value_norms, atol=1e-5, rtol=1e-4)


@ON_DEVICES
def test_streamed_grid_and_metrics_stay_on_the_models_device(gemma3, device):
    """Every part reaches the consumers on the model's device (nothing copied to the host per block), and
    the downsampled grid and the metrics equal those of the same capture on the CPU."""
    from llm_heatmap.analyses import HeadMetricsReducer

    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))

    def streamed(model, on):
        sampler, reducer, seen = Downsampler(16), HeadMetricsReducer(), OnDevice()
        with torch.no_grad(), capture(model, consumers=[sampler, reducer, seen], keep=False, chunk_rows=7):
            model(input_ids=ids.to(on))
        return sampler.cube(), reducer.table(), seen.devices

    grid, table, devices = streamed(gemma3.to(device), device)
    assert devices == {device}
    reference_grid, reference_table, _ = streamed(gemma3.to("cpu"), "cpu")
    torch.testing.assert_close(grid.pattern.cpu(), reference_grid.pattern, atol=1e-5, rtol=1e-4)
    numeric = reference_table.select_dtypes("number").columns
    assert (table[numeric] - reference_table[numeric]).abs().max().max() < 1e-4
