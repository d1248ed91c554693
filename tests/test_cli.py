"""End to end: the CLI as a user runs it (a subprocess), on the real offline models."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from llm_heatmap.cli import main
from llm_heatmap.probes import AttentionCube
from terminal import default_signals

pytestmark = pytest.mark.slow  # every test here runs the CLI on a real offline model

SEED_PROMPT = "Run a self meta-cognitive audit where you are self-aware about being an LLM"


def cli(*args):
    """Run the CLI as a user does: a separate process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "llm_heatmap.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture
def cli_in_process(capsys):
    """The same entry point in this process (no interpreter start-up): for the many short cases."""

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    result = cli("grid", SEED_PROMPT, "--out", out, "--name", "seed", "--html")
    return result, out


def test_grid_writes_grid_metrics_and_cube(smollm2_run):
    result, out = smollm2_run
    assert result.returncode == 0, result.stderr
    assert "dense decoder, GQA 9q:3kv x 30 layers, GGUF Q4_1" in result.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["seed.cube.safetensors", "seed.html", "seed.metrics.csv", "seed.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(stat.S_IMODE((out / name).stat().st_mode)) for name in files} == {oct(0o666 & ~umask)}
    metrics = pd.read_csv(out / "seed.metrics.csv")
    assert len(metrics) == 30 * 9
    assert {"layer", "head", "kv_group", "entropy", "sink_score", "induction_score"} <= set(metrics.columns)
    assert metrics.groupby("kv_group")["head"].nunique().tolist() == [3, 3, 3]
    cube = AttentionCube.load(out / "seed.cube.safetensors")
    assert cube.pattern.shape[:2] == (30, 9)
    assert cube.prompt == SEED_PROMPT and cube.source == "smollm2-135m"
    assert {"torch", "transformers"} <= set(cube.metadata["versions"])
    torch.testing.assert_close(cube.pattern.sum(-1), torch.ones(cube.pattern.shape[:-1]), atol=1e-4, rtol=0)
    width, height = Image.open(out / "seed.png").size
    assert width > 300 and height > width  # 30 layers down, 9 heads across
    digest = result.stdout.strip().splitlines()[-5:]
    assert digest[0].startswith("strongest sink heads") and digest[-1].startswith("pattern classes")


def test_render_redraws_a_saved_cube(smollm2_run, tmp_path):
    _, out = smollm2_run
    same = cli("render", out / "seed.cube.safetensors", "--out", tmp_path, "--name", "again")
    assert same.returncode == 0, same.stderr
    original = np.asarray(Image.open(out / "seed.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), original)
    other = cli("render", out / "seed.cube.safetensors", "--out", tmp_path, "--name", "log", "--scale", "log",
                "--sink", "mask", "--background", "transparent")
    assert other.returncode == 0, other.stderr
    redrawn = np.asarray(Image.open(tmp_path / "log.png"))
    assert redrawn.shape[:2] == original.shape[:2] and redrawn.shape[2] == 4  # RGBA: the background is transparent
    assert not np.array_equal(redrawn[..., :3], original[..., :3])
    assert redrawn[0, 0, 3] == 0  # transparent margin


def test_same_input_same_output(tmp_path, cli_in_process):
    runs = [cli_in_process("grid", "the sky is blue", "--model", "minilm-l6", "--out", tmp_path / name, "--name", "x",
                           "--quiet") for name in ("a", "b")]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    a, b = (AttentionCube.load(tmp_path / n / "x.cube.safetensors") for n in ("a", "b"))
    assert torch.equal(a.pattern, b.pattern) and a.tokens == b.tokens
    assert (tmp_path / "a/x.metrics.csv").read_text() == (tmp_path / "b/x.metrics.csv").read_text()


def test_existing_files_are_kept_unless_forced(tmp_path, cli_in_process):
    first = cli_in_process("grid", "the sky is blue", "--model", "minilm-l6", "--out", tmp_path, "--name", "x")
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "x.png").read_bytes()
    again = cli_in_process("grid", "a different prompt", "--model", "minilm-l6", "--out", tmp_path, "--name", "x")
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "x.png").read_bytes() == before
    forced = cli_in_process("grid", "a different prompt", "--model", "minilm-l6", "--out", tmp_path, "--name", "x", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "x.png").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.cube.safetensors", "x.metrics.csv", "x.png"]


def test_streaming_grid_downsamples_long_prompts(tmp_path, cli_in_process):
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
    result = cli_in_process("grid", prompt, "--model", "minilm-l6", "--out", tmp_path, "--name", "s", "--stream",
                 "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    cube = AttentionCube.load(tmp_path / "s.cube.safetensors")
    assert cube.pattern.shape == (6, 12, 8, 8)
    torch.testing.assert_close(cube.pattern.sum(-1), torch.ones(6, 12, 8), atol=1e-4, rtol=0)
    assert len(pd.read_csv(tmp_path / "s.metrics.csv")) == 6 * 12


@pytest.fixture
def not_a_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    return blocker / "sub"


BAD_INPUTS = {  # (arguments, words the one-line message must contain)
    "empty prompt": (["grid", "   "], "is empty"),
    "unknown model": (["grid", "hi", "--model", "./no/such/model"], "does not exist"),
    "missing prompt file": (["grid", "--prompt-file", "/no/such/prompt.txt"], "does not exist"),
    "unreadable prompt file": (["grid", "--prompt-file", "/"], "is a directory"),
    "prompt longer than context": (["grid", "word " * 600, "--model", "minilm-l6"], "context holds"),
    "cube too large": (["grid", "the sky is blue", "--model", "minilm-l6", "--max-cube-mb", "0.001"],
                       "allow more memory (--max-cube-mb ...): the metrics alone take"),
    "unknown colormap": (["grid", "the sky is blue", "--model", "minilm-l6", "--cmap", "nope"], "colormap"),
    "bad layers": (["grid", "the sky is blue", "--model", "minilm-l6", "--layers", "a-b"], "--layers"),
    "foreign cube file": (["render", __file__], "cube"),
    "chat without a template": (["grid", "the sky is blue", "--model", "minilm-l6", "--chat"], "chat template"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_gets_one_sentence_and_no_files(case, tmp_path, cli_in_process):
    args, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    result = cli_in_process(*args, "--out", out)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_output_directory(not_a_dir, cli_in_process):
    result = cli_in_process("grid", "the sky is blue", "--model", "minilm-l6", "--out", not_a_dir)
    assert result.returncode == 2 and "cannot be created" in result.stderr


def test_help_lists_commands_with_examples(capsys):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("grid", "render", "models"):
        assert command in result.stdout
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert "example: llm-heatmap" in capsys.readouterr().out


def test_bad_input_exit_status_from_a_real_process(tmp_path):
    result = cli("grid", "   ", "--out", tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "is empty" in result.stderr


def test_batch_interrupted_then_resumed(tmp_path, cli_in_process):
    """Ctrl-C in the middle of a batch keeps the finished prompts; --resume computes only the rest. The run is
    held (llm_heatmap.stall) with the third prompt's part complete but not yet in place, then interrupted."""
    from llm_heatmap.analyses.runs.parts import part_key
    from llm_heatmap.analyses.runs.prompts import read_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i} about the sky, the sea and the hills\n" for i in range(6)))
    third = read_prompts(prompts)[2].id
    out, marker = tmp_path / "run", tmp_path / "held"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLM_HEATMAP_STALL_AT": f"write:{part_key(third)}.parquet",
           "LLM_HEATMAP_STALL_MARKER": str(marker)}
    process = subprocess.Popen([sys.executable, "-m", "llm_heatmap.cli", "batch", str(prompts), "--out",
                                str(out), "--model", "minilm-l6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, preexec_fn=default_signals)
    while not marker.exists():  # the run removes nothing before it is held there; it ends only by our signal
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 130, stderr
    finished = [p for p in (out / "parts").glob("*.parquet") if not p.name.startswith(".")]
    assert len(finished) == 2 and not (out / "heads.csv").exists()

    resumed = cli_in_process("batch", prompts, "--out", out, "--model", "minilm-l6", "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert len(summary["skipped"]) == 2 and len(summary["computed"]) == 4
    table = pd.read_csv(out / "heads.csv")
    assert len(table) == 6 * 6 * 12 and table.groupby("prompt_id").size().eq(72).all()


def test_metrics_with_induction_probe(tmp_path, cli_in_process):
    out = tmp_path / "m.csv"
    result = cli_in_process("metrics", "the cat sat on the mat", "--out", out, "--induction-probe", "20",
                            "--metric", "sink_score")
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out)
    assert list(table.columns) == ["layer", "head", "kv_group", "sink_score", "probe_previous_token_score",
                                   "probe_duplicate_token_score", "probe_induction_score"]
    assert "strongest induction heads on 20 repeated random tokens" in result.stdout


def test_norm_weighted_grid_with_query_key_maps(cli_in_process, tmp_path):
    """`grid --weighting norms --qk --html`: the grid draws alpha ||v W_O||, the table has the no-op sink
    columns, the cube keeps queries and keys, and the view embeds every KV group's map."""
    import re

    result = cli_in_process("grid", "The cat sat on the mat.", "--weighting", "norms", "--qk", "--html",
                            "--out", tmp_path, "--name", "norms", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "no-op" in result.stdout
    cube = AttentionCube.load(tmp_path / "norms.cube.safetensors")
    assert cube.queries.shape[:2] == (30, 9) and cube.keys.shape[:2] == (30, 3) and cube.value_norms.shape[:2] == (30, 9)
    table = pd.read_csv(tmp_path / "norms.metrics.csv")
    assert {"norm_sink_score_no_q0", "noop_sink", "output_norm"} <= set(table.columns)
    page = (tmp_path / "norms.html").read_text()
    meta = json.loads(re.search(r'<script id="hm-meta" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert meta["style"]["weighting"] == "norms" and meta["valueNorms"] and len(meta["qk"]) == 30 * 3
    rendered = cli_in_process("render", tmp_path / "norms.cube.safetensors", "--weighting", "norms", "--out", tmp_path,
                              "--quiet")
    assert rendered.returncode == 0, rendered.stderr
    stream = cli_in_process("grid", "The cat sat on the mat.", "--qk", "--stream", "--out", tmp_path, "--quiet")
    assert stream.returncode == 2 and "--qk" in stream.stderr and "--stream" in stream.stderr


def test_qk_map_command(cli_in_process, tmp_path):
    result = cli_in_process("qk-map", "The cat sat on the mat.", "--layer", "3", "--out", tmp_path, "--name", "qk",
                            "--quiet")
    assert result.returncode == 0, result.stderr
    image = Image.open(tmp_path / "qk.png")
    assert image.size[0] > 2 * image.size[1], "three KV groups side by side"
    one = cli_in_process("qk-map", "The cat sat on the mat.", "--layer", "3", "--head", "4", "--model", "minilm-l6",
                         "--out", tmp_path, "--name", "one", "--quiet")
    assert one.returncode == 0, one.stderr
    bad = cli_in_process("qk-map", "The cat sat on the mat.", "--layer", "99", "--out", tmp_path, "--quiet")
    assert bad.returncode == 2 and "layer 99" in bad.stderr and not (tmp_path / "bad.png").exists()
