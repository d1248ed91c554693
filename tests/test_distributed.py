"""`atlas` and `batch` under torchrun: two CPU processes (gloo) give the tables of one process, row for row.

Every run is a real process, as a user starts it. All use one torch thread per process (torchrun's
default with several processes; set here for the one-process references too), so the floating-point
sums run in the same order and the tables can be compared exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from llm_heatmap.analyses.atlas.run import TABLES
from llm_heatmap.analyses.runs.batch import read_batch
from terminal import default_signals

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
MODELS = ["--model", "minilm-l6", "--model", "smollm2-135m"]
TEXTS = ["The cat sat on the warm mat.", "Define the integral of a continuous function.",
         "I ate an apple for lunch today.", "Entropy measures the spread of a distribution.",
         "Birds fly south when the days get short.", "A theorem needs a proof before it is trusted.",
         "We walked along the river at dusk.", "Gradient descent follows the slope downhill.",
         "The kettle whistled in the kitchen.", "Heads that share a key might attend alike."]


def command(*args, processes: int = 1):
    """`llm-heatmap ARGS` in one process, or under `torchrun --standalone --nproc_per_node N`."""
    args = [str(a) for a in args]
    if processes == 1:
        return [sys.executable, "-m", "llm_heatmap.cli", *args]
    return [TORCHRUN, "--standalone", "--nproc_per_node", str(processes), "-m", "llm_heatmap.cli", *args]


def run(*args, processes: int = 1):
    result = subprocess.run(command(*args, processes=processes), capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_tables(a: Path, b: Path, names) -> None:
    for name in names:
        pd.testing.assert_frame_equal(pd.read_parquet(a / f"{name}.parquet"), pd.read_parquet(b / f"{name}.parquet"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": text, "group": "ab"[i % 2]}) + "\n"
                            for i, text in enumerate(TEXTS)))
    return path


@pytest.fixture(scope="module")
def one_process(prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("atlas-1")
    run("atlas", prompts, *MODELS, "--out", out, "--resamples", 300, "--permutations", 100)
    return out


def test_interrupted_run_resumes_on_two_processes(prompts, one_process, tmp_path):
    """The atlas is held (llm_heatmap.stall) as the first model's third part is about to go in place, interrupted
    there, and resumed by two processes, which compute the rest: the tables and the page equal the one-process
    run's, rank 0 alone reports (stdout is one JSON document), and no temporary file is left."""
    from llm_heatmap.analyses.runs.parts import part_key

    marker = tmp_path.parent / f"{tmp_path.name}.held"
    env = {**ENV, "LLM_HEATMAP_STALL_AT": f"write:{part_key('p2')}.parquet", "LLM_HEATMAP_STALL_MARKER": str(marker)}
    process = subprocess.Popen(command("atlas", prompts, *MODELS, "--out", tmp_path, "--resamples", 300,
                                       "--permutations", 100), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, preexec_fn=default_signals)
    while not marker.exists():  # the run ends only by our signal once it is held there
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert not any((tmp_path / f"{name}.parquet").exists() for name in TABLES)
    assert not (tmp_path / "atlas.html").exists()

    resumed = run("atlas", prompts, *MODELS, "--out", tmp_path, "--resamples", 300, "--permutations", 100, "--resume",
                  "--json", processes=2)
    summary = json.loads(resumed.stdout)
    computed = sum(len(ids) for ids in summary["computed"].values())
    skipped = sum(len(ids) for ids in summary["skipped"].values())
    assert computed + skipped == 2 * len(TEXTS) and skipped == 2  # p0 and p1 of the first model
    assert_same_tables(one_process, tmp_path, TABLES)
    assert (one_process / "atlas.html").read_text() == (tmp_path / "atlas.html").read_text()
    parts = sorted(p.name for p in (tmp_path / "parts").rglob("*.parquet") if p.name != "probe.parquet")
    assert len(parts) == 2 * len(TEXTS) and not list((tmp_path / "parts").rglob(".*"))  # no temporary left


def test_batch_on_two_processes_and_shards_of_a_job_array(prompts, tmp_path):
    """A job array of two shards, the first itself split over two processes: together they give the table of
    one process, row for row."""
    reference, sharded = tmp_path / "one", tmp_path / "shards"
    run("batch", prompts, "--model", "minilm-l6", "--out", reference)
    first = run("batch", prompts, "--model", "minilm-l6", "--out", sharded, "--shard", "0/2", "--json", processes=2)
    run("batch", prompts, "--model", "minilm-l6", "--out", sharded, "--shard", "1/2")
    assert json.loads(first.stdout)["computed"] == [f"p{i}" for i in range(0, len(TEXTS), 2)]
    assert sorted(p.name for p in sharded.glob("*.json")) == ["batch.shard-0-of-2.json", "batch.shard-1-of-2.json"]
    order = [f"p{i}" for i in range(len(TEXTS))]
    combined = read_batch(sharded).sort_values("prompt_id", key=lambda s: s.map(order.index), kind="stable")
    pd.testing.assert_frame_equal(combined.reset_index(drop=True), pd.read_parquet(reference / "heads.parquet"))
