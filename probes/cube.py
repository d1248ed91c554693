"""`AttentionCube`: every captured attention pattern as one `[layer, head, query, key]` tensor."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import einops
import torch
from safetensors.torch import save_file

from llm_heatmap.errors import InputError
from llm_heatmap.models.files import atomic_output
from llm_heatmap.models import ModelSpec

from . import geometry
from .axes import Axis, text_axis
from .cube_schema import FORMAT, FORMAT_VERSION, SIDE_TENSORS, read_cube_file
from .entropy_terms import EntropyTerms



@dataclass(frozen=True)
class Pooling:
    """How the axes of an area-pooled cube (`stream.downsample`, `Downsampler`) map onto the prompt.

    Query bin b stands for the original query rows `query_edges[b]:query_edges[b + 1]`, at positions
    `query_first[b]..query_last[b]`; key bin b for the key positions `key_edges[b]:key_edges[b + 1]`.
    Bins are cut by `geometry.bin_edges`.
    """

    query_edges: tuple[int, ...]
    key_edges: tuple[int, ...]
    query_first: tuple[int, ...]
    query_last: tuple[int, ...]

    @property
    def num_queries(self) -> int:
        return self.query_edges[-1]

    @property
    def num_keys(self) -> int:
        return self.key_edges[-1]

    def query_spans(self) -> geometry.Spans:
        return geometry.Spans(torch.tensor(self.query_first), torch.tensor(self.query_last))

    def key_spans(self) -> geometry.Spans:
        return geometry.Spans.from_edges(self.key_edges)

    def row_counts(self) -> torch.Tensor:
        """How many original query rows each pooled row stands for."""
        return torch.tensor(self.query_edges).diff()

    @classmethod
    def from_dict(cls, data: dict) -> "Pooling":
        return cls(**{f.name: tuple(int(x) for x in data[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class StreamPart:
    """Where a streamed part sits: query rows `row_start:row_stop` of the `num_queries` rows of one
    layer of forward pass `pass_index` (see `stream.py`).

    `key_stop`: every key from this one on has weight 0 in every row of the part (the capture did not
    compute them); a part sent to a consumer that takes trimmed parts holds only the keys before it.
    """

    pass_index: int
    row_start: int
    row_stop: int
    num_queries: int
    key_stop: int | None = None
    # p ln p of the part's pattern in two factors (`entropy_terms.py`), from the capture's scores, for the consumers
    # that take them (`takes_entropy_terms`); valid while the part is consumed (the capture reuses the memory)
    entropy_terms: EntropyTerms | None = field(default=None, repr=False, compare=False)
    # by consumer, the part's weights times what it asked for (`stream.CubeConsumer`); valid during `consume`
    products: dict | None = field(default=None, repr=False, compare=False)

    def header(self) -> dict:
        """Where the part sits, as saved with it (its entropy terms and products are not saved)."""
        return {name: getattr(self, name) for name in ("pass_index", "row_start", "row_stop", "num_queries", "key_stop")}


@dataclass
class AttentionCube:
    """Attention patterns of one forward pass.

    `pattern` is `"l h q k"` (or `"b l h q k"` for a batch). Axis `l` holds the model layers
    listed in `layers`, axis `h` the query heads in `heads`, axis `q` the query rows at
    `query_positions` (all positions unless only the last rows were kept), axis `k` every key
    position. `key_mask`/`query_mask` mark real (non-padding) positions, `generated` marks
    tokens produced by `generate()`. `pooling` is set when the axes are area-pooled bins (then
    each entry of `q` / `k` is a bin; tokens and ids are those of each key bin's first position,
    query positions those of each query bin's middle row); `stream` when the cube is one streamed
    block of rows. `weighting` says what `pattern` holds: attention weights, or "norms", the
    norm-weighted pattern `||alpha_ij v_j W_O^h||` (`norm_weighted()`); `difference` that it is the
    difference of two such patterns (`analyses.compare.difference_cube`, B - A: weights then lie in
    [-1, 1]). The optional `SIDE_TENSORS` travel with the pattern through `select`, `item` and
    files. A file is checked against one schema when it is loaded (`cube_schema.py`).

    `key_axis` (`axes.Axis`, None where unknown) says what the key positions are: text tokens, image
    patches with their image, tile, row and column, special tokens, audio frames; `query_axis` the rows.

    A cube of one attention site of a multi-site model (`spec.site`: encoder, decoder, cross, vision,
    text) is built the same way. A cross-attention cube is rectangular: its queries are another
    sequence than its keys (target tokens over source tokens), named by `query_tokens`, and
    `query_positions` count along that sequence; `query_tokens` is None where rows are key positions.
    """

    pattern: torch.Tensor
    spec: ModelSpec
    tokens: list
    token_ids: torch.Tensor
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    query_positions: torch.Tensor
    key_mask: torch.Tensor
    query_mask: torch.Tensor
    generated: torch.Tensor | None = None
    prompt: str | list | None = None
    source: str | None = None
    metadata: dict = field(default_factory=dict)
    pooling: Pooling | None = None
    stream: StreamPart | None = None
    weighting: str = "weights"
    difference: bool = False
    value_norms: torch.Tensor | None = None
    output_norms: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    query_tokens: list | None = None
    key_axis: Axis | None = None

    @property
    def query_axis(self) -> Axis | None:
        """What the query rows are: the key axis, except a cross-attention cube's rows (target text)."""
        if self.query_tokens is not None:
            return text_axis(len(self.query_tokens))
        return self.key_axis

    def __repr__(self) -> str:
        """One line: shape, dtype, what it holds, the model and the start of the prompt (never the tensors)."""
        shape = " x ".join(map(str, self.pattern.shape))
        axes = ("b " if self.batched else "") + "l h q k"
        holds = ["difference B - A" if self.difference else self.weighting, *self.side_tensors()]
        if self.pooling is not None:
            holds.append("pooled")
        prompt = self.prompt if isinstance(self.prompt, str) else None
        text = "" if prompt is None else " " + repr(prompt if len(prompt) <= 40 else prompt[:39] + "…")
        return (f"AttentionCube({shape} ({axes}), {str(self.pattern.dtype).removeprefix('torch.')}, "
                f"{', '.join(holds)}, {self.source or self.spec.model_type}{',' if text else ''}{text})")

    @classmethod
    def from_pattern(cls, pattern: torch.Tensor, spec: ModelSpec, token_ids: torch.Tensor, tokens=None,
                     **fields) -> "AttentionCube":
        """A one-sequence cube of every layer, head and row from a `"l h q k"` pattern, e.g.
        `torch.stack(output.attentions, 1)[0]` of an eager `output_attentions=True` forward.
        `tokens` default to the ids as text; `fields` (prompt, source, metadata, ...) pass through."""
        layers, heads, rows, keys = pattern.shape
        token_ids = torch.as_tensor(token_ids).reshape(-1)
        return cls(pattern=pattern, spec=spec, tokens=list(tokens) if tokens is not None else [str(int(i)) for i in token_ids],
                   token_ids=token_ids, layers=tuple(range(layers)), heads=tuple(range(heads)),
                   query_positions=torch.arange(keys - rows, keys), key_mask=torch.ones(keys, dtype=torch.bool),
                   query_mask=torch.ones(rows, dtype=torch.bool), **fields)

    # ---- shape ------------------------------------------------------------------------
    def _repr_html_(self) -> str:
        """The notebook display (a summary beside an all-heads thumbnail); the drawing is imported only now."""
        from llm_heatmap.notebook import cube_html

        return cube_html(self)

    @property
    def batched(self) -> bool:
        return self.pattern.ndim == 5

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def num_queries(self) -> int:
        return self.pattern.shape[-2]

    @property
    def num_keys(self) -> int:
        """Entries of the key axis (a trimmed streamed part holds only the first `stream.key_stop` of them)."""
        return self.key_mask.shape[-1]

    @property
    def num_tokens(self) -> int:
        """Tokens of the prompt: the key count, or before area-pooling for a pooled cube."""
        return self.pooling.num_keys if self.pooling else self.num_keys

    @property
    def first_key(self) -> int:
        """Index on the key axis of the first real key (the attention-sink column of most decoders)."""
        real = self.one_sequence().key_mask.bool().nonzero()
        return int(real[0]) if len(real) else 0

    @property
    def kv_groups(self) -> torch.Tensor:
        """KV group of each head on axis `h`."""
        return torch.tensor([self.spec.kv_group(h) for h in self.heads])

    def __len__(self) -> int:
        return self.pattern.shape[0] if self.batched else 1

    # ---- views ------------------------------------------------------------------------
    def query_labels(self) -> list:
        """The token of each query row: its own token for a cross-attention cube, else the key token at
        its position."""
        if self.query_tokens is not None:
            return list(self.query_tokens)
        tokens = self.one_sequence().tokens
        return [tokens[int(p)] for p in self.query_positions]

    def query_spans(self) -> geometry.Spans:
        """First and last prompt position of each entry of the query axis."""
        return self.pooling.query_spans() if self.pooling else geometry.Spans.points(self.query_positions)

    def key_spans(self) -> geometry.Spans:
        return self.pooling.key_spans() if self.pooling else geometry.Spans.points(torch.arange(self.num_keys))

    def attendable(self) -> torch.Tensor:
        """bool `"l q k"`: the cells that may carry attention (`geometry.attendable`): real rows and
        keys, causal, inside each layer's sliding window; for a pooled cube, per bin."""
        cube = self.one_sequence()
        return geometry.attendable(cube.spec, cube.layers, cube.query_spans(), cube.key_spans(), cube.key_mask,
                                   cube.query_mask)

    def by_kv_group(self) -> torch.Tensor:
        """`"l (g r) q k -> l g r q k"`: heads grouped by the KV head they share."""
        if tuple(self.heads) != tuple(range(self.spec.num_heads)):
            raise ValueError("by_kv_group() needs every head of the layer; this cube holds a head subset.")
        return einops.rearrange(self.pattern, "... l (g r) q k -> ... l g r q k", r=self.spec.group_size)

    def canvas(self) -> torch.Tensor:
        """`"l h q k -> (l q) (h k)"`: the whole grid as one 2-D image."""
        if self.batched:
            raise ValueError("canvas() needs one sequence; take cube.item(i) first.")
        return einops.rearrange(self.pattern, "l h q k -> (l q) (h k)")

    def side_tensors(self) -> dict[str, torch.Tensor]:
        """The `SIDE_TENSORS` this cube holds."""
        return {name: getattr(self, name) for name in SIDE_TENSORS if getattr(self, name) is not None}

    def _take(self, axis: str, index: torch.Tensor | slice, tensors: dict | None = None) -> dict[str, torch.Tensor]:
        """The pattern and every side tensor with axis `axis` (a letter of `"l h q k"`) cut to `index`
        (positions, or a slice, which gives views)."""
        tensors = {"pattern": self.pattern, **self.side_tensors()} if tensors is None else tensors
        taken = {}
        for name, tensor in tensors.items():
            letters = ("l h q k" if name == "pattern" else SIDE_TENSORS[name]).split()
            if axis in letters:
                dim = tensor.ndim - len(letters) + letters.index(axis)
                if isinstance(index, slice):
                    tensor = tensor.narrow(dim, index.start, index.stop - index.start)
                else:
                    tensor = tensor.index_select(dim, index.to(tensor.device))
            taken[name] = tensor
        return taken

    def select(self, layers=None, heads=None) -> "AttentionCube":
        """A cube holding only the given model layers and heads (in the order given)."""
        tensors = None
        new_layers, new_heads = self.layers, self.heads
        if layers is not None:
            index = [self._index(self.layers, layer, "layer") for layer in layers]
            tensors = self._take("l", torch.tensor(index))
            new_layers = tuple(layers)
        if heads is not None:
            index = [self._index(self.heads, head, "head") for head in heads]
            tensors = self._take("h", torch.tensor(index), tensors)
            new_heads = tuple(heads)
        return replace(self, **(tensors or {}), layers=tuple(new_layers), heads=tuple(new_heads))

    def norm_weighted(self) -> "AttentionCube":
        """This cube with `pattern` = `alpha_ij ||v_j W_O^h||`, the norm of what each key's value adds to
        each row's output through each head (Kobayashi et al. 2020), `weighting` "norms"."""
        if self.weighting == "norms":
            return self
        if self.value_norms is None:
            raise InputError("this cube holds no value norms; capture with value_norms=True to draw "
                             "norm-weighted attention.")
        return replace(self, pattern=self.pattern.float() * self.value_norms.float()[..., None, :], weighting="norms")

    @staticmethod
    def _index(values, value, what) -> int:
        try:
            return list(values).index(value)
        except ValueError:
            raise InputError(f"{what} {value} is not in this cube (it holds {what}s {list(values)}).") from None

    def item(self, index: int) -> "AttentionCube":
        """Sequence `index` of a batch, with its padding rows and keys removed."""
        if not self.batched:
            if index != 0:
                raise IndexError(index)
            return self
        keys = self.key_mask[index].bool()
        rows = self.query_mask[index].bool()
        key_index = keys.nonzero().squeeze(-1)
        # positions are renumbered so the first real token is position 0
        shift = int(key_index[0]) if len(key_index) else 0
        tensors = {name: tensor[index] for name, tensor in {"pattern": self.pattern, **self.side_tensors()}.items()}
        tensors = self._take("q", rows.nonzero().squeeze(-1), tensors)
        tensors = self._take("k", key_index, tensors)
        tokens = [t for t, keep in zip(self.tokens[index], keys.tolist()) if keep]
        prompt = self.prompt[index] if isinstance(self.prompt, list) else self.prompt
        generated = None if self.generated is None else self.generated[index][key_index]
        return replace(
            self,
            **tensors,
            tokens=tokens,
            token_ids=self.token_ids[index][key_index],
            query_positions=self.query_positions[rows] - shift,
            key_mask=torch.ones(len(key_index), dtype=torch.bool),
            query_mask=torch.ones(int(rows.sum()), dtype=torch.bool),
            generated=generated,
            prompt=prompt,
            # an axis describes every position of the sequence; with padding keys removed it no longer fits
            key_axis=self.key_axis if len(key_index) == self.key_mask.shape[-1] else None,
        )

    def one_sequence(self) -> "AttentionCube":
        """This cube as one unbatched sequence: a batch of one is unwrapped, a larger batch refused."""
        if not self.batched:
            return self
        if len(self) != 1:
            raise InputError(f"this cube holds a batch of {len(self)} sequences; pass cube.item(i) for one of them.")
        return self.item(0)

    def to(self, dtype: torch.dtype) -> "AttentionCube":
        return replace(self, pattern=self.pattern.to(dtype))

    # ---- files ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file: tensors plus JSON metadata in its header."""
        path = Path(path)
        tensors = {
            "pattern": self.pattern,
            "token_ids": self.token_ids,
            "query_positions": self.query_positions,
            "key_mask": self.key_mask,
            "query_mask": self.query_mask,
        }
        if self.generated is not None:
            tensors["generated"] = self.generated
        tensors.update(self.side_tensors())
        # safetensors refuses tensors that share memory (masks are often views of one tensor); the pattern,
        # which may fill most of the memory, is never a view of another tensor here and is not copied
        tensors = {name: tensor.detach().cpu().contiguous() if name == "pattern" else tensor.detach().cpu().clone()
                   for name, tensor in tensors.items()}
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "tokens": self.tokens,
            "layers": list(self.layers),
            "heads": list(self.heads),
            "prompt": self.prompt,
            "source": self.source,
            "metadata": self.metadata,
            "weighting": self.weighting,
            "difference": self.difference,
            "pooling": None if self.pooling is None else asdict(self.pooling),
            "stream": None if self.stream is None else self.stream.header(),
        }
        if self.query_tokens is not None:
            header["query_tokens"] = self.query_tokens
        if self.key_axis is not None:
            header["key_axis"] = self.key_axis.to_dict()
        with atomic_output(path, force=True) as temp:  # complete or not at all
            save_file(tensors, str(temp), metadata={"llm_heatmap": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AttentionCube":
        """The cube of a file written by `save`, checked against the schema of `cube_schema.py` first
        (an `InputError` names the file and the first field that is wrong)."""

        cube_file, tensors = read_cube_file(path)
        header = cube_file.header
        return cls(
            pattern=tensors["pattern"],
            spec=cube_file.spec,
            tokens=header["tokens"],
            token_ids=tensors["token_ids"],
            layers=tuple(header["layers"]),
            heads=tuple(header["heads"]),
            query_positions=tensors["query_positions"],
            key_mask=tensors["key_mask"],
            query_mask=tensors["query_mask"],
            generated=tensors.get("generated"),
            prompt=header.get("prompt"),
            source=header.get("source"),
            metadata=header.get("metadata", {}),
            weighting=header.get("weighting", "weights"),
            difference=header.get("difference", False),
            **{name: tensors[name] for name in SIDE_TENSORS if name in tensors},
            pooling=None if header.get("pooling") is None else Pooling.from_dict(header["pooling"]),
            stream=None if header.get("stream") is None else StreamPart(**header["stream"]),
            query_tokens=header.get("query_tokens"),
            key_axis=cube_file.key_axis,
        )
