"""Issue 15: what the CLI promises when the processes around it are hostile.

Real subprocesses (`python -m llm_heatmap.cli`), real signals, real files:

- interrupts: SIGINT, SIGTERM and SIGHUP, while the command modules import, while the model loads and while
  an output file is being written, end the run with exit status 128 + the signal, one line on stderr, and an
  output folder holding only complete final files (no temporary or lock files);
- SIGKILL leaves a temporary file named after the dead process; the next run with the same names removes it,
  and never removes one whose process is alive;
- two runs on one output set: one writes it, the other is refused with one sentence and changes nothing;
  two `batch --resume` on one folder never compute side by side (no prompt computed twice, no duplicate row);
- hostile model folders and cube files: pickled weights, `auto_map` remote code, a pickle posing as a cube.
  A payload that would create a marker file when run is never run (and the controls show that it would be).

A run that is signalled, killed or raced is first held at the point the case names: a stalled import
(the `sitecustomize` hook below) or one of the library's stall points (`llm_heatmap.stall`: model loading,
each file just before it is renamed into place), which write a marker file and wait. The test waits for the
marker, then acts, so neither the load of the machine nor the speed of the run can move the point. (The first
~25 ms of a process, before site-packages are set up, are Python's own and are not tested.)
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from llm_heatmap.models.offline import OFFLINE_MODELS
from llm_heatmap.probes import AttentionCube
from terminal import default_signals

MODEL = "minilm-l6"  # offline BERT: 6 layers x 12 heads
HEADS = 6 * 12
NAME = "x"
FINAL = {f"{NAME}.png", f"{NAME}.metrics.csv", f"{NAME}.cube.safetensors"}
PROMPT_A = "the sky is blue"
PROMPT_B = "a quick brown fox jumps over the lazy dog near the river"
TEMP_MARK, LOCK_MARK = "llm-heatmap-tmp", "llm-heatmap-lock"  # analyses/files.py's naming scheme
TEMP_NAME = re.compile(rf"^\.(?P<target>.+)\.(?P<pid>\d+)-[^.]+\.{TEMP_MARK}(\.\w+)?$")
TIMEOUT = 300  # generous: the machine may be shared with a benchmark

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}


# ---- running the CLI -----------------------------------------------------------------------------

def cli_env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


class Run:
    """One `python -m llm_heatmap.cli ...` process; stdout and stderr go to files (no pipe can fill up)."""

    def __init__(self, logs: Path, tag: str, args, env: dict | None = None, stdout=None):
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / f"{tag}.stdout", logs / f"{tag}.stderr"
        self.args = [str(a) for a in args]
        with open(self.stderr_path, "w") as err, open(self.stdout_path, "w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "llm_heatmap.cli", *self.args],
                                            stdin=subprocess.DEVNULL, stdout=out if stdout is None else stdout,
                                            stderr=err, env=env or cli_env(), preexec_fn=default_signals)
        self.pid = self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stdout(self) -> str:
        return self.stdout_path.read_text() if self.stdout_path.exists() else ""

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"`llm-heatmap {' '.join(self.args[:2])}` did not end within {timeout} s; stderr: {self.stderr()!r}")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)


class RunHere:
    """The same command run inside this test process (`cli.main`), where what is tested is the command's answer
    and not what happens to a process (signals, kills, races): same interface as `Run`, without the seconds a
    new process takes to import torch and transformers. Its pid is this process's."""

    def __init__(self, args):
        import contextlib
        import io

        from llm_heatmap.cli import main

        self.args, self.pid = [str(a) for a in args], os.getpid()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            self.status = main(self.args)
        self._stdout, self._stderr = out.getvalue(), err.getvalue()

    def finish(self) -> int:
        return self.status

    def stderr(self) -> str:
        return self._stderr

    def stdout(self) -> str:
        return self._stdout


@pytest.fixture
def start(tmp_path):
    """`start(tag, *args, env=None)` -> a started `Run`; every run still alive at the end is continued and killed."""
    runs: list[Run] = []

    def begin(tag, *args, env=None, stdout=None):
        run = Run(tmp_path / "logs", tag, args, env=env, stdout=stdout)
        runs.append(run)
        return run

    yield begin
    for run in runs:
        if run.running():
            run.process.send_signal(signal.SIGCONT)
            run.process.kill()
            run.process.wait()


def wait_until(condition, run: Run, what: str, timeout: float = TIMEOUT):
    """Poll `condition()` (every 2 ms) until it is truthy; fail if the run ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if not run.running():
            pytest.fail(f"the run ended (status {run.process.returncode}) before {what}; stderr: {run.stderr()!r}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout} s; stderr: {run.stderr()!r}")
        time.sleep(0.002)


def stalled_env(tmp_path: Path, point: str, tag: str = "run") -> tuple[dict, Path]:
    """An environment that holds the run at `llm_heatmap.stall` point `point` ("model-loading" or "write:NAME");
    the returned marker appears when it is held there, and removing it lets the run go on."""
    marker = tmp_path / f"held-{tag}"
    return cli_env(LLM_HEATMAP_STALL_AT=point, LLM_HEATMAP_STALL_MARKER=str(marker)), marker


def grid_args(prompt: str, out: Path, *extra):
    return ["grid", prompt, "--model", MODEL, "--out", out, "--name", NAME, *extra]


# ---- what the output folder may hold -------------------------------------------------------------

def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def temporaries(folder: Path, target: str | None = None) -> list[Path]:
    found = [p for p in folder.iterdir() if TEMP_MARK in p.name] if folder.exists() else []
    return [p for p in found if target is None or p.name.startswith(f".{target}.")]


def assert_one_sentence(run: Run, *words: str) -> str:
    stderr = run.stderr()
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == 1, f"stderr is not one sentence: {stderr!r}"
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def assert_only_complete_outputs(out: Path, prompt: str) -> set[str]:
    """--out holds nothing but final files (no temporary, lock or stray hidden file), each complete and
    from `prompt`'s run. Returns the final files present."""
    present = names(out)
    assert present <= FINAL, f"unexpected files in --out (temporary, lock or partial): {sorted(present - FINAL)}"
    if f"{NAME}.png" in present:
        with Image.open(out / f"{NAME}.png") as image:
            image.load()  # decodes every row: a truncated PNG raises
            assert image.size[0] > 100 and image.size[1] > 100
    if f"{NAME}.metrics.csv" in present:
        table = pd.read_csv(out / f"{NAME}.metrics.csv")
        assert len(table) == HEADS and table[["layer", "head"]].notna().all().all()
    if f"{NAME}.cube.safetensors" in present:
        cube = AttentionCube.load(out / f"{NAME}.cube.safetensors")
        assert cube.prompt == prompt and cube.pattern.shape[:2] == (6, 12)
    return present


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its size, mtime (ns) and bytes: to show that a run changed nothing."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The three files a lone, undisturbed grid run writes for PROMPT_A and for PROMPT_B (runs are
    byte-for-byte deterministic), to tell which run wrote each file of a contested output set."""
    root = tmp_path_factory.mktemp("reference")
    runs = {prompt: Run(root / "logs", tag, grid_args(prompt, root / tag, "--quiet"))
            for prompt, tag in ((PROMPT_A, "a"), (PROMPT_B, "b"))}
    files = {}
    for prompt, run in runs.items():
        assert run.finish() == 0, run.stderr()
        out = Path(run.args[5])
        assert names(out) == FINAL
        files[prompt] = {name: (out / name).read_bytes() for name in FINAL}
    assert files[PROMPT_A] != files[PROMPT_B]
    return files


def written_by(out: Path, reference: dict) -> dict:
    """For each final file in `out`, the prompt whose reference run wrote exactly these bytes (None: neither)."""
    return {name: next((p for p, files in reference.items() if files[name] == (out / name).read_bytes()), None)
            for name in sorted(names(out) & FINAL)}


# ---- 1. interrupts -------------------------------------------------------------------------------

STALL_HOOK = '''
"""Test hook: the first import of $HOSTILE_STALL_MODULE writes $HOSTILE_STALL_MARKER and then stalls (up to
600 s) inside the import system, so that a signal sent on seeing the marker lands during the imports. With
$HOSTILE_STALL_SWALLOW set, the stall instead ends by swallowing the KeyboardInterrupt the signal raises (as
a library can: see test_a_stop_lost_in_a_library_is_still_reported), writes "<marker>.swallowed" and lets
the import go on."""
import os, sys, time

class _Stall:
    def find_spec(self, name, path=None, target=None):
        if name != os.environ.get("HOSTILE_STALL_MODULE"):
            return None
        sys.meta_path.remove(self)
        marker = os.environ["HOSTILE_STALL_MARKER"]
        deadline = time.monotonic() + 600
        try:  # the marker is written inside the try: a signal sent on seeing it always lands here
            open(marker, "w").close()
            while time.monotonic() < deadline:
                time.sleep(0.005)
        except KeyboardInterrupt:
            if not os.environ.get("HOSTILE_STALL_SWALLOW"):
                raise
            open(marker + ".swallowed", "w").close()
        return None

sys.meta_path.insert(0, _Stall())
'''


def stalled_import_env(tmp_path: Path, module: str, **extra) -> tuple[dict, Path]:
    """An environment whose `sitecustomize` stalls the import of `module`; the marker says it is stalled."""
    hook = tmp_path / "stall-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(STALL_HOOK)
    marker = tmp_path / "stalled"
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    return cli_env(PYTHONPATH=path, HOSTILE_STALL_MODULE=module, HOSTILE_STALL_MARKER=str(marker), **extra), marker


POINTS = {
    # while cli/__init__.py imports the command modules (the stall hook holds `llm_heatmap.cli.grid`):
    # main() imports them once its signal handlers are in place, so SIGTERM and SIGHUP are reported here too
    "command-imports": "the stalled import of the command modules",
    # the output set is claimed (its lock files are there), the model not yet loaded: stall point "model-loading"
    "model-loading": "the run held before loading the model",
    # the grid image is drawn into its temporary folder and not yet renamed: stall point "write:x.png"
    "writing": "the run held while writing the grid",
}


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("signame", SIGNALS)
def test_interrupt_exits_128_plus_signal_with_one_sentence_and_no_partial_files(signame, point, tmp_path, start):
    signum, out = SIGNALS[signame], tmp_path / "out"
    if point == "command-imports":
        env, stalled = stalled_import_env(tmp_path, "llm_heatmap.cli.grid")
    else:
        env, stalled = stalled_env(tmp_path, "model-loading" if point == "model-loading" else f"write:{NAME}.png")
    run = start("grid", *grid_args(PROMPT_A, out), env=env)
    wait_until(stalled.exists, run, POINTS[point])
    if point == "model-loading":
        assert sum(LOCK_MARK in n for n in names(out)) == 3, f"the output set is not claimed: {sorted(names(out))}"
    if point == "writing":
        temp = temporaries(out, f"{NAME}.png")
        assert len(temp) == 1, f"expected the grid's temporary folder in --out: {sorted(names(out))}"
        match = TEMP_NAME.match(temp[0].name)
        assert match and int(match["pid"]) == run.pid, f"temporary {temp[0].name} does not carry the writer's pid"
    run.signal(signum)
    status = run.finish()

    assert status == 128 + signum, (
        f"{signame} during {point}: exit status {status}, expected {128 + signum}"
        + (" (negative: the process was killed by the signal itself: no handler, no clean-up, no message)"
           if status < 0 else " (the stop was lost: the run went on to the end)" if status == 0 else "")
        + f"; stderr: {run.stderr()!r}; --out: {sorted(names(out))}")
    assert_one_sentence(run, f"stopped by {signame}")
    assert run.stdout() == ""
    present = assert_only_complete_outputs(out, PROMPT_A)
    if point != "writing":
        assert present == set(), f"{signame} before any output was written, yet --out holds {sorted(present)}"


@pytest.mark.slow
@pytest.mark.parametrize("second", [True, False], ids=["then-SIGTERM", "alone"])
def test_a_stop_lost_in_a_library_is_still_reported(tmp_path, start, second):
    """A signal whose exception never reaches main(): swallowed by library code (here the stall hook, while
    grid imports its analyses; in the wild, CPython replacing it by a ValueError that matplotlib catches, see
    POINTS["writing"]). The run was told to stop, so it must not report success (alone: it ends as stopped once
    the command is done), and a second signal must not be ignored into a run that cannot be stopped."""
    out = tmp_path / "out"
    env, stalled = stalled_import_env(tmp_path, "llm_heatmap.analyses.heads.digest", HOSTILE_STALL_SWALLOW="1")
    run = start("grid", *grid_args(PROMPT_A, out), env=env)
    wait_until(stalled.exists, run, "the stalled import of the analyses")
    run.signal(signal.SIGINT)
    wait_until(Path(f"{stalled}.swallowed").exists, run, "the swallowed interrupt")
    if second:
        run.signal(signal.SIGTERM)
    status = run.finish()
    assert status in ((128 + signal.SIGINT, 128 + signal.SIGTERM) if second else (128 + signal.SIGINT,)), (
        f"SIGINT (lost in a library) then SIGTERM: exit status {status}, expected 130 or 143"
        + (": both stops were ignored and the run reported success" if status == 0 else "")
        + f"; stderr: {run.stderr()!r}; --out: {sorted(names(out))}")
    assert_one_sentence(run, "stopped by SIG")
    assert_only_complete_outputs(out, PROMPT_A)


@pytest.mark.slow
def test_broken_stdout_pipe_ends_without_a_traceback(tmp_path, start):
    """`llm-heatmap grid ... | head -0`: the reader of stdout is gone before the summary is printed. The files
    are complete; the run must not end in a traceback."""
    out = tmp_path / "out"
    read, write = os.pipe()
    run = start("grid", *grid_args(PROMPT_A, out), stdout=write)
    os.close(write)
    os.close(read)  # nobody will read what the run prints
    status = run.finish()
    assert_only_complete_outputs(out, PROMPT_A)
    assert names(out) == FINAL, "the files were written before the summary"
    stderr = run.stderr()
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 1, (
        f"a closed stdout pipe ends the run with a traceback (exit status {status}): {stderr[-600:]!r}")


# ---- 2. SIGKILL and stale temporary files --------------------------------------------------------

def dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)
    return child.pid


@pytest.mark.slow
def test_sigkill_mid_write_leaves_a_temporary_file_that_the_next_run_removes(tmp_path, start):
    out = tmp_path / "out"
    env, held = stalled_env(tmp_path, f"write:{NAME}.png")
    killed = start("killed", *grid_args(PROMPT_A, out), env=env)
    wait_until(held.exists, killed, "the run held while writing the grid")
    killed.signal(signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL
    stale = temporaries(out)
    assert stale, "SIGKILL mid-write should leave the temporary file behind (nothing can remove it then)"
    assert {int(TEMP_NAME.match(p.name)["pid"]) for p in stale} == {killed.pid}

    # the killed run's lock files (if any) block nobody; its temporary files go; only the final files stay
    finished = names(out) & FINAL  # normally none: the grid image is the first file written
    again = RunHere(grid_args(PROMPT_A, out, "--quiet", *(["--force"] if finished else [])))
    assert again.finish() == 0, again.stderr()
    assert names(out) == FINAL, f"left after the next run: {sorted(names(out) - FINAL)}"
    assert_only_complete_outputs(out, PROMPT_A)


@pytest.mark.slow
def test_sigkill_during_the_cube_write_leaves_nothing_after_the_next_run(tmp_path, start):
    """The cube is written by safetensors, which itself writes through a temporary file `.tmpXXXXXX` beside its
    target before renaming it. A SIGKILL in that window must not leave debris that no run removes: the target
    lies in the run's temporary folder (named with its pid), which the next run removes whole. The run is held
    with the cube written into that folder; the test adds the `.tmpXXXXXX` a kill inside safetensors' own
    window would leave there (that window is in compiled code, where no stall point can hold it), then kills."""
    out = tmp_path / "out"
    env, held = stalled_env(tmp_path, f"write:{NAME}.cube.safetensors")
    killed = start("killed", *grid_args(PROMPT_A, out), env=env)
    wait_until(held.exists, killed, "the run held while writing the cube")
    (folder,) = out.glob(f".{NAME}.cube.safetensors.{killed.pid}-*.{TEMP_MARK}")
    (folder / ".tmpk1ll3d").write_bytes(b"half a cube")
    killed.signal(signal.SIGKILL)
    assert killed.finish() == -signal.SIGKILL
    again = RunHere(grid_args(PROMPT_A, out, "--quiet", "--force"))
    assert again.finish() == 0, again.stderr()
    left = {n: (out / n).stat().st_size for n in sorted(names(out) - FINAL)}
    assert not left, f"left in --out after the next run (name: bytes): {left}"
    assert_only_complete_outputs(out, PROMPT_A)


@pytest.mark.slow
def test_stale_temporaries_of_dead_processes_go_and_those_of_live_ones_stay(tmp_path, start):
    out = tmp_path / "out"
    out.mkdir()
    dead, alive = dead_pid(), os.getpid()
    planted = {
        f".{NAME}.png.{dead}-k1ll3d00.{TEMP_MARK}.png": False,  # False: must be removed
        f".{NAME}.metrics.csv.{dead}-k1ll3d01.{TEMP_MARK}.csv": False,
        f".{NAME}.cube.safetensors.{dead}-k1ll3d02.{TEMP_MARK}.safetensors": False,
        f".{NAME}.png.{alive}-l1v1ng00.{TEMP_MARK}.png": True,  # its writer (this process) still runs
        f".{NAME}.cube.safetensors.{alive}-l1v1ng01.{TEMP_MARK}.safetensors": True,
        f".other.png.{dead}-0th3r000.{TEMP_MARK}.png": True,  # another output's: not this run's to remove
    }
    for name in planted:
        assert TEMP_NAME.match(name)
        (out / name).write_bytes(b"half a file")
    run = start("grid", *grid_args(PROMPT_A, out, "--quiet"))
    assert run.finish() == 0, run.stderr()
    kept = {name for name, stays in planted.items() if stays}
    assert names(out) == FINAL | kept, (
        f"removed: {sorted(n for n in planted if n not in names(out))}, left: {sorted(names(out) - FINAL)}")
    for name in kept:
        assert (out / name).read_bytes() == b"half a file"
    cube = AttentionCube.load(out / f"{NAME}.cube.safetensors")
    assert cube.prompt == PROMPT_A


# ---- 3. concurrency ------------------------------------------------------------------------------

LOCKED_OUT = "is being written by another llm-heatmap run"


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(2))  # each order once; `make test-stress` repeats them
def test_two_grid_runs_on_one_output_set(round_, tmp_path, start, reference):
    """Started together with the same --out and --name and different prompts: the output set is claimed
    before any work, so exactly one run writes it (exit 0) and the other is refused with one sentence
    (exit 2: the set is held, or, had it come after the first finished, the files exist and there is no
    --force). Every file of the set is the winner's, byte for byte."""
    out = tmp_path / "out"
    prompts = (PROMPT_A, PROMPT_B) if round_ % 2 == 0 else (PROMPT_B, PROMPT_A)
    runs = {prompt: start(f"run{i}", *grid_args(prompt, out)) for i, prompt in enumerate(prompts)}
    statuses = {prompt: run.finish() for prompt, run in runs.items()}
    assert sorted(statuses.values()) == [0, 2], {p: (s, runs[p].stderr()) for p, s in statuses.items()}
    winner = next(p for p, s in statuses.items() if s == 0)
    loser = next(p for p, s in statuses.items() if s == 2)

    message = assert_one_sentence(runs[loser])
    assert LOCKED_OUT in message or "already exists" in message, message
    holder = re.search(r"\(pid (\d+)\)", message)
    assert holder is None or int(holder[1]) == runs[winner].pid, message
    assert runs[loser].stdout() == ""
    assert names(out) == FINAL, f"left in --out: {sorted(names(out) - FINAL)}"
    assert AttentionCube.load(out / f"{NAME}.cube.safetensors").prompt == winner
    assert written_by(out, reference) == {name: winner for name in sorted(FINAL)}, "the output set mixes two runs"


@pytest.mark.slow
def test_grid_run_refused_while_another_holds_the_set_and_after_it_finished(tmp_path, start, reference):
    """A second run arriving while the first is writing (held there at a stall point, so the overlap is
    certain) is refused with one sentence naming the holder's pid, and changes nothing; the first then
    finishes. A third arriving after it is refused because the files exist, again changing nothing."""
    out = tmp_path / "out"
    env, held = stalled_env(tmp_path, f"write:{NAME}.png")
    first = start("first", *grid_args(PROMPT_A, out), env=env)
    wait_until(held.exists, first, "the first run held while writing the grid")
    try:
        before = snapshot(out)
        second = RunHere(grid_args(PROMPT_B, out))
        assert second.finish() == 2, second.stderr()
        assert_one_sentence(second, LOCKED_OUT, f"(pid {first.pid})")
        assert snapshot(out) == before, "the refused run changed the output folder"
    finally:
        held.unlink()
    assert first.finish() == 0, first.stderr()
    assert names(out) == FINAL
    assert written_by(out, reference) == {name: PROMPT_A for name in sorted(FINAL)}

    before = snapshot(out)
    third = RunHere(grid_args(PROMPT_B, out))
    assert third.finish() == 2, third.stderr()
    assert_one_sentence(third, "already exists", "--force")
    assert snapshot(out) == before, "the refused run changed the output folder"


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(f"prompt {i} about the sky, the sea and the hills\n" for i in range(count)))
    return path


def finished_parts(out: Path) -> list[Path]:
    parts = out / "parts"
    return [p for p in parts.glob("*.parquet") if not p.name.startswith(".")] if parts.exists() else []


def assert_batch_table(out: Path, count: int) -> None:
    table = pd.read_csv(out / "heads.csv")
    duplicated = table.duplicated(["prompt_id", "layer", "head"])
    assert not duplicated.any(), f"duplicate rows: {table[duplicated][['prompt_id', 'layer', 'head']].head()}"
    assert len(table) == count * HEADS and table["prompt_id"].nunique() == count
    assert len(pd.read_parquet(out / "heads.parquet")) == count * HEADS
    assert not temporaries(out) and not temporaries(out / "parts")
    assert not [n for n in names(out) if LOCK_MARK in n]


@pytest.mark.slow
def test_batch_resume_refused_while_another_run_holds_the_folder(tmp_path, start):
    """`batch --resume` on a folder that a running batch holds (held at a stall point with its parts written,
    its tables not yet) is refused with one sentence naming the holder and computes nothing; the first run
    finishes with one row per prompt x head, and a later --resume computes nothing again and duplicates no row."""
    count, out = 4, tmp_path / "run"
    prompts = write_prompts(tmp_path / "prompts.txt", count)
    args = ["batch", prompts, "--out", out, "--model", MODEL, "--resume", "--json"]
    env, held = stalled_env(tmp_path, "write:heads.parquet")
    first = start("first", *args, env=env)
    wait_until(held.exists, first, "the first run held before writing its tables")
    try:
        parts_before = sorted(p.name for p in finished_parts(out))
        assert len(parts_before) == count
        second = RunHere(args)
        assert second.finish() == 2, second.stderr()
        assert_one_sentence(second, LOCKED_OUT, f"(pid {first.pid})")
        assert sorted(p.name for p in finished_parts(out)) == parts_before, "the refused run wrote parts"
        assert not (out / "heads.csv").exists()
    finally:
        held.unlink()
    assert first.finish() == 0, first.stderr()
    assert len(json.loads(first.stdout())["computed"]) == count
    assert_batch_table(out, count)

    again = RunHere(args)
    assert again.finish() == 0, again.stderr()
    summary = json.loads(again.stdout())
    assert summary["computed"] == [] and len(summary["skipped"]) == count
    assert_batch_table(out, count)


@pytest.mark.slow
def test_two_batch_resumes_started_together(tmp_path, start):
    """Both start at once: no prompt is computed by both (the computed lists add up to the prompts), a run
    that finds the folder held is refused with one sentence, and the tables have no duplicate row."""
    count, out = 4, tmp_path / "run"
    prompts = write_prompts(tmp_path / "prompts.txt", count)
    args = ["batch", prompts, "--out", out, "--model", MODEL, "--resume", "--json"]
    runs = [start(f"run{i}", *args) for i in range(2)]
    statuses = [run.finish() for run in runs]
    assert sorted(statuses) in ([0, 0], [0, 2]), [(s, r.stderr()) for s, r in zip(statuses, runs)]
    computed = []
    for status, run in zip(statuses, runs):
        if status == 2:
            assert_one_sentence(run, LOCKED_OUT)
            assert run.stdout() == ""
        else:
            computed += json.loads(run.stdout())["computed"]
    assert sorted(computed) == sorted(set(computed)) and len(computed) == count, f"computed: {computed}"
    assert_batch_table(out, count)


# ---- 4. hostile model folders and cube files -----------------------------------------------------

class _Payload:
    """Unpickling this creates `marker` (builtins.open): what a hostile pickle would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_pickle(path: Path, marker: Path, kind: str) -> Path:
    """A pickle whose loading creates `marker`: a bare pickle ("raw") or torch.save's zip format ("torch")."""
    import torch

    payload = {"embeddings.word_embeddings.weight": _Payload(marker)}
    if kind == "raw":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("kind", ["raw", "torch"])
def test_hostile_payloads_are_live(kind, tmp_path):
    """Control: the payloads below do create their marker when unpickled without restrictions, so a
    marker that stays absent means the CLI did not unpickle them."""
    import torch

    marker = tmp_path / "ran"
    path = write_pickle(tmp_path / "payload.bin", marker, kind)
    if kind == "raw":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["raw", "torch"])
def test_pickled_weights_are_refused_and_never_run(kind, tmp_path):
    from tiny_models import tiny_config

    folder, marker, out = tmp_path / "model", tmp_path / "unpickled", tmp_path / "out"
    tiny_config("bert").save_pretrained(folder)
    write_pickle(folder / "pytorch_model.bin", marker, kind)
    run = RunHere(["grid", PROMPT_A, "--model", folder, "--out", out, "--name", NAME])
    assert run.finish() == 2, run.stderr()
    assert_one_sentence(run, "pickled weights", "safetensors")
    assert not marker.exists(), "the pickled weights were unpickled: their payload ran"
    assert names(out) == set()


REMOTE_MODULE = '''
open({marker!r}, "w").close()  # what remote code could do: anything
from transformers import BertConfig, BertModel, BertTokenizerFast

class HostileConfig(BertConfig):
    model_type = "hostile-bert"

class HostileModel(BertModel):
    config_class = HostileConfig

class HostileTokenizer(BertTokenizerFast):
    pass
'''


def remote_code_folder(folder: Path, marker: Path, model_type: str) -> Path:
    """MiniLM's weights and tokenizer (linked) with a config.json and tokenizer_config.json whose `auto_map`
    names classes of `hostile.py`, a module of the folder that creates `marker` when imported."""
    source = OFFLINE_MODELS[MODEL].require_path()
    folder.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "special_tokens_map.json", "model.safetensors"):
        (folder / name).symlink_to(source / name)
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "hostile.HostileConfig", "AutoModel": "hostile.HostileModel"}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": ["hostile.HostileTokenizer", "hostile.HostileTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    (folder / "hostile.py").write_text(textwrap.dedent(REMOTE_MODULE.format(marker=str(marker))))
    return folder


@pytest.mark.slow
def test_remote_code_of_a_known_architecture_is_not_run(tmp_path, start):
    """config.json says model_type "bert" (which transformers has) but `auto_map` points at the folder's
    module: without --trust-remote-code the model loads with transformers' own code, the module never runs."""
    marker, out = tmp_path / "remote-code-ran", tmp_path / "out"
    folder = remote_code_folder(tmp_path / "model", marker, "bert")
    env = cli_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = start("grid", "grid", PROMPT_A, "--model", folder, "--out", out, "--name", NAME, "--quiet", env=env)
    assert run.finish() == 0, run.stderr()
    assert not marker.exists(), "the folder's auto_map module ran without --trust-remote-code"
    assert_only_complete_outputs(out, PROMPT_A)
    assert names(out) == FINAL


@pytest.mark.slow
def test_remote_code_of_an_unknown_architecture_is_refused_unless_trusted(tmp_path, start):
    """model_type "hostile-bert" exists only in the folder's module: without --trust-remote-code the run is
    refused with one sentence and the module never runs; with it (the control) the module does run."""
    marker, out = tmp_path / "remote-code-ran", tmp_path / "out"
    folder = remote_code_folder(tmp_path / "model", marker, "hostile-bert")
    env = cli_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    run = start("refused", "grid", PROMPT_A, "--model", folder, "--out", out, "--name", NAME, env=env)
    assert run.finish() == 2, run.stderr()
    assert_one_sentence(run, str(folder), "--trust-remote-code")
    assert not marker.exists(), "the folder's auto_map module ran without --trust-remote-code"
    assert names(out) == set()

    trusted = start("trusted", "grid", PROMPT_A, "--model", folder, "--out", tmp_path / "trusted", "--name", NAME,
                    "--quiet", "--trust-remote-code", env=env)
    trusted.finish()
    assert marker.exists(), f"control: with --trust-remote-code the module should run; stderr: {trusted.stderr()!r}"


@pytest.mark.parametrize("kind", ["raw", "torch"])
def test_render_refuses_a_pickle_posing_as_a_cube(kind, tmp_path):
    marker, out = tmp_path / "unpickled", tmp_path / "out"
    cube = write_pickle(tmp_path / "evil.cube.safetensors", marker, kind)
    run = RunHere(["render", cube, "--out", out])
    assert run.finish() == 2, run.stderr()
    assert_one_sentence(run, str(cube), "not a safetensors file")
    assert not marker.exists(), "the pickle posing as a cube was unpickled: its payload ran"
    assert names(out) == set()


# ---- 6. a full disk: one sentence from every writer, nothing half-written --------------------------

@pytest.fixture(scope="module")
def tiny_cube(tmp_path_factory) -> Path:
    """A cube file of a tiny random Llama (no model to load), for runs that only draw."""
    import torch

    from llm_heatmap.probes import capture
    from tiny_models import VOCAB, tiny_model

    model = tiny_model("llama", "sdpa")
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), capture(model) as probe:
        model(input_ids=ids)
    return probe.cube(ids, prompt="twenty-four tokens", source="tiny-llama").save(
        tmp_path_factory.mktemp("cube") / "tiny.cube.safetensors")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs, filled up to `leave(bytes)` free (needs mount(2): skipped where it is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the ENOSPC injection tests stand in")

    def leave(free: int) -> Path:
        stats = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize - free))
        (disk / "out").mkdir()
        return disk / "out"

    yield leave
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.parametrize("extra", [[], ["--html"], ["--format", "svg"]], ids=["png", "png+html", "svg"])
def test_render_onto_a_full_disk_gives_one_sentence_and_leaves_nothing(extra, tiny_cube, small_disk):
    out = small_disk(2 * 4096)  # room for the lock files' pids, not for the drawing
    run = RunHere(["render", tiny_cube, "--out", out, "--name", NAME, "--cell-px", "12", *extra])
    assert run.finish() == 2, run.stderr()
    assert_one_sentence(run, "disk is full", str(out))
    assert names(out) == set()


@pytest.mark.parametrize("kind", ["parquet", "csv", "cube"])
def test_every_writer_of_the_library_reports_a_full_disk_in_one_sentence(kind, tiny_cube, small_disk):
    import numpy as np

    from llm_heatmap.models.files import atomic_output
    from llm_heatmap.analyses.runs.table_files import write_table
    from llm_heatmap.errors import InputError

    out = small_disk(0)
    table = pd.DataFrame({"layer": np.arange(50_000), "value": np.random.default_rng(0).random(50_000)})
    with pytest.raises(InputError, match="disk is full") as error:
        if kind == "cube":
            with atomic_output(out / "c.cube.safetensors") as temp:
                AttentionCube.load(tiny_cube).save(temp)
        else:
            write_table(table, out / f"t.{kind}")
    assert "\n" not in str(error.value)
    assert names(out) == set()


def _in_process(*args) -> tuple[int, list[str]]:
    run = RunHere(args)
    return run.finish(), run.stderr().strip().splitlines()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("Error while serializing: IoError(No space left on device (os error 28))")],
                         ids=["OSError", "library error"])
def test_enospc_injected_into_a_writer_gives_the_same_sentence(error, tiny_cube, tmp_path, monkeypatch):
    import llm_heatmap.viz as viz

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(viz, "save_grid", full)
    out = tmp_path / "out"
    code, lines = _in_process("render", tiny_cube, "--out", out, "--name", NAME)
    assert code == 2 and len(lines) == 1 and "disk is full" in lines[0] and f"{NAME}.png" in lines[0], lines
    assert names(out) == set()


def test_enospc_outside_any_output_file_gives_the_sentence_too(tiny_cube, tmp_path, monkeypatch):
    from llm_heatmap.probes import AttentionCube as Cube

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "parts"))

    monkeypatch.setattr(Cube, "load", full)
    code, lines = _in_process("render", tiny_cube, "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1 and "disk is full" in lines[0] and "parts" in lines[0], lines


# ---- 7. nothing reaches the network --------------------------------------------------------------

GUARD = '''
"""Test hook: every name lookup or connection of this process is recorded in $NETWORK_GUARD_MARKER and fails."""
import os
import socket


def _refuse(what):
    def refuse(*args, **kwargs):
        with open(os.environ["NETWORK_GUARD_MARKER"], "a") as marker:
            marker.write(f"{what} {args[:2]!r}\\n")
        raise OSError(f"network guard: {what} refused")
    return refuse


socket.getaddrinfo = _refuse("getaddrinfo")
socket.create_connection = _refuse("create_connection")
socket.socket.connect = _refuse("connect")
socket.socket.connect_ex = _refuse("connect_ex")
'''


@pytest.fixture
def guarded_env(tmp_path):
    """(environment, marker): children run with the guard (sitecustomize) and with none of the hub switches
    the CLI sets itself, so only its own switches keep it offline."""
    hook = tmp_path / "guard"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GUARD)
    marker = tmp_path / "network-used"
    env = {name: value for name, value in cli_env().items()
           if not name.startswith(("HF_", "TRANSFORMERS_", "KERNELS", "DISABLE_KERNEL"))}
    env.update(PYTHONPATH=os.pathsep.join([str(hook), env.get("PYTHONPATH", "")]), NETWORK_GUARD_MARKER=str(marker))
    return env, marker


def test_the_network_guard_catches_a_lookup(guarded_env):
    env, marker = guarded_env
    done = subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo('huggingface.co', 443)"],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0 and "network guard" in done.stderr and marker.exists()


def test_a_hub_id_outside_the_cache_is_refused_without_a_lookup(guarded_env, tmp_path, start):
    env, marker = guarded_env
    run = start("hub", "grid", PROMPT_A, "--model", "no-such-org/no-such-model", "--out", tmp_path / "out", env=env)
    assert run.finish() == 2, run.stderr()
    assert_one_sentence(run, "no-such-org/no-such-model", "HF_HUB_OFFLINE=0")
    assert not marker.exists(), marker.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["grid", PROMPT_A, "--model", MODEL, "--out", "out"],
    ["grid", PROMPT_A, "--model", "smollm2-135m", "--quantize", "4bit", "--out", "out"],
    ["metrics", PROMPT_B, "--model", MODEL, "--quantize", "8bit", "--out", "out/m.csv"],
    ["models", "smollm2-135m"],
], ids=["grid", "grid-4bit", "metrics-8bit", "models"])
def test_commands_reach_no_network_and_try_no_hub_kernel(command, guarded_env, tmp_path, start):
    env, marker = guarded_env
    arguments = [str(tmp_path / a) if a.startswith("out") else a for a in command]
    run = start(command[0], "--quiet", *arguments, env=env)
    assert run.finish() == 0, run.stderr()
    assert not marker.exists(), f"the run used the network: {marker.read_text()}"
    for words in ("kernels-community", "gemm_4bit_forward", "trust check"):
        assert words not in run.stderr(), run.stderr()


# ---- 8. model folders that transformers cannot build: one sentence each ---------------------------

def broken_folder(folder: Path, config: dict | None = None, weights: bytes | None = None) -> Path:
    """MiniLM's tokenizer and weights (linked) under a config.json changed by `config`, or with `weights`."""
    source = OFFLINE_MODELS[MODEL].require_path()
    folder.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"):
        (folder / name).symlink_to(source / name)
    (folder / "config.json").write_text(json.dumps({**json.loads((source / "config.json").read_text()), **(config or {})}))
    if weights is None:
        (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    else:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


BROKEN_FOLDERS = {  # config changes (or "truncated"), words of the sentence
    "heads not dividing the hidden size": ({"num_attention_heads": 7}, "do not divide its hidden size 384"),
    "query heads not a multiple of KV heads": ({"num_key_value_heads": 5}, "not a multiple of its 5 key-value heads"),
    "GPTQ without its package": ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                                          "desc_act": False}}, "needs a package"),
    "vocabulary disagreeing with the weights": ({"vocab_size": 1000}, "shapes disagree with its config.json"),
    "truncated safetensors": ("truncated", "could not be loaded"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BROKEN_FOLDERS, ids=list(BROKEN_FOLDERS))
def test_a_model_folder_that_cannot_be_built_gets_one_sentence(case, tmp_path):
    change, words = BROKEN_FOLDERS[case]
    if change == "truncated":
        data = (OFFLINE_MODELS[MODEL].require_path() / "model.safetensors").read_bytes()
        folder = broken_folder(tmp_path / "model", weights=data[: len(data) // 2])
    else:
        folder = broken_folder(tmp_path / "model", change)
    out = tmp_path / "out"
    code, lines = _in_process("grid", PROMPT_A, "--model", folder, "--out", out, "--quiet")
    assert code == 2 and len(lines) == 1 and words in lines[0] and str(folder) in lines[0], lines
    assert not out.exists() or names(out) == set()


@pytest.mark.slow
def test_a_tokenizer_that_needs_remote_code_gets_our_sentence(tmp_path, monkeypatch):
    """transformers refuses a tokenizer whose auto_map it would have to run (`resolve_trust_remote_code`, its
    own check, raising its own words); the CLI says it in its sentence, naming --trust-remote-code."""
    from transformers import AutoTokenizer
    from transformers.dynamic_module_utils import resolve_trust_remote_code

    folder = broken_folder(tmp_path / "model")

    def remote_only(name, **kwargs):
        resolve_trust_remote_code(kwargs.get("trust_remote_code"), name, has_local_code=False, has_remote_code=True)
        pytest.fail("control: transformers' check should have refused")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", remote_only)
    code, lines = _in_process("grid", PROMPT_A, "--model", folder, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and len(lines) == 1 and "--trust-remote-code" in lines[0] and "auto_map" in lines[0], lines
