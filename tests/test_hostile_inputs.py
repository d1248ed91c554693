"""Hostile input: cube files mutated field by field and tensor by tensor, option values at and past their
bounds, bad prompts in a batch. Every case ends in one of two ways: one sentence (an `InputError`, exit 2
in the CLI) and no output file, or a correct result that still satisfies the cube's invariants, checked
here independently of the schema code. Signals, concurrency and hostile model folders: test_hostile_processes.py."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from llm_heatmap.cli import main
from llm_heatmap.errors import InputError
from llm_heatmap.probes import AttentionCube, capture
from llm_heatmap.viz.style import MAX_GAMMA, MAX_PIXELS
from tiny_models import VOCAB, tiny_model

HOSTILE = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- a real cube file and ways to damage it ------------------------------------------------------

@pytest.fixture(scope="module")
def cube_file(tmp_path_factory) -> Path:
    """A cube of a tiny GQA Llama (2 layers, 4 heads on 2 KV heads, 7 tokens) with its value and output norms."""
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), capture(model) as probe:
        model(input_ids=ids)
    cube = probe.cube(ids, prompt="seven tokens", source="tiny-llama")
    assert cube.value_norms is not None and cube.output_norms is not None
    return cube.save(tmp_path_factory.mktemp("cube") / "tiny.cube.safetensors")


def read_raw(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["llm_heatmap"])
        return header, {name: handle.get_tensor(name) for name in handle.keys()}


def write_raw(path: Path, header, tensors: dict[str, torch.Tensor]) -> Path:
    text = header if isinstance(header, str) else json.dumps(header)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path), metadata={"llm_heatmap": text})
    return path


def assert_cube_invariants(cube: AttentionCube) -> None:
    """What any loaded cube must satisfy, written out here rather than taken from the schema module."""
    spec = cube.spec
    assert spec.num_layers >= 1 and spec.num_heads >= 1 and spec.num_heads % spec.num_kv_heads == 0
    assert all(0 <= layer < spec.num_layers for layer in cube.layers) and len(set(cube.layers)) == len(cube.layers)
    assert all(0 <= head < spec.num_heads for head in cube.heads) and len(set(cube.heads)) == len(cube.heads)
    layers, heads, queries, keys = cube.pattern.shape[-4:]
    assert (layers, heads) == (len(cube.layers), len(cube.heads)) and queries <= keys
    assert cube.pattern.is_floating_point() and torch.isfinite(cube.pattern).all()
    assert len(cube.tokens) == keys and all(isinstance(t, str) for t in cube.tokens)
    assert not cube.query_positions.is_floating_point()
    positions = cube.query_positions.tolist()
    assert positions == sorted(set(positions)) and 0 <= positions[0] and positions[-1] < keys
    weights = cube.pattern.double()
    assert weights.min() >= -1e-3 and weights.max() <= 1 + 1e-3
    rows = weights.sum(-1)[..., cube.query_mask]
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-2, rtol=0)
    for name in ("value_norms", "output_norms"):
        norms = getattr(cube, name)
        assert norms is None or (torch.isfinite(norms).all() and (norms >= 0).all())


def assert_refused_or_valid(path: Path) -> None:
    try:
        cube = AttentionCube.load(path)
    except InputError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message, message
        return
    assert_cube_invariants(cube)


HOSTILE_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(), st.text(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6,
)
HEADER_FIELDS = ["format", "version", "spec", "tokens", "layers", "heads", "prompt", "source", "metadata",
                 "weighting", "difference", "pooling", "stream"]
SPEC_FIELDS = ["model_type", "architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim", "causal",
               "layer_types", "sliding_window", "max_positions", "attention_modules", "output_projections"]


@HOSTILE
@given(field=st.sampled_from(HEADER_FIELDS + [f"spec.{f}" for f in SPEC_FIELDS]),
       value=st.one_of(st.just("<delete>"), HOSTILE_JSON, st.integers(-3, 12), st.lists(st.integers(-2, 9), max_size=9)))
def test_a_mutated_header_is_refused_in_one_sentence_or_loads_a_valid_cube(cube_file, field, value):
    header, tensors = read_raw(cube_file)
    where, _, name = field.rpartition(".")
    target = header["spec"] if where else header
    if value == "<delete>":
        target.pop(name, None)
    else:
        target[name] = value
    with tempfile.TemporaryDirectory() as folder:
        assert_refused_or_valid(write_raw(Path(folder) / "mutated.cube.safetensors", header, tensors))


def _damage(tensor: torch.Tensor, how: str) -> torch.Tensor | None:
    if how == "drop":
        return None
    if how in ("nan", "inf", "-inf", "negative", "x1e6", "zero"):
        value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "negative": -1.0, "x1e6": 1e6, "zero": 0.0}[how]
        damaged = tensor.double().clone()
        damaged.view(-1)[len(damaged.view(-1)) // 2] = value if how != "x1e6" else damaged.view(-1)[0] * value + 1
        return damaged.to(tensor.dtype) if tensor.is_floating_point() else damaged
    return {
        "all nan": lambda t: torch.full_like(t, math.nan, dtype=torch.float32),
        "all zero": torch.zeros_like,
        "scaled": lambda t: t.float() * 1e6,
        "negated": lambda t: -t.float(),
        "as float": lambda t: t.float(),
        "as int": lambda t: t.to(torch.int32),
        "as bool": lambda t: t.bool(),
        "as half": lambda t: t.half() if t.is_floating_point() else t,
        "drop first axis": lambda t: t[0] if t.dim() > 1 else t[:0],
        "add an axis": lambda t: t.unsqueeze(0),
        "last axis cut": lambda t: t[..., :-1],
        "empty": lambda t: t[..., :0],
        "reversed": lambda t: t.flip(-1),
        "shifted": lambda t: t + 100 if not t.dtype == torch.bool else ~t,
    }[how](tensor)


@HOSTILE
@given(name=st.sampled_from(["pattern", "token_ids", "query_positions", "key_mask", "query_mask",
                             "value_norms", "output_norms"]),
       how=st.sampled_from(["drop", "nan", "inf", "-inf", "negative", "x1e6", "zero", "all nan", "all zero",
                            "scaled", "negated", "as float", "as int", "as bool", "as half", "drop first axis",
                            "add an axis", "last axis cut", "empty", "reversed", "shifted"]),
       extra=st.booleans())
def test_a_mutated_tensor_is_refused_in_one_sentence_or_loads_a_valid_cube(cube_file, name, how, extra):
    header, tensors = read_raw(cube_file)
    damaged = _damage(tensors.pop(name), how)
    if damaged is not None:
        tensors[name] = damaged
    if extra:
        tensors["payload"] = torch.zeros(3)
    with tempfile.TemporaryDirectory() as folder:
        assert_refused_or_valid(write_raw(Path(folder) / "mutated.cube.safetensors", header, tensors))


NAMED_CASES = {  # the cases of issue 15 that were accepted silently or raised a traceback: (mutation, field named)
    "header not a JSON object": (lambda h, t: ("[1, 2]", t), "header must be a JSON object"),
    "header not JSON": (lambda h, t: ("{not json", t), "not valid JSON"),
    "missing spec": (lambda h, t: ({k: v for k, v in h.items() if k != "spec"}, t), '"spec" is missing'),
    "layers disagree with the pattern": (lambda h, t: ({**h, "layers": [0]}, t), '"layers" lists 1 layers'),
    "heads disagree with the pattern": (lambda h, t: ({**h, "heads": [0, 1]}, t), '"heads" lists 2 heads'),
    "one label for seven tokens": (lambda h, t: ({**h, "tokens": ["a"]}, t), "holds 1 token labels"),
    "head index -1": (lambda h, t: ({**h, "heads": [-1, 1, 2, 3]}, t), "names head -1"),
    "10^9 heads": (lambda h, t: ({**h, "spec": {**h["spec"], "num_heads": 10**9}}, t), "spec.num_heads"),
    "0 KV heads": (lambda h, t: ({**h, "spec": {**h["spec"], "num_kv_heads": 0}}, t), "spec.num_kv_heads"),
    "2-D pattern": (lambda h, t: (h, {**t, "pattern": t["pattern"][0, 0]}), "has 2 axes"),
    "non-square pattern": (lambda h, t: (h, {**t, "pattern": t["pattern"][..., :3, :]}), "query_positions"),
    "empty pattern": (lambda h, t: (h, {**t, "pattern": t["pattern"][:, :, :0, :0]}), "empty axis"),
    "float query positions": (lambda h, t: (h, {**t, "query_positions": t["query_positions"].float()}), "integers"),
    "all NaN": (lambda h, t: (h, {**t, "pattern": torch.full_like(t["pattern"], math.nan)}), "not finite"),
    "+Inf": (lambda h, t: (h, {**t, "pattern": t["pattern"] * math.inf}), "not finite"),
    "negative": (lambda h, t: (h, {**t, "pattern": -t["pattern"]}), "pattern"),
    "x1e6": (lambda h, t: (h, {**t, "pattern": t["pattern"] * 1e6}), "pattern"),
    "all zero": (lambda h, t: (h, {**t, "pattern": torch.zeros_like(t["pattern"])}), "pattern"),
    # issue 22: sizes, texts and magnitudes that passed the schema and failed later
    "lone surrogate in a token": (lambda h, t: ({**h, "tokens": ["\ud800", *h["tokens"][1:]]}, t), "lone surrogate"),
    "lone surrogate in the source": (lambda h, t: ({**h, "source": "a\udfff"}, t), "lone surrogate"),
    "lone surrogate in a metadata key": (lambda h, t: ({**h, "metadata": {"\ud800": 1}}, t), "lone surrogate"),
    "a prompt of a million characters": (lambda h, t: ({**h, "prompt": "x" * 10**6}, t), 'header field "prompt"'),
    "a token label of 5000 characters": (lambda h, t: ({**h, "tokens": ["y" * 5000, *h["tokens"][1:]]}, t),
                                         "token label longer"),
    "pooled key edges ending at 10^12": (lambda h, t: ({**h, "pooling": {
        "query_edges": list(range(8)), "key_edges": [*range(7), 10**12],
        "query_first": list(range(7)), "query_last": list(range(7))}}, t), "pooling.key_edges"),
    "more tokens than the model's context": (lambda h, t: ({**h, "spec": {**h["spec"], "max_positions": 4}}, t),
                                             "context"),
    "query mask all False": (lambda h, t: (h, {**t, "query_mask": torch.zeros_like(t["query_mask"])}), "query_mask"),
    "value norms of 3e38": (lambda h, t: (h, {**t, "value_norms": torch.full_like(t["value_norms"], 3e38)}),
                            "value_norms"),
    "keys of 1e30": (lambda h, t: (h, {**t, "output_norms": torch.full_like(t["output_norms"], 1e30)}),
                     "output_norms"),
}


@pytest.mark.parametrize("case", NAMED_CASES, ids=list(NAMED_CASES))
def test_named_hostile_cube_files_get_one_sentence_from_load_and_render(case, cube_file, tmp_path):
    mutate, words = NAMED_CASES[case]
    path = write_raw(tmp_path / "bad.cube.safetensors", *mutate(*read_raw(cube_file)))
    with pytest.raises(InputError) as error:
        AttentionCube.load(path)
    assert words in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)
    for command in (["render", path, "--html"], ["qk-map", "--cube", path, "--layer", "0"]):
        out = tmp_path / "out"
        code, lines = run_cli(*command, "--out", out)
        assert code == 2 and len(lines) == 1 and words in lines[0], (command, lines)
        assert not out.exists() or not any(out.iterdir())


def test_a_fifo_given_as_a_cube_is_named_for_what_it_is(tmp_path):
    fifo = tmp_path / "pipe.cube.safetensors"
    os.mkfifo(fifo)
    code, lines = run_cli("render", fifo, "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1 and "not a regular file" in lines[0], lines


def test_a_difference_cube_may_hold_negative_weights(cube_file, tmp_path):
    header, tensors = read_raw(cube_file)
    pattern = tensors["pattern"]
    difference = pattern - pattern.roll(1, dims=1)  # B - A of two real patterns: rows sum to 0
    tensors = {**tensors, "pattern": difference}
    with pytest.raises(InputError, match="pattern"):
        AttentionCube.load(write_raw(tmp_path / "unmarked.cube.safetensors", header, tensors))
    loaded = AttentionCube.load(write_raw(tmp_path / "diff.cube.safetensors", {**header, "difference": True}, tensors))
    assert loaded.difference and torch.equal(loaded.pattern, difference) and loaded.pattern.min() < 0


def test_a_pickle_named_like_a_cube_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.cube.safetensors"
    path.write_bytes(b"\x80\x04\x95" + f"cos\nsystem\n(Vtouch {marker}\ntR.".encode())
    with pytest.raises(InputError, match="not a safetensors file"):
        AttentionCube.load(path)
    assert not marker.exists()


# ---- the CLI: option bounds, checked before any work ----------------------------------------------

def run_cli(*args) -> tuple[int, list[str]]:
    """Exit status and stderr lines of the CLI run in this process."""
    import contextlib
    import io

    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse
            code = exit_.code
    return code, errors.getvalue().strip().splitlines()


PROMPT = "The sky is blue because air scatters blue light."
BAD_OPTIONS = {  # (arguments after the command's input, words the one sentence must hold)
    "cell size of 39 TiB": (["--cell-px", "100000"], "--max-pixels"),
    "negative cell size": (["--cell-px", "-3"], "--cell-px"),
    "huge size": (["--size", "1000000x1000000"], "--max-pixels"),
    "gamma inf": (["--scale", "power", "--gamma", "inf"], "--gamma"),
    "gamma 0": (["--scale", "power", "--gamma", "0"], "--gamma"),
    "gamma 1e300": (["--scale", "power", "--gamma", "1e300"], "--gamma"),
    "gamma nan": (["--scale", "power", "--gamma", "nan"], "--gamma"),
    "max pixels 0": (["--max-pixels", "0"], "--max-pixels"),
    "name with a folder": (["--name", "../.."], "--name"),
    "name with a slash": (["--name", "a/b"], "--name"),
    "invalid choice": (["--scale", "cubic"], "linear"),
    "max tokens 0": (["--max-tokens", "0"], "--max-tokens"),
    "layer past the model": (["--layers", "99"], "layer 99 is not in this cube"),
    "a range of 10^11 layers": (["--layers", "0-99999999999"], "--layers"),
    "a backwards range": (["--layers", "5-2"], "backwards"),
    "a negative head": (["--heads", "-1"], "--heads"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS, ids=list(BAD_OPTIONS))
def test_render_options_out_of_bounds(case, cube_file, tmp_path):
    options, words = BAD_OPTIONS[case]
    out = tmp_path / "out"
    code, lines = run_cli("render", cube_file, "--out", out, *options)
    assert code == 2 and len(lines) == 1 and words in lines[0], lines
    assert "Traceback" not in lines[0] and (not out.exists() or not any(out.iterdir()))
    assert not (tmp_path.parent / "ran").exists()


MODEL_OPTIONS = {  # refused before the model loads
    "resamples 0": (["compare", "--sets", "a.txt", "b.txt", "--resamples", "0"], "--resamples"),
    "permutations -1": (["compare", "--sets", "a.txt", "b.txt", "--permutations=-1"], "--permutations"),
    "confidence 1.5": (["compare", "--sets", "a.txt", "b.txt", "--confidence", "1.5"], "--confidence"),
    "confidence nan": (["compare", "--sets", "a.txt", "b.txt", "--confidence", "nan"], "--confidence"),
    "kv permutations -3": (["kv-similarity", PROMPT, "--permutations=-3"], "--permutations"),
    "pseudo group 0": (["kv-similarity", PROMPT, "--pseudo-group-size", "0"], "--pseudo-group-size"),
    "max cube 0": (["grid", PROMPT, "--max-cube-mb", "0"], "--max-cube-mb"),
    "max cube -1": (["grid", PROMPT, "--max-cube-mb=-1"], "--max-cube-mb"),
    "device that does not exist": (["grid", PROMPT, "--device", "nonsense:7"], "--device"),
    "cuda without one": (["grid", PROMPT, "--device", "cuda:3"], "--device"),
    "grid gamma inf": (["grid", PROMPT, "--scale", "power", "--gamma", "inf"], "--gamma"),
    "a billion resamples": (["compare", "--sets", "a.txt", "b.txt", "--resamples", "1000000000"], "--resamples"),
    "a billion permutations": (["compare", "--sets", "a.txt", "b.txt", "--permutations", "1000000000"],
                               "--permutations"),
    "seed -1": (["compare", "--sets", "a.txt", "b.txt", "--seed=-1"], "--seed"),
    "kv seed -1": (["kv-similarity", PROMPT, "--seed=-1"], "--seed"),
    "grid layers 10^11": (["grid", PROMPT, "--layers", "0-99999999999"], "--layers"),
    "atlas rank by an unknown score": (["atlas", "a.txt", "--rank-by", "nope"], "--rank-by"),
    "atlas seed -1": (["atlas", "a.txt", "--seed=-1"], "--seed"),
    "atlas a billion resamples": (["atlas", "a.txt", "--resamples", "1000000000"], "--resamples"),
}


@pytest.mark.parametrize("case", MODEL_OPTIONS, ids=list(MODEL_OPTIONS))
def test_command_options_out_of_bounds_before_any_work(case, tmp_path, monkeypatch):
    arguments, words = MODEL_OPTIONS[case]
    monkeypatch.chdir(tmp_path)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("one prompt here\nanother prompt here\n")
    if "cuda" in case and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    out = tmp_path / "out"
    code, lines = run_cli(*arguments, "--out", out, "--model", "./no-model-needed")
    assert code == 2 and len(lines) == 1 and words in lines[0], lines
    assert not out.exists() or not any(out.iterdir())


def test_a_one_token_prompt_is_refused_like_metrics(tmp_path, smollm2, monkeypatch):
    monkeypatch.setattr("llm_heatmap.models.load_model", lambda *args, **options: smollm2)  # the session's copy
    code, lines = run_cli("kv-similarity", "a", "--model", "smollm2-135m", "--out", tmp_path / "kv.csv")
    metrics_code, metrics_lines = run_cli("metrics", "a", "--model", "smollm2-135m", "--out", tmp_path / "m.csv")
    assert (code, metrics_code) == (2, 2) and len(lines) == 1 and "need at least 2" in lines[0], lines
    assert len(metrics_lines) == 1 and "need at least 2" in metrics_lines[0], metrics_lines
    assert not any(tmp_path.iterdir())


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG header (PIL refuses to open images past its decompression-bomb
    limit, which a grid within --max-pixels may exceed)."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cell_px=st.one_of(st.none(), st.integers(-2, 3000)),
       gamma=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0.05, 5)),
       max_pixels=st.one_of(st.none(), st.integers(-1, 10**7)),
       size=st.one_of(st.none(), st.sampled_from(["200", "300x150", "0", "x", "5x-5", "2000000"])))
@example(cell_px=651, gamma=1.0, max_pixels=None, size=None)  # 179 Mpx: within the ceiling, past PIL's bomb limit
@example(cell_px=None, gamma=100.0, max_pixels=None, size=None)  # the largest gamma
def test_any_drawing_options_give_a_bounded_image_or_one_sentence(cube_file, cell_px, gamma, max_pixels, size):
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out"
        options = ["--scale", "power", "--gamma", repr(gamma)]
        options += [] if cell_px is None else ["--cell-px", cell_px]
        options += [] if max_pixels is None else ["--max-pixels", max_pixels]
        options += [] if size is None else ["--size", size]
        code, lines = run_cli("render", cube_file, "--out", out, "--name", "r", "--quiet", *options)
        if code != 0:
            assert code == 2 and len(lines) == 1, lines
            assert not out.exists() or not any(out.iterdir())
            return
        assert 0 < gamma <= MAX_GAMMA
        width, height = png_size(out / "r.png")
        assert width * height <= (max_pixels or MAX_PIXELS)
        assert sorted(p.name for p in out.iterdir()) == ["r.metrics.csv", "r.png"] or \
            sorted(p.name for p in out.iterdir()) == ["r.png"]


# ---- files that must come out the same, and tokens matplotlib cannot draw -------------------------

@pytest.mark.parametrize("fmt", ["svg", "pdf", "png"])
def test_vector_and_raster_output_is_deterministic(cube_file, tmp_path, fmt):
    outputs = []
    for run in range(2):
        out = tmp_path / str(run)
        assert run_cli("render", cube_file, "--out", out, "--name", "g", "--format", fmt, "--quiet")[0] == 0
        outputs.append((out / f"g.{fmt}").read_bytes())
    assert outputs[0] == outputs[1]


def test_tokens_with_emoji_and_control_characters_draw_without_warnings(cube_file, tmp_path):
    header, tensors = read_raw(cube_file)
    header["tokens"] = ["🙂", "\x07", "\u202e", "日本", "\x00", "𝔘", "a\tb"]
    header["source"] = "tiny\nllama\r"  # a newline in the source once reached the title as a glyph
    path = write_raw(tmp_path / "glyphs.cube.safetensors", header, tensors)
    script = (f"import sys; from llm_heatmap.cli import main; "
              f"sys.exit(main(['render', {str(path)!r}, '--out', {str(tmp_path / 'out')!r}, '--quiet']))")
    result = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONWARNINGS": "always"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


# ---- memory: the smallest limit counts -------------------------------------------------------------

def test_the_address_space_limit_counts_as_memory():
    script = """
import resource
from llm_heatmap.errors import InputError
from llm_heatmap.probes.memory import _meminfo, check_cube_fits, headroom
mapped = _meminfo("VmSize", "/proc/self/status")
resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**30, resource.RLIM_INFINITY))
size, where = headroom()
assert size <= 2**30 and "address space" in where, (size, where)
try:
    check_cube_fits(2**31, 3000)
except InputError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "address space" in result.stdout and "2.0 GiB" in result.stdout and "stream" in result.stdout


@pytest.mark.slow
def test_a_grid_whose_drawing_would_not_fit_is_refused_before_the_model_runs(tmp_path):
    out = tmp_path / "out"
    code, lines = run_cli("grid", PROMPT, "--model", "minilm-l6", "--out", out, "--cell-px", "60",
                          "--max-cube-mb", "20")
    assert code == 2 and len(lines) == 1 and "canvas" in lines[0], lines
    assert not out.exists() or not any(out.iterdir())


# ---- batch: bad prompts named by line, damaged parts recomputed ------------------------------------

def test_a_batch_names_a_prompt_too_short_for_metrics_by_line(tmp_path, smollm2, monkeypatch):
    monkeypatch.setattr("llm_heatmap.models.load_model", lambda *args, **options: smollm2)  # the session's copy
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the first prompt is fine\nthe second one too\na\nthe fourth is fine\n")
    out = tmp_path / "out"
    code, lines = run_cli("batch", prompts, "--model", "smollm2-135m", "--out", out)
    assert code == 2 and len(lines) == 1 and "line 3" in lines[0] and "need at least 2" in lines[0], lines
    assert not out.exists() or not any(out.rglob("*.parquet"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["empty", "truncated", "overwritten mid-file"])
def test_resume_recomputes_a_damaged_part(tmp_path, damage):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the first prompt is fine\nthe second one too\nand the third\n")
    out = tmp_path / "out"
    assert run_cli("batch", prompts, "--model", "minilm-l6", "--out", out, "--quiet")[0] == 0
    whole = pd.read_parquet(out / "heads.parquet")
    part = sorted((out / "parts").glob("*.parquet"))[1]
    data = part.read_bytes()
    middle = len(data) // 2
    part.write_bytes(b"" if damage == "empty" else data[:middle] if damage == "truncated"
                     else data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 16]) + data[middle + 16:])
    assert run_cli("batch", prompts, "--model", "minilm-l6", "--out", out, "--resume", "--quiet")[0] == 0
    resumed = pd.read_parquet(out / "heads.parquet")
    pd.testing.assert_frame_equal(resumed.reset_index(drop=True), whole.reset_index(drop=True))
    assert part.read_bytes() == data  # computed again, to the same bytes


# ---- prompt files: read up to a size, split at newlines only, every text Unicode --------------------

DEEP = "[" * 100_000 + "]" * 100_000
BAD_PROMPT_FILES = {  # (file name, content, words of the one sentence)
    "JSONL nested 100k deep": ("p.jsonl", '{"prompt": "fine"}\n{"prompt": "x", "deep": ' + DEEP + "}\n", "too deeply"),
    "lone surrogate in a prompt": ("p.jsonl", '{"prompt": "a \\ud800 b"}\n', "lone surrogate"),
    "lone surrogate in an id": ("p.jsonl", '{"prompt": "fine", "id": "\\udc00"}\n', "lone surrogate"),
    "lone surrogate in a group": ("p.jsonl", '{"prompt": "fine", "group": "\\udbff"}\n', "lone surrogate"),
}


@pytest.mark.parametrize("case", BAD_PROMPT_FILES, ids=list(BAD_PROMPT_FILES))
def test_bad_prompt_files_get_one_sentence_before_any_work(case, tmp_path, monkeypatch):
    name, content, words = BAD_PROMPT_FILES[case]
    (tmp_path / name).write_text(content, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for command in ("batch", "atlas"):
        code, lines = run_cli(command, name, "--out", tmp_path / "out", "--model", "./no-model-needed")
        assert code == 2 and len(lines) == 1 and words in lines[0] and name in lines[0], lines
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["grid", "--prompt-file", "/dev/zero"], ["batch", "/dev/zero"],
                                     ["metrics", "--prompt-file", "/dev/zero"]])
def test_a_prompt_file_that_never_ends_is_refused_at_a_size(command, tmp_path):
    code, lines = run_cli(*command, "--out", tmp_path / "out", "--model", "./no-model-needed")
    assert code == 2 and len(lines) == 1 and "larger than 256 MiB" in lines[0], lines


def test_text_prompt_files_split_at_newlines_only(tmp_path):
    from llm_heatmap.analyses.runs.prompts import read_prompts

    path = tmp_path / "p.txt"
    path.write_bytes("a\x0cb\u2028c\x1ed\u0085e\nsecond\r\nthird\rstill third\n\n".encode())
    prompts = read_prompts(path)
    assert [p.text for p in prompts] == ["a\x0cb\u2028c\x1ed\u0085e", "second", "third\rstill third"]
    assert [p.id for p in prompts] == ["0", "1", "2"]


# ---- an output set: two outputs naming one file are refused before any write -------------------------

def _collisions(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    (tmp_path / "link.csv").symlink_to(tmp_path / "real" / "x.csv")
    return {"same path": (tmp_path / "x.csv", tmp_path / "x.csv"),
            "through ..": (tmp_path / "real" / "x.csv", tmp_path / "real" / ".." / "real" / "x.csv"),
            "a linked folder": (tmp_path / "real" / "x.csv", tmp_path / "alias" / "x.csv"),
            "a linked file": (tmp_path / "real" / "x.csv", tmp_path / "link.csv")}


@pytest.mark.parametrize("force", [False, True])
def test_two_outputs_of_one_run_naming_one_file_are_refused_before_any_write(tmp_path, force):
    for case, (table, cube) in _collisions(tmp_path).items():
        code, lines = run_cli("compare", "one prompt", "two prompt", "--out", table, "--cube-out", cube,
                              "--model", "./no-model-needed", *(["--force"] if force else []))
        assert code == 2 and len(lines) == 1 and "same file" in lines[0], (case, lines)
        assert not (tmp_path / "real" / "x.csv").exists() and not (tmp_path / "x.csv").exists(), case
        assert not list(tmp_path.rglob(".*llm-heatmap*")), case


def test_a_failed_run_removes_the_outputs_it_wrote(cube_file, tmp_path, monkeypatch):
    import llm_heatmap.viz as viz

    def broken_page(*args, **kwargs):
        raise InputError("the page cannot be drawn.")

    monkeypatch.setattr(viz, "write_html", broken_page)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "keep.txt").write_text("not ours")
    code, lines = run_cli("render", cube_file, "--out", out, "--html", "--name", "r")
    assert code == 2 and lines == ["llm-heatmap render: the page cannot be drawn."]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # the PNG written before the page is gone


# ---- the page builder reads no data as one of its slots -------------------------------------------

SLOTS = ["__TITLE__", "__STYLE__", "__BODY__", "__SCRIPT__", "__META__", "__MASK__", "__DATA__"]


def test_a_prompt_spelling_every_slot_of_the_page_stays_as_written(cube_file, tmp_path):
    header, tensors = read_raw(cube_file)
    header.update(prompt=" ".join(SLOTS), tokens=SLOTS, source="__BODY__")  # seven tokens, seven slots
    path = write_raw(tmp_path / "slots.cube.safetensors", header, tensors)
    plain = write_raw(tmp_path / "plain.cube.safetensors", {**header, "prompt": "p", "tokens": list("abcdefg"),
                                                            "source": "s"}, tensors)
    assert run_cli("render", path, "--out", tmp_path, "--html", "--name", "slots", "--quiet")[0] == 0
    assert run_cli("render", plain, "--out", tmp_path, "--html", "--name", "plain", "--quiet")[0] == 0
    page, reference = (tmp_path / "slots.html").read_text(), (tmp_path / "plain.html").read_text()
    title = page[page.index("<title>") + 7:page.index("</title>")]
    assert title == "__BODY__: attention heads"  # the source, not the body it spells
    for tag in ("<script", "<style", 'id="hm-meta"', 'id="hm-data"', 'id="hm-mask"'):
        assert page.count(tag) == reference.count(tag), tag
    meta = json.loads(page.split('id="hm-meta" type="application/json">')[1].split("</script>")[0])
    assert [c["t"] for c in meta["cols"]] == SLOTS
    assert abs(len(page) - len(reference)) < 2000  # no blob or page copied into a slot


@pytest.mark.parametrize("kind", ["parquet", "safetensors"])
def test_a_part_counts_as_done_only_with_the_bytes_its_seal_names(tmp_path, kind):
    from safetensors.numpy import save_file as save_numpy

    from llm_heatmap.analyses.runs.parts import part_done, seal_path, write_part
    from llm_heatmap.analyses.runs.table_files import write_table

    path = tmp_path / f"part.{kind}"
    values = torch.arange(4096, dtype=torch.float32).numpy()
    if kind == "parquet":
        write_table(pd.DataFrame({"layer": 0, "value": values}), path)
    else:
        save_numpy({"divergence": values}, str(path))
    assert not part_done(path)  # a part without its seal
    path.unlink()
    if kind == "parquet":
        write_part(path, lambda temp: write_table(pd.DataFrame({"layer": 0, "value": values}), temp))
    else:
        write_part(path, lambda temp: save_numpy({"divergence": values}, str(temp)))
    assert part_done(path) and sorted(p.name for p in tmp_path.iterdir()) == [path.name, seal_path(path).name]
    data = path.read_bytes()
    middle = len(data) // 2
    path.write_bytes(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])  # same size, footer intact
    assert not part_done(path)
    path.write_bytes(data)
    assert part_done(path)
    seal_path(path).unlink()
    assert not part_done(path)


@pytest.mark.parametrize("folder", ["/proc", "/sys/kernel", "/proc/self/fd"])
def test_an_output_folder_of_the_system_is_refused_in_one_sentence(cube_file, folder):
    if not Path(folder).is_dir():
        pytest.skip(f"{folder} does not exist here")
    code, lines = run_cli("render", cube_file, "--out", folder)
    assert code == 2 and len(lines) == 1 and folder in lines[0] and "choose another directory" in lines[0], lines


@pytest.mark.slow
def test_an_atlas_probe_too_long_for_the_model_is_refused_before_any_write(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the first prompt is fine\nthe second one too\n")
    out = tmp_path / "out"
    code, lines = run_cli("atlas", prompts, "--model", "minilm-l6", "--out", out, "--probe-length", "1000000")
    assert code == 2 and len(lines) == 1 and "--probe-length 1000000" in lines[0], lines
    assert not out.exists() or not any(out.rglob("*"))


def test_a_refused_run_leaves_no_folder_it_made(tmp_path, capsys):
    """A refusal after the outputs were claimed removes the output folders the run made (and only those that
    are empty), so a mistyped command leaves nothing behind."""
    from test_cli_sites import REVERSER

    kept = tmp_path / "kept"
    kept.mkdir()
    for out in (tmp_path / "new" / "deeper", kept):  # the reverser is post-norm: direct attribution is refused
        assert main(["attribute", "31415", "--model", str(REVERSER), "--out", str(out), "--quiet"]) == 2
        assert "direct logit attribution" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert kept.is_dir() and not list(kept.iterdir())  # a folder that was there stays
