"""The capture's softmax in one pass per row, compiled from `softmax_rows.c` at first use.

`torch.softmax` and the entropy terms (`entropy_terms.py`) are six passes over a block of scores
(the softmax's three, a row maximum, a subtraction and a product) and the metrics' row maximum of
the weights a seventh; the consumers' products with key columns and row weights (`Factors`: the
metrics' key features and column sums, the Downsampler's row bins) are more passes, each reading the
whole block from memory again. On a CPU they cost as much as the attention itself. The C loop does
all of it while a row sits in the cache (`benchmarks/bench_entropy.py`, README "Benchmarks").

It is built with the machine's C compiler (`$CC`, else `cc`) for the machine's own CPU into the
cache folder (`LLM_HEATMAP_CACHE`, default `~/.cache/llm-heatmap`), once per source, compiler
options and CPU, and loaded with ctypes: no Python headers, nothing downloaded. Where it cannot be
built (no compiler), or with `LLM_HEATMAP_NATIVE=0`, `softmax` returns None and the caller uses
torch; `LLM_HEATMAP_NATIVE=1` makes a failed build an error instead. It runs on float32 CPU blocks
only, its rows split over OpenMP threads: built with `-fopenmp`, it takes the libgomp torch has loaded, so
they are torch's own intra-op threads, as many as `torch.get_num_threads()` (a compiler without OpenMP
builds it for one thread).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from llm_heatmap.cache import cache_root
from llm_heatmap.errors import InputError

SOURCE = Path(__file__).with_name("softmax_rows.c")
FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC")
# the first set the compiler takes: OpenMP threads and this CPU's vector width, down to one thread and generic code
VARIANTS = (("-fopenmp", "-march=native", "-mprefer-vector-width=512"), ("-fopenmp", "-march=native"), ("-fopenmp",),
            ("-fopenmp-simd", "-march=native"), ("-fopenmp-simd",))
MIN_ROWS_PER_THREAD = 16
MAX_KEY_COLUMNS = 64  # softmax_rows.c's MAX_COLUMNS: key columns of all groups together
MAX_ROW_GROUPS = 64  # softmax_rows.c's MAX_GROUPS
_pointer, _size = ctypes.c_void_p, ctypes.c_int64


class NativeUnavailable(InputError):
    """The kernel could not be built or loaded (an error where `LLM_HEATMAP_NATIVE=1` requires it)."""


MODES = ("auto", "0", "1")


def _mode() -> str:
    mode = os.environ.get("LLM_HEATMAP_NATIVE", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise InputError(f"LLM_HEATMAP_NATIVE={mode!r} is not one of {', '.join(MODES)}; unset it, or set 0 (torch's "
                         "softmax) or 1 (the native softmax, an error where it cannot be built).")
    return mode


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
    for variant in VARIANTS:
        flags = (*FLAGS, *variant)
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


class _Block(ctypes.Structure):
    """`Block` of softmax_rows.c."""

    _fields_ = [("scores", _pointer), ("scores_head_stride", _size), ("scores_row_stride", _size),
                ("probs", _pointer), ("probs_head_stride", _size), ("probs_row_stride", _size),
                ("keys", _size), ("rows_per_head", _size), ("sinks", _pointer), ("key_weights", _pointer),
                ("weights_stride", _size), ("sums", _pointer), ("peaks", _pointer),
                ("column_groups", _size), ("columns", _pointer), ("columns_head_stride", _pointer),
                ("columns_row_stride", _pointer), ("columns_count", _pointer), ("column_sums", _pointer),
                ("row_groups", _size), ("row_weights", _pointer), ("row_weights_count", _pointer),
                ("row_sums", _pointer), ("ruled", _size), ("diagonal", _size), ("causal", _size), ("window", _size)]


@functools.cache
def _kernel():
    """The loaded `softmax_block` function, or None where it cannot be had (and is not required)."""
    if _mode() == "0":
        return None
    try:
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler is None:
            raise NativeUnavailable(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH to build {SOURCE.name}")
        function = ctypes.CDLL(str(_build(compiler))).softmax_block
    except (OSError, NativeUnavailable) as error:
        if _mode() == "1":
            raise NativeUnavailable(f"LLM_HEATMAP_NATIVE=1 but the native softmax is unavailable ({error}); install a C "
                                    "compiler (cc, or set CC) or unset LLM_HEATMAP_NATIVE to use torch's softmax.") from error
        return None
    function.argtypes = [ctypes.POINTER(_Block), _size, _size]
    function.restype = None
    return function


def available() -> bool:
    return _kernel() is not None


class Factors(NamedTuple):
    """What a consumer asks the pass to multiply a block by (`stream.CubeConsumer`)."""

    key_columns: tuple[torch.Tensor, ...] = ()  # "h f k" each (h may be expanded): sum_j p_ij c_fj
    row_weights: tuple[torch.Tensor, ...] = ()  # "g q" each: sum_i u_gi p_ij, per head


class KeyRule(NamedTuple):
    """The kernel's own causal and sliding-window rule over a block's keys, which the pass applies itself (no mask
    filled into the scores): row i's own key is `diagonal + i`; causal rows see no later key, a window of w keys
    only those less than w from it. Every row must see at least one key."""

    diagonal: int
    causal: bool
    window: int | None = None


class Products(NamedTuple):
    """What the pass gives for `Factors`, in their order."""

    key_sums: tuple[torch.Tensor, ...]  # "b h q f" per key column group
    row_sums: tuple[torch.Tensor, ...]  # "b h g k" per row weight group


class NativeSoftmax(NamedTuple):
    probs: torch.Tensor  # "b h q k"
    sums: torch.Tensor  # "b h q c": the entropy terms' row sums (c = 2 with key weights)
    peaks: torch.Tensor  # "b h q"
    products: Products


def _check_shapes(heads: int, rows: int, keys: int, sinks, key_weights, factors: Factors) -> None:
    """Refuse what the C loop would read past the end of: every tensor must cover the block's heads, rows and keys."""
    wrong = []
    if sinks is not None and tuple(sinks.shape) != (heads,):
        wrong.append(f"sinks {tuple(sinks.shape)} (needs ({heads},))")
    if key_weights is not None and (key_weights.ndim != 2 or key_weights.shape[0] != heads or key_weights.shape[1] < keys):
        wrong.append(f"key weights {tuple(key_weights.shape)} (needs ({heads}, >= {keys}))")
    for columns in factors.key_columns:
        if columns.ndim != 3 or columns.shape[0] != heads or columns.shape[2] < keys:
            wrong.append(f"key columns {tuple(columns.shape)} (needs ({heads}, f, >= {keys}))")
    if sum(columns.shape[1] for columns in factors.key_columns if columns.ndim == 3) > MAX_KEY_COLUMNS:
        wrong.append(f"more than {MAX_KEY_COLUMNS} key columns in all")
    if len(factors.row_weights) > MAX_ROW_GROUPS:
        wrong.append(f"more than {MAX_ROW_GROUPS} groups of row weights")
    for weights in factors.row_weights:
        if weights.ndim != 2 or weights.shape[1] != rows:
            wrong.append(f"row weights {tuple(weights.shape)} (needs (g, {rows}))")
    if wrong:
        raise InputError(f"the native softmax got a block of {heads} heads x {rows} rows x {keys} keys and "
                         f"{'; '.join(wrong)}; a consumer's factors must cover the part it was given.")


def _over_keys(tensor: torch.Tensor, keys: int) -> torch.Tensor:
    """`tensor`'s first `keys` keys (last axis) as float32 on the CPU, keys contiguous, as the C loop reads them: a
    copy only where they are not already (its other axes keep their strides)."""
    tensor = tensor.detach().to("cpu", torch.float32)[..., :keys]
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _addresses(kind, values) -> ctypes.Array:
    return (kind * max(1, len(values)))(*values)


def softmax(scores: torch.Tensor, out: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
            key_weights: torch.Tensor | None = None, factors: Factors = Factors(),
            rule: KeyRule | None = None) -> NativeSoftmax | None:
    """The softmax of float32 CPU `scores` `"b h q k"` and what `softmax_rows.c` gives with it, or None where the
    kernel is unavailable or does not apply (then use torch).

    `out`: where the probabilities go (`"b h q k"`, float32, keys contiguous: a cube's rows); `sinks`: a logit
    per head (`"h"`) that joins each row's normaliser; `key_weights`: `"h k"`, a second column of entropy sums
    weighted by them; `factors`: key columns and row weights to multiply the block by (these two for one
    sequence only); `rule`: the keys each row may see, the rest weighted 0 whatever their scores.
    """
    kernel = _kernel()
    if kernel is None or scores.device.type != "cpu" or scores.dtype != torch.float32 or scores.ndim != 4:
        return None
    probs = torch.empty_like(scores) if out is None else out
    one_sequence = (key_weights is None and not any(factors)) or scores.shape[0] == 1
    if probs.shape != scores.shape or probs.dtype != torch.float32 or probs.device.type != "cpu" \
            or scores.stride(-1) != 1 or probs.stride(-1) != 1 or not one_sequence:
        return None
    batch, heads, rows, keys = scores.shape
    _check_shapes(heads, rows, keys, sinks, key_weights, factors)
    sinks = None if sinks is None else sinks.detach().to("cpu", torch.float32).contiguous()
    weights = None if key_weights is None else _over_keys(key_weights, keys)
    columns = [_over_keys(c, keys) for c in factors.key_columns]
    row_weights = [u.detach().to("cpu", torch.float32).contiguous() for u in factors.row_weights]
    sums = scores.new_empty(batch, heads, rows, 1 if weights is None else 2)
    peaks = scores.new_empty(batch, heads, rows)
    key_sums = scores.new_empty(batch, heads, rows, sum(c.shape[1] for c in columns))
    row_sums = [scores.new_empty(batch, heads, u.shape[0], keys) for u in row_weights]  # the pass zeroes them
    block = _Block(keys=keys, rows_per_head=rows,
                   sinks=None if sinks is None else sinks.data_ptr(), key_weights=None if weights is None else weights.data_ptr(),
                   weights_stride=0 if weights is None else weights.stride(0),
                   scores_head_stride=scores.stride(1), scores_row_stride=scores.stride(2),
                   probs_head_stride=probs.stride(1), probs_row_stride=probs.stride(2),
                   column_groups=len(columns), row_groups=len(row_weights))
    if rule is not None:
        block.ruled, block.diagonal, block.causal, block.window = 1, rule.diagonal, int(rule.causal), rule.window or 0
    arrays = [_addresses(_pointer, [c.data_ptr() for c in columns]), _addresses(_size, [c.stride(0) for c in columns]),
              _addresses(_size, [c.stride(1) for c in columns]), _addresses(_size, [c.shape[1] for c in columns]),
              _addresses(_pointer, [u.data_ptr() for u in row_weights]), _addresses(_size, [u.shape[0] for u in row_weights])]
    for name, array in zip(("columns", "columns_head_stride", "columns_row_stride", "columns_count", "row_weights",
                            "row_weights_count"), arrays):
        setattr(block, name, ctypes.cast(array, _pointer))
    total = heads * rows
    threads = max(1, min(torch.get_num_threads(), total // MIN_ROWS_PER_THREAD))
    for item in range(batch):
        item_sums = _addresses(_pointer, [r[item].data_ptr() for r in row_sums])
        block.scores, block.probs = scores[item].data_ptr(), probs[item].data_ptr()
        block.sums, block.peaks, block.column_sums = sums[item].data_ptr(), peaks[item].data_ptr(), key_sums[item].data_ptr()
        block.row_sums = ctypes.cast(item_sums, _pointer)
        kernel(ctypes.byref(block), total, threads)
    starts = [0, *itertools.accumulate(c.shape[1] for c in columns)]
    key_sums = tuple(key_sums[..., start:stop] for start, stop in zip(starts, starts[1:]))
    return NativeSoftmax(probs, sums, peaks, Products(key_sums, tuple(row_sums)))
