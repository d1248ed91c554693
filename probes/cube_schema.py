"""The one schema of a cube file, checked field by field before `AttentionCube.load` builds a cube.

A cube file is a safetensors file (read with safetensors only: nothing in it is ever unpickled or
run) whose header metadata `llm_heatmap` holds a JSON object:

    format "llm-heatmap-cube", version <= FORMAT_VERSION
    spec        a ModelSpec as a JSON object (layers, heads and head size at most MAX_AXIS, KV heads dividing heads)
    tokens      one string per key, or one such list per sequence of a batch
    layers      distinct model layer indices, one per entry of the pattern's layer axis
    heads       distinct query head indices, one per entry of its head axis
    weighting   "weights" or "norms"; difference: true for a difference cube (B - A)
    pooling     null, or the bins of an area-pooled cube (edges consistent with the axes)
    stream      null, or where a streamed block of rows sits
    key_axis    optional (version 3): what the key positions are (`axes.Axis`), one entry per position
    prompt, source, metadata (free text and a JSON object)

and whose tensors are `pattern` `"(b) l h q k"` (float), `token_ids` `"(b) k"` (integers),
`query_positions` `"q"` (integers, increasing, within the prompt), `key_mask` `"(b) k"` and
`query_mask` `"(b) q"` (bool), optionally `generated` `"(b) k"` (bool) and the side tensors of
`cube.SIDE_TENSORS`. Every size the header or the shapes give is bounded (axes at most MAX_AXIS,
tokens and rows at most MAX_TOKENS and the spec's context, the prompt and each token label at most
MAX_CHARS_PER_TOKEN characters per token), every text is Unicode (no lone surrogate), every real
sequence has a real key and a real query row, and the side tensors' magnitudes stay below MAX_MAGNITUDE
(so sums of products cannot overflow float32). Values: finite everywhere; attention weights within [0, 1] with every real row
summing to 1; a difference of weights within [-1, 1] with rows summing to 0; a norm-weighted pattern
and the norms non-negative.

`inspect_cube_file` checks the header and every tensor's name, dtype and shape without reading any
tensor data (so a file claiming a huge cube costs nothing); `read_cube_file` then reads the tensors
and checks their values, one layer at a time. Either raises one `InputError` naming the file and the
first field that is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llm_heatmap.choices import WEIGHTINGS
from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec
from llm_heatmap.models.files import check_cube_path

from llm_heatmap.models.sites import SITE_ORDER

from .axes import Axis

FORMAT = "llm-heatmap-cube"
# 2: the spec names its attention site; rectangular cubes (cross-attention) carry their query tokens
# 3: the key axis says what its positions are ("key_axis"); the spec may hold bidirectional blocks
FORMAT_VERSION = 3

# Optional tensors captured beside the pattern, with the axes they share with it (l: the cube's
# layers, h: its heads, g: the model's KV heads, q: its query rows, k: its keys, d: head size):
# the norm of what each head writes from each key (`||v_j W_O^h||`, Kobayashi et al. 2020), the
# norm of each head's output for each row, and the post-RoPE queries and keys the kernel received.
SIDE_TENSORS = {"value_norms": "l h k", "output_norms": "l h q", "queries": "l h q d", "keys": "l g k d"}
from .memory import check_fits

LAYER_TYPES = ("full_attention", "sliding_attention")
MAX_AXIS = 1 << 16  # layers, heads, KV heads and head size: no model comes near
ROW_SUM_TOLERANCE = 1e-2  # half-precision cubes of thousands of keys sum to 1 within a few 1e-3
VALUE_TOLERANCE = 1e-3
MAX_TOKENS = 1 << 24  # a prompt's tokens (or a pooled cube's key_edges[-1]): far past any model's context
MAX_CHARS_PER_TOKEN = 1024  # a token's label, and the prompt per token of the cube
MAX_MAGNITUDE = 1e12  # norms, queries and keys: squared and summed over a million keys, still far from float32's 3e38

NON_NEGATIVE = ("value_norms", "output_norms")
FLOATS = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
INTEGERS = {"I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1, "U16": 2, "U32": 4, "U64": 8}
BOOLS = {"BOOL": 1}
REQUIRED_TENSORS = ("pattern", "token_ids", "query_positions", "key_mask", "query_mask")
OPTIONAL_TENSORS = ("generated", *SIDE_TENSORS)
ADVICE = "write it again with AttentionCube.save or `llm-heatmap grid`"


class _Invalid(Exception):
    """The first field of a cube file that breaks the schema, and how."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")


def _fail(field: str, problem: str):
    raise _Invalid(field, problem)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _index_list(value, field: str, size: int, what: str) -> list[int]:
    if not isinstance(value, list) or not all(_whole(v) for v in value):
        _fail(field, "must be a list of whole numbers")
    bad = [v for v in value if not 0 <= v < size]
    if bad:
        _fail(field, f"names {what} {bad[0]}, but the spec has {what}s 0..{size - 1}")
    if len(set(value)) != len(value):
        _fail(field, f"names a {what} twice")
    if not value:
        _fail(field, f"lists no {what}")
    return value


def _increasing(values, field: str, first: int | None = 0) -> None:
    if not isinstance(values, list) or not values or not all(_whole(v) for v in values):
        _fail(field, "must be a non-empty list of whole numbers")
    if first is not None and values[0] != first:
        _fail(field, f"must start at {first}")
    if any(b <= a for a, b in zip(values, values[1:])):
        _fail(field, "must be strictly increasing")


# ---- header ---------------------------------------------------------------------------------

_SPEC_TYPES = {  # field: (accepts, what it must be); None allowed where the dataclass default is None
    "model_type": (lambda v: isinstance(v, str), "text"),
    "architecture": (lambda v: isinstance(v, str), "text"),
    "num_layers": (lambda v: _whole(v) and 1 <= v <= MAX_AXIS, f"a whole number from 1 to {MAX_AXIS}"),
    "num_heads": (lambda v: _whole(v) and 1 <= v <= MAX_AXIS, f"a whole number from 1 to {MAX_AXIS}"),
    "num_kv_heads": (lambda v: _whole(v) and 1 <= v <= MAX_AXIS, f"a whole number from 1 to {MAX_AXIS}"),
    "head_dim": (lambda v: _whole(v) and 1 <= v <= MAX_AXIS, f"a whole number from 1 to {MAX_AXIS}"),
    "causal": (lambda v: isinstance(v, bool), "true or false"),
    "layer_types": (lambda v: isinstance(v, list) and all(t in LAYER_TYPES for t in v),
                    f"a list of {' or '.join(LAYER_TYPES)}"),
    "sliding_window": (lambda v: _whole(v) and v >= 1, "a whole number of at least 1, or null"),
    "num_experts": (lambda v: _whole(v) and v >= 0, "a whole number, or null"),
    "experts_per_token": (lambda v: _whole(v) and v >= 0, "a whole number, or null"),
    "quantization": (lambda v: isinstance(v, str), "text, or null"),
    "max_positions": (lambda v: _whole(v) and v >= 1, "a whole number of at least 1, or null"),
    "attn_softcap": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                     "a finite number above 0, or null"),
    "site": (lambda v: isinstance(v, str) and v in SITE_ORDER, f"one of {', '.join(SITE_ORDER)}, or null"),
    "bidirectional_blocks": (lambda v: isinstance(v, list) and all(
        isinstance(b, list) and len(b) == 2 and all(_whole(p) and p >= 0 for p in b) and b[0] <= b[1] for b in v),
        "a list of [first, last] positions with first <= last"),
    "segments": (lambda v: isinstance(v, list) and all(isinstance(b, list) and all(_whole(p) for p in b) and (
        not b or (len(b) >= 2 and b[0] == 0 and all(x < y for x, y in zip(b, b[1:])))) for b in v),
        "a list (one per layer) of increasing segment bounds from 0, or empty lists"),
    "attention_modules": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of text"),
    "output_projections": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of text"),
}


def check_spec(data) -> ModelSpec:
    """A `ModelSpec` from the header's "spec", every field checked."""
    if not isinstance(data, dict):
        _fail('header field "spec"', "must be a JSON object")
    known = {f.name: f for f in fields(ModelSpec)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        _fail(f"spec.{unknown[0]}", "is not a field of ModelSpec")
    for name, spec_field in known.items():
        if name not in data:
            if spec_field.default is MISSING and spec_field.default_factory is MISSING:
                _fail(f"spec.{name}", "is missing")
            continue
        accepts, what = _SPEC_TYPES[name]
        value = data[name]
        if value is None and spec_field.default is None:
            continue
        if not accepts(value):
            _fail(f"spec.{name}", f"must be {what}")
    if data["num_heads"] % data["num_kv_heads"]:
        _fail("spec.num_kv_heads", f"({data['num_kv_heads']}) must divide spec.num_heads ({data['num_heads']})")
    if len(data["layer_types"]) != data["num_layers"]:
        _fail("spec.layer_types", f"lists {len(data['layer_types'])} layers, but spec.num_layers is {data['num_layers']}")
    if "sliding_attention" in data["layer_types"] and data.get("sliding_window") is None:
        _fail("spec.sliding_window", "must be set where spec.layer_types has sliding layers")
    for name in ("attention_modules", "output_projections", "segments"):
        if len(data.get(name, [])) not in (0, data["num_layers"]):
            _fail(f"spec.{name}", f"must list one entry per layer ({data['num_layers']}) or none")
    return ModelSpec.from_dict(data)


def _check_texts(value, field: str) -> None:
    """Every string in `value` (a JSON value), keys included, is Unicode text: no lone surrogate."""
    stack = [(value, field)]
    while stack:
        value, field = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                _fail(field, f"holds a lone surrogate ({value[error.start]!a}), which is not a Unicode character")
        elif isinstance(value, dict):
            stack.extend((key, f"{field} (a key)") for key in value)
            stack.extend((item, f"{field}.{key}" if isinstance(key, str) and key.isidentifier() else field)
                         for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, field) for item in value)


def _check_header(header) -> ModelSpec:
    if not isinstance(header, dict):
        _fail("the llm_heatmap header", "must be a JSON object")
    for name, value in header.items():
        _check_texts(value, f'header field "{name}"')
    if header.get("format") != FORMAT:
        _fail('header field "format"', f"must be {FORMAT!r}")
    version = header.get("version")
    if not _whole(version) or not 1 <= version <= FORMAT_VERSION:
        _fail('header field "version"', f"must be a whole number from 1 to {FORMAT_VERSION}; this file may come from "
              "a newer llm-heatmap")
    for name in ("spec", "tokens", "layers", "heads"):
        if name not in header:
            _fail(f'header field "{name}"', "is missing")
    spec = check_spec(header["spec"])
    _index_list(header["layers"], 'header field "layers"', spec.num_layers, "layer")
    _index_list(header["heads"], 'header field "heads"', spec.num_heads, "head")
    if header.get("weighting", "weights") not in WEIGHTINGS:
        _fail('header field "weighting"', f"must be one of {', '.join(WEIGHTINGS)}")
    if not isinstance(header.get("difference", False), bool):
        _fail('header field "difference"', "must be true or false")
    prompt = header.get("prompt")
    if prompt is not None and not isinstance(prompt, str) and not (
            isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)):
        _fail('header field "prompt"', "must be text, a list of texts, or null")
    if header.get("source") is not None and not isinstance(header["source"], str):
        _fail('header field "source"', "must be text or null")
    if not isinstance(header.get("metadata", {}), dict):
        _fail('header field "metadata"', "must be a JSON object")
    return spec


def _check_pooling(pooling, num_queries: int, num_keys: int, batched: bool) -> int:
    """The prompt's token count of a pooled cube."""
    if not isinstance(pooling, dict) or set(pooling) != {"query_edges", "key_edges", "query_first", "query_last"}:
        _fail('header field "pooling"', "must be null or an object with query_edges, key_edges, query_first and query_last")
    if batched:
        _fail('header field "pooling"', "must be null for a batch (a pooled cube holds one sequence)")
    query_edges, key_edges = pooling["query_edges"], pooling["key_edges"]
    _increasing(query_edges, "pooling.query_edges")
    _increasing(key_edges, "pooling.key_edges")
    if len(query_edges) != num_queries + 1:
        _fail("pooling.query_edges", f"must hold {num_queries + 1} edges for {num_queries} query bins")
    if len(key_edges) != num_keys + 1:
        _fail("pooling.key_edges", f"must hold {num_keys + 1} edges for {num_keys} key bins")
    tokens = key_edges[-1]
    if tokens > MAX_TOKENS:
        _fail("pooling.key_edges", f"ends at {tokens} tokens, more than the {MAX_TOKENS} a cube may hold")
    if query_edges[-1] > tokens:
        _fail("pooling.query_edges", f"covers {query_edges[-1]} query rows, more than the {tokens} tokens")
    for name in ("query_first", "query_last"):
        values = pooling[name]
        if not isinstance(values, list) or len(values) != num_queries or not all(
                _whole(v) and 0 <= v < tokens for v in values):
            _fail(f"pooling.{name}", f"must hold {num_queries} positions within the {tokens} tokens")
    if any(a > b for a, b in zip(pooling["query_first"], pooling["query_last"])):
        _fail("pooling.query_first", "must not lie after pooling.query_last")
    return tokens


def _check_stream(stream, num_queries: int, num_keys: int) -> None:
    names = {"pass_index", "row_start", "row_stop", "num_queries", "key_stop"}
    if not isinstance(stream, dict) or not set(stream) <= names or not names - {"key_stop"} <= set(stream):
        _fail('header field "stream"', "must be null or an object with pass_index, row_start, row_stop, num_queries "
              "and key_stop")
    if not all(_whole(stream[n]) and stream[n] >= 0 for n in names - {"key_stop"}):
        _fail('header field "stream"', "must hold whole numbers of at least 0")
    if stream["row_stop"] - stream["row_start"] != num_queries or stream["row_stop"] > stream["num_queries"]:
        _fail("stream.row_start", f"and stream.row_stop must span the {num_queries} rows of the pattern")
    key_stop = stream.get("key_stop")
    if key_stop is not None and not (_whole(key_stop) and 0 <= key_stop <= num_keys):
        _fail("stream.key_stop", f"must be null or a key index from 0 to {num_keys}")


# ---- tensor layout --------------------------------------------------------------------------

def _expect(name: str, shape: tuple, dtype: str, want: tuple, kinds: dict, kind_text: str) -> None:
    if dtype not in kinds:
        _fail(f'tensor "{name}"', f"has dtype {dtype}, but must hold {kind_text}")
    if tuple(shape) != tuple(want):
        _fail(f'tensor "{name}"', f"has shape {list(shape)}, but must have shape {list(want)}")


def _check_tokens(tokens, batch: int | None, num_keys: int) -> None:
    sequences = [tokens] if batch is None else tokens
    if batch is not None and (not isinstance(tokens, list) or len(tokens) != batch):
        _fail('header field "tokens"', f"must hold one list of tokens per sequence ({batch})")
    for sequence in sequences:
        if not isinstance(sequence, list) or not all(isinstance(t, str) for t in sequence):
            _fail('header field "tokens"', "must be a list of token strings")
        if len(sequence) != num_keys:
            _fail('header field "tokens"', f"holds {len(sequence)} token labels, but the pattern has {num_keys} keys")
        if any(len(t) > MAX_CHARS_PER_TOKEN for t in sequence):
            _fail('header field "tokens"', f"holds a token label longer than {MAX_CHARS_PER_TOKEN} characters")


def _check_prompt_size(prompt, num_tokens: int) -> None:
    """A prompt of at most `MAX_CHARS_PER_TOKEN` characters per token of the cube (its title is cut from it)."""
    for text in [prompt] if isinstance(prompt, str) else prompt or []:
        if len(text) > MAX_CHARS_PER_TOKEN * num_tokens:
            _fail('header field "prompt"', f"holds {len(text)} characters, more than {MAX_CHARS_PER_TOKEN} per token "
                  f"of the cube's {num_tokens} tokens")


@dataclass(frozen=True)
class CubeFile:
    """A cube file whose header and tensor layout passed the schema (no tensor data read yet)."""

    path: Path
    header: dict
    spec: ModelSpec
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    num_tokens: int

    @property
    def batched(self) -> bool:
        return len(self.shapes["pattern"]) == 5

    @property
    def key_axis(self) -> Axis | None:
        data = self.header.get("key_axis")
        return None if data is None else Axis.from_dict(data)

    @property
    def pattern_shape(self) -> tuple[int, int, int, int]:
        """`"l h q k"` of the pattern (of each sequence of a batch)."""
        return tuple(self.shapes["pattern"][-4:])

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor once read."""
        every = {**FLOATS, **INTEGERS, **BOOLS}
        return sum(math.prod(shape) * every[self.dtypes[name]] for name, shape in self.shapes.items())


def _check_layout(header: dict, spec: ModelSpec, shapes: dict, dtypes: dict) -> int:
    """The prompt's token count, once every tensor's name, dtype and shape agree with the header."""
    unknown = sorted(set(shapes) - set(REQUIRED_TENSORS) - set(OPTIONAL_TENSORS))
    if unknown:
        _fail(f'tensor "{unknown[0]}"', "is not part of a cube")
    for name in REQUIRED_TENSORS:
        if name not in shapes:
            _fail(f'tensor "{name}"', "is missing")
    pattern = tuple(shapes["pattern"])
    if dtypes["pattern"] not in FLOATS:
        _fail('tensor "pattern"', f"has dtype {dtypes['pattern']}, but must hold floats")
    if len(pattern) not in (4, 5):
        _fail('tensor "pattern"', f"has {len(pattern)} axes, but must have 4 (layer, head, query, key) or 5 (a batch)")
    if 0 in pattern:
        _fail('tensor "pattern"', f"has shape {list(pattern)}, with an empty axis")
    batch = pattern[0] if len(pattern) == 5 else None
    layers, heads, queries, keys = pattern[-4:]
    if max(pattern) > MAX_TOKENS:
        _fail('tensor "pattern"', f"has shape {list(pattern)}, with an axis longer than {MAX_TOKENS}")
    if layers != len(header["layers"]):
        _fail('header field "layers"', f"lists {len(header['layers'])} layers, but the pattern has {layers}")
    if heads != len(header["heads"]):
        _fail('header field "heads"', f"lists {len(header['heads'])} heads, but the pattern has {heads}")
    front = () if batch is None else (batch,)
    tokens = keys
    if header.get("pooling") is not None:
        tokens = _check_pooling(header["pooling"], queries, keys, batch is not None)
    elif queries > keys and header.get("query_tokens") is None:
        _fail('tensor "pattern"', f"has {queries} query rows, more than its {keys} keys")
    if header.get("stream") is not None:
        _check_stream(header["stream"], queries, keys)
    if spec.max_positions and tokens > spec.max_positions:
        _fail('tensor "pattern"', f"covers {tokens} tokens, more than the model's context of {spec.max_positions}")
    _check_tokens(header["tokens"], batch, keys)
    _check_prompt_size(header.get("prompt"), tokens)
    if header.get("key_axis") is not None:
        _check_axis(header["key_axis"], tokens)
    query_tokens = header.get("query_tokens")
    if query_tokens is not None and (batch is not None or not isinstance(query_tokens, list) or len(query_tokens) != queries
                                     or not all(isinstance(t, str) for t in query_tokens)):
        _fail('header field "query_tokens"', f"must be a list of {queries} token strings, one per query row of one sequence")
    _expect("query_positions", shapes["query_positions"], dtypes["query_positions"], (queries,), INTEGERS, "integers")
    _expect("token_ids", shapes["token_ids"], dtypes["token_ids"], front + (keys,), INTEGERS, "integers")
    _expect("key_mask", shapes["key_mask"], dtypes["key_mask"], front + (keys,), BOOLS, "booleans")
    _expect("query_mask", shapes["query_mask"], dtypes["query_mask"], front + (queries,), BOOLS, "booleans")
    if "generated" in shapes:
        _expect("generated", shapes["generated"], dtypes["generated"], front + (keys,), BOOLS, "booleans")
    sizes = {"l": layers, "h": heads, "q": queries, "k": keys, "g": spec.num_kv_heads, "d": spec.head_dim}
    for name, axes in SIDE_TENSORS.items():
        if name in shapes:
            _expect(name, shapes[name], dtypes[name], front + tuple(sizes[a] for a in axes.split()), FLOATS, "floats")
    return tokens


def inspect_cube_file(path: str | Path) -> CubeFile:
    """The checked header and tensor layout of a cube file, reading no tensor data (module docstring)."""
    path = check_cube_path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("llm_heatmap")
            slices = {name: handle.get_slice(name) for name in handle.keys()}
            shapes = {name: tuple(piece.get_shape()) for name, piece in slices.items()}
            dtypes = {name: piece.get_dtype() for name, piece in slices.items()}
    except (SafetensorError, OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        raise InputError(f"cube file {path} is truncated or not a safetensors file ({reason}); {ADVICE}.") from None
    if raw is None:
        raise InputError(f"file {path} is a safetensors file but not an llm-heatmap cube; pass a cube written by llm-heatmap.")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise InputError(f"cube file {path} has a header that is not valid JSON; {ADVICE}.") from None
    try:
        spec = _check_header(header)
        num_tokens = _check_layout(header, spec, shapes, dtypes)
    except _Invalid as error:
        raise InputError(f"cube file {path} is not a valid cube: {error}; {ADVICE}.") from None
    return CubeFile(path, header, spec, shapes, dtypes, num_tokens)


# ---- values ---------------------------------------------------------------------------------

def _where(position, names) -> str:
    return ", ".join(f"{name} {int(i)}" for name, i in zip(names, position))


def _check_pattern(cube_file: CubeFile, pattern: torch.Tensor, query_mask: torch.Tensor) -> None:
    """Finite values in the range of what the pattern holds; real rows of weights summing to 1 (0 for a difference)."""
    header = cube_file.header
    norms, difference = header.get("weighting", "weights") == "norms", header.get("difference", False)
    low, high = (None, None) if norms and difference else (0.0, None) if norms else \
        (-1.0, 1.0) if difference else (0.0, 1.0)
    row_sum = None if norms else 0.0 if difference else 1.0
    what = ("a difference of norm-weighted attention" if norms and difference else "norm-weighted attention" if norms
            else "a difference of attention weights" if difference else "attention weights")
    names = (["sequence"] if cube_file.batched else []) + ["head", "row", "key"]
    rows = query_mask.bool()[:, None, :] if cube_file.batched else query_mask.bool()[None, :]
    for slot, layer in enumerate(header["layers"]):
        block = (pattern[:, slot] if cube_file.batched else pattern[slot]).float()
        smallest, largest = (float(v) for v in torch.aminmax(block))  # one pass; nan where any value is nan
        problems = []
        if not (math.isfinite(smallest) and math.isfinite(largest)):
            problems.append((~torch.isfinite(block), "a value that is not finite"))
        elif low is not None and smallest < low - (VALUE_TOLERANCE if low else 0.0):
            problems.append((block < low - (VALUE_TOLERANCE if low else 0.0), f"a value below {low:g}, impossible for {what}"))
        elif high is not None and largest > high + VALUE_TOLERANCE:
            problems.append((block > high + VALUE_TOLERANCE, f"a value above {high:g}, impossible for {what}"))
        for bad, problem in problems:
            position = bad.nonzero()[0].tolist()
            _fail('tensor "pattern"', f"holds {problem} ({float(block[tuple(position)]):g} at layer {layer}, "
                  f"{_where(position, names)})")
        if row_sum is not None:
            off = ((block.sum(-1) - row_sum).abs() > ROW_SUM_TOLERANCE) & rows
            if bool(off.any()):
                position = off.nonzero()[0].tolist()
                total = float(block[tuple(position)].sum())
                _fail('tensor "pattern"', f"has a row summing to {total:g} at layer {layer}, "
                      f"{_where(position, names[:-1])}, but rows of {what} sum to {row_sum:g}")


def _check_values(cube_file: CubeFile, tensors: dict[str, torch.Tensor]) -> None:
    positions = tensors["query_positions"].long()
    if len(positions) > 1 and bool((positions.diff() <= 0).any()):
        _fail('tensor "query_positions"', "must be strictly increasing")
    query_tokens = cube_file.header.get("query_tokens")  # a cross-attention cube's rows count along their own sequence
    rows = cube_file.num_tokens if query_tokens is None else len(query_tokens)
    if bool((positions < 0).any()) or bool((positions >= rows).any()):
        _fail('tensor "query_positions"', f"must lie within the {rows} tokens (0..{rows - 1})")
    if not bool(tensors["key_mask"].bool().any(-1).all()):
        _fail('tensor "key_mask"', "marks no real key")
    if not bool(tensors["query_mask"].bool().any(-1).all()):
        _fail('tensor "query_mask"', "marks no real query row")
    for name in SIDE_TENSORS:
        if name in tensors:
            values = tensors[name].float()
            if not bool(torch.isfinite(values).all()):
                _fail(f'tensor "{name}"', "holds a value that is not finite")
            if bool((values.abs() > MAX_MAGNITUDE).any()):
                _fail(f'tensor "{name}"', f"holds a value of magnitude above {MAX_MAGNITUDE:g}, far past any model's")
            if name in NON_NEGATIVE and bool((values < 0).any()):
                _fail(f'tensor "{name}"', "holds a negative norm")
    _check_pattern(cube_file, tensors["pattern"], tensors["query_mask"])


def _check_axis(data, positions: int) -> None:
    """The header's "key_axis" (`axes.Axis.to_dict`): its fields, one entry per key position."""
    if not isinstance(data, dict) or set(data) - {f.name for f in fields(Axis)}:
        _fail('header field "key_axis"', "must be a JSON object with the fields of an Axis")
    try:
        axis = Axis.from_dict(data)
    except (InputError, TypeError, ValueError) as error:
        _fail('header field "key_axis"', f"is not an Axis ({str(error).rstrip('.')})")
    if axis.length != positions:
        _fail('header field "key_axis"', f"describes {axis.length} positions, but the cube has {positions} keys")


def read_cube_file(path: str | Path) -> tuple[CubeFile, dict[str, torch.Tensor]]:
    """The checked header and tensors of a cube file (module docstring); refused before reading when the
    tensors would not fit in memory."""
    cube_file = inspect_cube_file(path)
    check_fits({"cube": cube_file.nbytes}, f"cube file {cube_file.path}",
               advice="read it on a machine with more memory, or write a smaller cube (fewer layers, --stream)")
    try:
        with safe_open(str(cube_file.path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        raise InputError(f"cube file {cube_file.path} could not be read ({reason}); {ADVICE}.") from None
    try:
        _check_values(cube_file, tensors)
    except _Invalid as error:
        raise InputError(f"cube file {cube_file.path} is not a valid cube: {error}; {ADVICE}.") from None
    return cube_file, tensors
