"""The capture's softmax in one pass per row, compiled from `softmax_rows.c` at first use.

`torch.softmax` and the entropy terms (`entropy_terms.py`) are six passes over a block of scores
(the softmax's three, a row maximum, a subtraction and a product) and the metrics' row maximum of
the weights a seventh: on a CPU they cost as much as the attention itself. The C loop does all of it
while a row sits in the cache, a quarter of their time (`benchmarks/bench_entropy.py`).

It is built with the machine's C compiler (`$CC`, else `cc`) for the machine's own CPU into the
cache folder (`LLM_HEATMAP_CACHE`, default `~/.cache/llm-heatmap`), once per source, compiler
options and CPU, and loaded with ctypes: no Python headers, nothing downloaded. Where it cannot be
built (no compiler), or with `LLM_HEATMAP_NATIVE=0`, `softmax` returns None and the caller uses
torch; `LLM_HEATMAP_NATIVE=1` makes a failed build an error instead. It runs on float32 CPU blocks
only, split over torch's intra-op threads (ctypes lets go of the GIL during the call).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from llm_heatmap.cache import cache_root

SOURCE = Path(__file__).with_name("softmax_rows.c")
FLAGS = ("-O3", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC")
CPU_FLAGS = (("-march=native", "-mprefer-vector-width=512"), ("-march=native",), ())  # the first the compiler takes
MIN_ROWS_PER_THREAD = 16
_pointer, _size = ctypes.c_void_p, ctypes.c_int64


class NativeUnavailable(RuntimeError):
    """The kernel was required (`LLM_HEATMAP_NATIVE=1`) and could not be built or loaded."""


def _mode() -> str:
    return os.environ.get("LLM_HEATMAP_NATIVE", "auto").strip().lower() or "auto"


def _cpu_identity() -> str:
    """What `-march=native` compiles for: a library built on one CPU must not load on another."""
    try:
        with open("/proc/cpuinfo") as handle:
            lines = [line for line in handle if line.startswith(("flags", "model name", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    for cpu_flags in CPU_FLAGS:
        flags = (*FLAGS, *cpu_flags)
        digest = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(),
                                            _cpu_identity().encode()])).hexdigest()[:20]
        library = cache_root() / "native" / f"softmax_rows-{digest}.so"
        if library.exists():
            return library
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as folder:
            built = Path(folder) / library.name
            result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, library)  # atomic: another process may be building the same file
                return library
            error = (result.stderr.strip().splitlines() or ["no message"])[-1]
    raise NativeUnavailable(f"{compiler} could not build {SOURCE.name}: {error}")


@functools.cache
def _kernel():
    """The loaded `softmax_rows` function, or None where it cannot be had (and is not required)."""
    if _mode() == "0":
        return None
    try:
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler is None:
            raise NativeUnavailable(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH to build {SOURCE.name}")
        function = ctypes.CDLL(str(_build(compiler))).softmax_rows
    except (OSError, NativeUnavailable) as error:
        if _mode() == "1":
            raise NativeUnavailable(f"LLM_HEATMAP_NATIVE=1 but the native softmax is unavailable: {error}") from error
        return None
    function.argtypes = [_pointer, _size, _size, _pointer, _size, _size, _size, _size, _size, _size, _pointer, _pointer,
                         _size, _pointer, _pointer]
    function.restype = None
    return function


def available() -> bool:
    return _kernel() is not None


@functools.cache
def _pool(threads: int, process: int) -> ThreadPoolExecutor:
    """Threads of this process (a forked child gets a pool of its own: its parent's threads are not in it)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="llm-heatmap-softmax")


def softmax(scores: torch.Tensor, out: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
            key_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(probs `"b h q k"`, sums `"b h q c"`, peaks `"b h q"`) of float32 CPU `scores` (see `softmax_rows.c`), or
    None where the kernel is unavailable or does not apply (then use torch).

    `out`: where the probabilities go (`"b h q k"`, float32, keys contiguous: a cube's rows); `sinks`: a logit
    per head (`"h"`) that joins each row's normaliser; `key_weights`: `"h k"`, a second column of sums weighted
    by them (one sequence only).
    """
    kernel = _kernel()
    if kernel is None or scores.device.type != "cpu" or scores.dtype != torch.float32 or scores.ndim != 4:
        return None
    probs = torch.empty_like(scores) if out is None else out
    if probs.shape != scores.shape or probs.dtype != torch.float32 or probs.device.type != "cpu" \
            or scores.stride(-1) != 1 or probs.stride(-1) != 1 or (key_weights is not None and scores.shape[0] != 1):
        return None
    batch, heads, rows, keys = scores.shape
    sinks = None if sinks is None else sinks.detach().to("cpu", torch.float32).contiguous()
    weights = None if key_weights is None else key_weights.detach().to("cpu", torch.float32)[:, :keys].contiguous()
    sums = scores.new_empty(batch, heads, rows, 1 if weights is None else 2)
    peaks = scores.new_empty(batch, heads, rows)
    total = heads * rows
    threads = max(1, min(torch.get_num_threads(), total // MIN_ROWS_PER_THREAD))
    bounds = [total * i // threads for i in range(threads + 1)]
    for item in range(batch):
        def run(start: int, stop: int, item=item) -> None:
            kernel(scores[item].data_ptr(), scores.stride(1), scores.stride(2), probs[item].data_ptr(),
                   probs.stride(1), probs.stride(2), start, stop, keys, rows,
                   None if sinks is None else sinks.data_ptr(), None if weights is None else weights.data_ptr(),
                   0 if weights is None else weights.stride(0), sums[item].data_ptr(), peaks[item].data_ptr())

        if threads == 1:
            run(0, total)
        else:
            for future in [_pool(threads, os.getpid()).submit(run, a, b) for a, b in zip(bounds[:-1], bounds[1:])]:
                future.result()
    return probs, sums, peaks
