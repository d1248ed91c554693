"""`capture`: record every attention pattern of a model's forward pass into an `AttentionCube`.

    with capture(model) as probe:
        model(input_ids)
    cube = probe.cube(input_ids, tokenizer=tokenizer)

The probe taps the attention kernel the model is configured with (see `tap.py`), so the model
runs its usual kernel and produces exactly its usual output; forward hooks on the attention
modules check that every selected layer went through the tap.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec, spec_from_model
from llm_heatmap.models.offline import source_name
from llm_heatmap.models.sites import CROSS

from . import tap
from .cube import AttentionCube, StreamPart
from .geometry import kernel_causality
from .memory import check_cube_fits
from .reused_memory import ReusedMemory
from . import kernel_output
from . import native_softmax
from .value_norms import HeadWriters
from .stream import auto_chunk_rows


def cube_bytes(batch: int, layers: int, heads: int, queries: int, keys: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a kept pattern `"b l h q k"` of `dtype`."""
    return batch * layers * heads * queries * keys * torch.finfo(dtype).bits // 8


def estimate_cube_bytes(spec: ModelSpec, num_tokens: int, num_layers: int | None = None, num_heads: int | None = None,
                        num_queries: int | None = None, dtype: torch.dtype = torch.float32, batch_size: int = 1) -> int:
    """Bytes of the cube of a prompt of `num_tokens` (every layer, head and row unless fewer are given)."""
    layers = spec.num_layers if num_layers is None else num_layers
    heads = spec.num_heads if num_heads is None else num_heads
    queries = num_tokens if num_queries is None else min(num_queries, num_tokens)
    return cube_bytes(batch_size, layers, heads, queries, num_tokens, dtype)


def library_versions() -> dict:
    import transformers

    import llm_heatmap

    return {"torch": torch.__version__, "transformers": transformers.__version__, "llm-heatmap": llm_heatmap.__version__}


def select_indices(values, total: int, what: str) -> tuple[int, ...]:
    """Distinct `what` indices in `0..total-1` (None: all of them; one int: that one)."""
    if values is None:
        return tuple(range(total))
    chosen = tuple(int(v) for v in ([values] if isinstance(values, int) else values))
    if not chosen:
        raise InputError(f"{what}s is empty; pass at least one {what} index, or None for all {total}.")
    bad = [v for v in chosen if not 0 <= v < total]
    if bad:
        raise InputError(f"{what} {bad[0]} does not exist; this model has {what}s 0..{total - 1}.")
    repeated = sorted({v for v in chosen if chosen.count(v) > 1})
    if repeated:
        raise InputError(f"{what}s {list(chosen)} name {what} {repeated[0]} twice; pass each {what} once.")
    return chosen


@dataclass(frozen=True)
class CaptureOptions:
    """What a capture records. layers / heads: model layer and head indices to keep (default all);
    last_queries: keep only the last N query rows (only those are computed); dtype: the cube's dtype;
    keep=False keeps no cube (streaming to consumers only); chunk_rows: query rows computed at once
    (default: automatic, past `stream.CHUNK_BYTES` per layer); max_bytes: refuse a kept cube above this
    size (default: 80% of the available memory); value_norms: also record what every head writes
    (`value_norms` "l h k" and `output_norms` "l h q", see `value_norms.py`): None (the default) where the
    model's output projections are known and a kept cube or a consumer reads them (`stream.CubeConsumer`),
    True to require it, False for neither; queries_and_keys: also
    keep the post-RoPE queries ("l h q d") and keys ("l g k d") the kernel received, for query-key maps;
    compute_output: True has the probe compute each tapped layer's attention output from the pattern
    blocks it captures instead of running the model's kernel (attention computed once; equal to the kernel
    within fp32 rounding, see `kernel_output.py`); False runs the model's kernel untouched (bit-identical
    output); None (the default) computes it when the probe streams without keeping a cube (faster there:
    README, "Attention computed once") and the model is in eval mode, and leaves the kernel untouched
    otherwise."""

    layers: object = None
    heads: object = None
    last_queries: int | None = None
    dtype: torch.dtype = torch.float32
    keep: bool = True
    chunk_rows: int | None = None
    max_bytes: int | None = None
    value_norms: bool | None = None
    queries_and_keys: bool = False
    compute_output: bool | None = None


class Probe:
    """One capture session on one model; use through `capture(model, **options)`.

    After each forward pass inside the `with` block the probe holds that pass's patterns
    (`keep=True`) in one preallocated tensor `"b l h q k"`; `cube()` wraps the last pass.
    `options` (`CaptureOptions`) say what is recorded; spec: default read from the model; consumers:
    objects with `consume(part)` (and optionally `finish()`) that receive one layer's rows at a time;
    tokenizer: turns ids into token strings.
    """

    def __init__(self, model: nn.Module, options: CaptureOptions = CaptureOptions(), *, spec: ModelSpec | None = None,
                 consumers=None, tokenizer=None):
        layers, heads, last_queries, dtype = options.layers, options.heads, options.last_queries, options.dtype
        keep, value_norms, compute_output = options.keep, options.value_norms, options.compute_output
        self.model = model
        self.spec = self.declared_spec = spec or spec_from_model(model)
        if not self.spec.attention_modules:
            raise InputError("the spec has no attention_modules; build it with spec_from_model(model).")
        self.layers = select_indices(layers, self.spec.num_layers, "layer")
        self.heads = select_indices(heads, self.spec.num_heads, "head")
        if last_queries is not None and int(last_queries) < 1:
            raise InputError(f"last_queries={last_queries} must be a positive number of query rows.")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InputError(f"cube dtype {dtype} is not supported; use torch.float32, torch.float16 or torch.bfloat16.")
        if not keep and not consumers:
            raise InputError("keep=False without consumers would capture nothing; pass consumers or keep=True.")
        self.last_queries = None if last_queries is None else int(last_queries)
        self.dtype = dtype
        self.consumers = list(consumers or [])
        self._trimmed_parts = all(getattr(consumer, "takes_trimmed_parts", False) for consumer in self.consumers)
        self._entropy_terms = any(getattr(consumer, "takes_entropy_terms", False) for consumer in self.consumers)
        self._factor_owners = [consumer for consumer in self.consumers if callable(getattr(consumer, "factors", None))]
        self.keep = keep
        self.chunk_rows = options.chunk_rows
        self.max_bytes = options.max_bytes
        self.tokenizer = tokenizer
        self.kernels: dict[int, str] = {}
        self._modules = {self._module(layer): layer for layer in self.layers}
        self._head_index = torch.tensor(self.heads)
        self._stack: contextlib.ExitStack | None = None
        self._buffer: torch.Tensor | None = None
        self._pass = -1
        self._seen: set[int] = set()
        self._pending: set[nn.Module] = set()
        self._positions: torch.Tensor | None = None
        self._inputs: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self._sequence: dict[int, dict] = {}
        self.queries_and_keys = bool(options.queries_and_keys)
        if value_norms is None and not keep and not any(getattr(c, "takes_value_norms", True) for c in self.consumers):
            value_norms = False  # nothing would read them
        self._writers = self._head_writers(value_norms)
        self._side: dict[str, torch.Tensor] = {}
        self.compute_output = bool(compute_output) if compute_output is not None else \
            not keep and not model.training and not any(tap.is_computed(module) for module in self._modules)
        self._all_heads = torch.arange(self.spec.num_heads)
        self._packed: dict[nn.Module, _Packed] = {}
        self._streamed = ReusedMemory()  # a block's weights where they are not written into the kept cube
        self._scores = ReusedMemory()  # a block's scores, for every kernel call

    def _head_writers(self, value_norms: bool | None) -> dict[int, HeadWriters]:
        """What each layer's heads write, for value and output norms ({} when not recorded)."""
        if value_norms is False:
            return {}
        try:
            return {layer: HeadWriters.for_layer(self.model, self.spec, layer, self.heads) for layer in self.layers}
        except InputError:
            if value_norms:
                raise
            return {}

    def _module(self, layer: int) -> nn.Module:
        try:
            return self.model.get_submodule(self.spec.attention_modules[layer])
        except AttributeError:
            raise InputError(
                f"the spec names attention module '{self.spec.attention_modules[layer]}', which this model lacks; "
                "pass the spec read from this model (spec_from_model(model))."
            ) from None

    # ---- attach / detach -----------------------------------------------------------------
    def __enter__(self) -> "Probe":
        stack = contextlib.ExitStack()
        try:
            for module, layer in self._modules.items():
                key = tap.kernel_key(module, self.model)
                tap.check_tappable(module, key)
                self.kernels[layer] = key
                tap.acquire(key)
                stack.callback(tap.release, key)
                if self.compute_output:
                    tap.compute_instead(module, self._compute_kernel)
                    stack.callback(tap.stop_computing, module, self._compute_kernel)
                else:
                    tap.listen(module, self._on_kernel)
                    stack.callback(tap.unlisten, module, self._on_kernel)
                stack.callback(module.register_forward_pre_hook(self._before_layer).remove)
                stack.callback(module.register_forward_hook(self._after_layer).remove)
                if "cu_seqlens" in inspect.signature(module.forward).parameters:
                    stack.callback(module.register_forward_pre_hook(self._before_packed, with_kwargs=True).remove)
                    stack.callback(module.register_forward_hook(self._after_packed).remove)
            stack.callback(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True).remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        stack, self._stack = self._stack, None
        self._pending.clear()
        self._streamed, self._scores = ReusedMemory(), ReusedMemory()  # their memory is freed with the with block
        if stack is not None:
            stack.close()
        if exc_type is None:
            for consumer in self.consumers:
                getattr(consumer, "finish", lambda: None)()

    # ---- hooks ---------------------------------------------------------------------------
    def _before_model(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        ids = ids if isinstance(ids, torch.Tensor) else None
        self._inputs = (ids, mask if isinstance(mask, torch.Tensor) else None)
        self._new_pass()
        if ids is not None:
            shape = (1, ids.shape[0]) if ids.ndim == 1 else ids.shape[:2]
        elif isinstance(embeds, torch.Tensor):
            shape = (1, embeds.shape[0]) if embeds.ndim == 2 else embeds.shape[:2]
        else:
            return
        if self.keep:
            self._check_fits(shape[0], shape[1], shape[1])

    def _check_fits(self, batch: int, queries: int, keys: int) -> None:
        rows = queries if self.last_queries is None else min(self.last_queries, queries)
        size = cube_bytes(batch, len(self.layers), len(self.heads), rows, keys, self.dtype)
        if self.queries_and_keys:  # "b l h q d" queries and "b l g k d" keys, in float32
            size += batch * len(self.layers) * (len(self.heads) * rows + self.spec.num_kv_heads * keys) * self.spec.head_dim * 4
        check_cube_fits(size, keys, self.max_bytes)

    def _before_layer(self, module, args):
        self._pending.add(module)

    def _after_layer(self, module, args, output):
        if module in self._pending:
            self._pending.discard(module)
            raise InputError(
                f"layer {self._modules[module]} ({type(module).__name__}) ran without calling the attention kernel "
                f"registry, so its pattern cannot be tapped; load the model with attn_implementation='sdpa' or 'eager' "
                "and leave options that bypass it (such as GPT-2's reorder_and_upcast_attn) off."
            )

    def _new_pass(self) -> None:
        self._pass += 1
        self._side = {}
        self._seen.clear()
        self._buffer = None
        self._positions = None
        self._sequence = {}

    def _read_causality(self, module, kernel: str, mask, arguments: dict, call) -> None:
        """The pass's spec says what its first kernel call applies (causal, bidirectional blocks), not what
        the module's attributes claim: CLIP's text tower is `is_causal=False` but calls the kernel causally."""
        is_causal = arguments.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        causal, blocks = kernel_causality(kernel, mask if isinstance(mask, torch.Tensor) else None, is_causal,
                                          call.num_queries, call.num_keys, self.declared_spec.causal)
        self.spec = replace(self.declared_spec, causal=causal, bidirectional_blocks=blocks)

    def _compute_kernel(self, module, kernel, query, key, value, mask, arguments):
        """The computed mode: capture the pattern and return the kernel's output `(output "b q h d", None)`."""
        kernel_output.check_computable(module, arguments)
        output = kernel_output.empty_output(query)
        self._on_kernel(module, kernel, query, key, value, mask, arguments, None, computed=output)
        return output, None

    def _on_kernel(self, module, kernel, query, key, value, mask, arguments, output, computed=None) -> None:
        layer = self._modules[module]
        self._pending.discard(module)
        if module in self._packed:
            return self._on_packed_segment(module, kernel, query, key, value, mask, arguments, output, computed)
        with torch.no_grad():
            call = self._begin_call(module, layer, kernel, query, key, mask, arguments, first_of_layer=True)
            batch, queries, keys = call.batch_size, call.num_queries, call.num_keys
            if self.consumers and batch != 1:
                raise InputError(
                    f"streaming to consumers needs one sequence per forward pass, got a batch of {batch}; "
                    "run the prompts one at a time or use keep=True without consumers."
                )
            first_row = 0 if self.last_queries is None else max(0, queries - self.last_queries)
            # a cross-attention site's rows are target positions, not the last positions of the keys
            positions = torch.arange(first_row, queries) + (0 if self.spec.site == CROSS else keys - queries)
            side = self._side_tensors(layer, call, value, output, first_row)
            if self.keep:
                buffer = self._ensure_buffer(batch, positions, keys)
            heads = self._head_index if computed is None else self._all_heads
            step = auto_chunk_rows(batch, len(heads), keys, queries - first_row, self.chunk_rows)
            slot = self.layers.index(layer)
            # the computed mode also needs the rows before first_row (for the output only)
            blocks = [(start, min(first_row, start + step), False) for start in range(0, first_row, step)] \
                if computed is not None else []
            blocks += [(start, min(queries, start + step), True) for start in range(first_row, queries, step)]
            norms = self._entropy_weights(side, heads) if self._entropy_terms else None
            for start, stop, delivered in blocks:
                rows = buffer[:, slot, :, start - first_row : stop - first_row] if self.keep and delivered else None
                # the softmax goes straight into the cube's rows where both are on one device and hold every head,
                # else over the block's scores (the native softmax) or into memory every block reuses (torch's)
                direct = rows is not None and len(heads) == len(self.heads) and rows.device == query.device
                into = rows if direct else self._streamed.view(
                    (batch, len(heads), stop - start, call.block_keys(stop)), torch.float32, query.device)
                request = self._factors(call, layer, heads, start, stop, first_row, positions, keys, side, rows, into) \
                    if delivered else None
                block = call.pattern(heads, start, stop, pad=False, out=into, in_place=not direct,
                                     value_norms=norms if delivered else None,
                                     factors=native_softmax.Factors() if request is None else request.factors())
                terms = call.entropy_terms(block) if self._entropy_terms and delivered else None
                if computed is not None:
                    kernel_output.write_block(computed, block, value.detach(), start, stop)
                    if not delivered:
                        continue
                    if len(self.heads) != len(heads):
                        block = block.index_select(1, self._head_index.to(block.device))
                        terms = None if terms is None else terms.select(1, self._head_index.to(block.device))
                    if layer in self._writers:
                        self._block_output_norms(layer, side, computed, start - first_row, start, stop, len(positions))
                width = block.shape[-1]
                if self.keep:
                    if block.data_ptr() != rows.data_ptr():  # the path that adds sinks does not write into `out`
                        rows[..., :width] = block
                    rows[..., width:] = 0
                if self.consumers:
                    if self.keep:
                        pattern = rows
                    elif self._trimmed_parts:
                        pattern = block.to(self.dtype)
                    else:
                        pattern = torch.nn.functional.pad(block, (0, keys - width)).to(self.dtype)
                    stream = StreamPart(pass_index=self._pass, row_start=start - first_row, row_stop=stop - first_row,
                                        num_queries=len(positions), key_stop=width,
                                        entropy_terms=terms if pattern.dtype == torch.float32 else None,
                                        products=None if request is None else request.split(call.products()))
                    part = self._part(layer, pattern, positions[start - first_row : stop - first_row], stream, keys,
                                      _part_side(side, start - first_row, stop - first_row))
                    for consumer in self.consumers:
                        consumer.consume(part)
                del block
            if self.keep:
                self._keep_side(batch, layer, side)

    def _factors(self, call, layer: int, heads, start: int, stop: int, first_row: int, positions, keys: int,
                 side: dict, rows, into) -> "_FactorRequest | None":
        """What the consumers that have `factors` (`stream.CubeConsumer`) ask the native softmax to multiply a block
        by in its pass, where it runs and the part will be its output as it is (float32, every head, one sequence;
        the rows of the kept cube or, streaming, the block trimmed to its keys)."""
        owners = self._factor_owners
        usable = owners and call.batch_size == 1 and len(heads) == len(self.heads) and self.dtype == torch.float32 \
            and call.query.device.type == "cpu" and (into is rows if self.keep else self._trimmed_parts)
        if not usable or not native_softmax.available():
            return None
        row_start, row_stop = start - first_row, stop - first_row
        stream = StreamPart(pass_index=self._pass, row_start=row_start, row_stop=row_stop, num_queries=len(positions),
                            key_stop=call.block_keys(stop))
        part = self._part(layer, rows if self.keep else into, positions[row_start:row_stop], stream, keys,
                          _part_side(side, row_start, row_stop))
        asked = {consumer: consumer.factors(part) for consumer in owners}
        asked = {consumer: factors for consumer, factors in asked.items() if factors is not None and any(factors)}
        return _FactorRequest(asked) if asked else None

    def _entropy_weights(self, side: dict, heads: torch.Tensor) -> torch.Tensor | None:
        """The value norms of a block's heads (`"h k"`; 0 for heads not captured), which weight the second column of
        its entropy terms, or None where none are recorded."""
        norms = side.get("value_norms")
        if norms is None or norms.shape[0] != 1:
            return None
        if len(heads) == len(self.heads):
            return norms[0]
        return norms.new_zeros(len(heads), norms.shape[-1]).index_copy_(0, self._head_index.to(norms.device), norms[0])

    def _begin_call(self, module, layer: int, kernel, query, key, mask, arguments, *,
                    first_of_layer: bool) -> tap.KernelCall:
        """A kernel call's arguments, once its layer is counted: the layer's first call of a forward pass starts a
        new pass where the layer was already seen, and the pass's first call reads the kernel's causality."""
        if first_of_layer:
            self._check_called_once(module, layer)
            if layer in self._seen or self._pass < 0:
                self._new_pass()
        first_call = not self._seen
        self._seen.add(layer)
        call = tap.KernelCall.from_arguments(module, kernel, query, key, mask, arguments, self._scores)
        if first_call:
            self._read_causality(module, kernel, mask, arguments, call)
        return call

    def _check_called_once(self, module, layer: int) -> None:
        if layer in self._seen and self._seen != set(self.layers):
            raise InputError(
                f"layer {layer} ({type(module).__name__}) called the attention kernel more than once in one forward "
                "pass without naming its segments (cu_seqlens), and a cube holds one pattern per layer; pass one "
                "image at a time, or capture the other sites only (capture_sites(model, sites=...))."
            )

    # ---- packed layers: one kernel call per image or window of one packed sequence --------------
    def _before_packed(self, module, args, kwargs) -> None:
        """A module given `cu_seqlens` attends within segments of one packed sequence (Qwen2-VL's tower: one
        segment per image; Qwen2.5-VL's windowed layers: one per window), one kernel call per segment unless
        the kernel is a flash kernel taking them all at once."""
        bounds = kwargs.get("cu_seqlens")
        if isinstance(bounds, torch.Tensor) and bounds.numel() > 2:
            self._packed[module] = _Packed(tuple(int(b) for b in bounds.tolist()))
        else:
            self._packed.pop(module, None)

    def _after_packed(self, module, args, output) -> None:
        packed = self._packed.pop(module, None)
        if packed is not None and packed.done != len(packed.bounds) - 1:
            raise InputError(
                f"layer {self._modules[module]} ({type(module).__name__}) called the attention kernel for {packed.done} "
                f"of the {len(packed.bounds) - 1} segments its cu_seqlens name; load the model with "
                "attn_implementation='sdpa' or 'eager'."
            )

    def _on_packed_segment(self, module, kernel, query, key, value, mask, arguments, output, computed) -> None:
        """One segment's kernel call: its pattern is the block at the segment's rows and keys of the layer's
        pattern over the whole packed sequence, which is zero between segments (block-diagonal)."""
        packed, layer = self._packed[module], self._modules[module]
        start, stop = packed.bounds[packed.done], packed.bounds[packed.done + 1]
        who = f"layer {layer} ({type(module).__name__})"
        if self.consumers or self.last_queries is not None:
            raise InputError(
                f"{who} attends per image or per window of one packed sequence, which streaming consumers and "
                "last_queries do not follow; capture the whole cube (keep=True, no consumers or last_queries) or "
                "pass one image at a time."
            )
        if query.shape[2] != stop - start or key.shape[2] != stop - start:
            raise InputError(
                f"{who} ran one attention call over {query.shape[2]} positions for the segments {list(packed.bounds)} "
                f"of its packed sequence (kernel '{kernel}'), which llm-heatmap cannot split; load the model with "
                "attn_implementation='sdpa' or 'eager'."
            )
        self._pending.discard(module)
        with torch.no_grad():
            call = self._begin_call(module, layer, kernel, query, key, mask, arguments, first_of_layer=packed.done == 0)
            if packed.done == 0:
                segments = list(self.spec.segments) or [()] * self.spec.num_layers
                segments[layer] = packed.bounds
                self.spec = replace(self.spec, segments=tuple(segments))
            total, batch, size = packed.bounds[-1], call.batch_size, stop - start
            rows = self._ensure_buffer(batch, torch.arange(total), total)[:, self.layers.index(layer), :, start:stop]
            rows.zero_()
            heads = self._head_index if computed is None else self._all_heads
            step = auto_chunk_rows(batch, len(heads), size, size, self.chunk_rows)
            for first in range(0, size, step):
                last = min(size, first + step)
                into = rows[:, :, first:last, start:stop]
                direct = len(heads) == len(self.heads) and into.device == query.device
                block = call.pattern(heads, first, last, pad=False, out=into if direct else None)
                if computed is not None:
                    kernel_output.write_block(computed, block, value.detach(), first, last)
                    if len(heads) != len(self.heads):
                        block = block.index_select(1, self._head_index.to(block.device))
                if block.data_ptr() != into.data_ptr():
                    into.copy_(block)
            side = self._side_tensors(layer, call, value, output, 0)
            if computed is not None and layer in self._writers:
                side["output_norms"] = self._writers[layer].output_norms(computed, self._head_index)
            packed.sides.append(side)
            packed.done += 1
            if packed.done == len(packed.bounds) - 1:  # every side tensor has its positions on axis 2
                self._keep_side(batch, layer, {name: torch.cat([s[name] for s in packed.sides], 2) for name in side})

    def _block_output_norms(self, layer: int, side: dict, computed: torch.Tensor, row: int, start: int, stop: int,
                            rows: int) -> None:
        """In the computed mode, the output norms of rows start:stop as soon as their output exists."""
        norms = self._writers[layer].output_norms(computed[:, start:stop], self._head_index)  # "b h q"
        if "output_norms" not in side:
            side["output_norms"] = norms.new_empty(*norms.shape[:2], rows)
        side["output_norms"][..., row : row + stop - start] = norms

    def _side_tensors(self, layer: int, call, value, output, first_row: int) -> dict[str, torch.Tensor]:
        """This layer's side tensors (cube.SIDE_TENSORS), batch first, kept query rows only."""
        side = {}
        writers = self._writers.get(layer)
        if writers is not None:
            side["value_norms"] = writers.value_norms(value.detach())  # "b h k"
        if writers is not None and output is not None:  # the computed mode fills output norms block by block
            heads_out = _head_outputs(output, call.num_queries, self.spec.num_heads)
            side["output_norms"] = writers.output_norms(heads_out, self._head_index)[..., first_row:]  # "b h q"
        if self.queries_and_keys:
            side["queries"] = call.query.index_select(1, self._head_index.to(call.query.device))[:, :, first_row:].float()
            side["keys"] = call.key.float()  # "b g k d"
        return side

    def _keep_side(self, batch: int, layer: int, side: dict[str, torch.Tensor]) -> None:
        """Copy one layer's side tensors into the pass's `"b l ..."` buffers."""
        slot = self.layers.index(layer)
        for name, tensor in side.items():
            if name not in self._side:
                self._side[name] = torch.zeros((batch, len(self.layers), *tensor.shape[1:]), dtype=torch.float32)
            self._side[name][:, slot] = tensor.cpu()

    def _ensure_buffer(self, batch: int, positions: torch.Tensor, keys: int) -> torch.Tensor:
        shape = (batch, len(self.layers), len(self.heads), len(positions), keys)
        if self._buffer is None:
            self._check_fits(batch, len(positions), keys)
            self._buffer = torch.empty(shape, dtype=self.dtype)
            self._positions = positions
        elif tuple(self._buffer.shape) != shape:
            raise InputError(
                f"attention of one forward pass changed shape between layers ({tuple(self._buffer.shape)} vs {shape}); "
                "capture without a KV cache (use_cache=False)."
            )
        return self._buffer

    # ---- results -------------------------------------------------------------------------
    def _part(self, layer: int, pattern: torch.Tensor, positions: torch.Tensor, stream: StreamPart,
              keys: int, side: dict[str, torch.Tensor]) -> AttentionCube:
        """One layer's block of rows, on the device it was computed on; the sequence fields are built
        once per pass and key count (a decode step's sliding-window layers see fewer keys than its others)."""
        if keys not in self._sequence:
            ids, mask = self._inputs
            if ids is not None and ids.ndim == 2 and ids.shape[-1] == keys:
                token_ids = ids[0].detach().cpu()
            else:
                token_ids = torch.zeros(0, dtype=torch.long)
            key_mask = mask[0].detach().cpu().bool() if mask is not None and mask.ndim == 2 and mask.shape[-1] == keys \
                else torch.ones(keys, dtype=torch.bool)
            self._sequence[keys] = {"tokens": token_strings(token_ids, self.tokenizer), "token_ids": token_ids,
                                    "key_mask": key_mask, "metadata": self._metadata()}
        sequence = self._sequence[keys]
        return AttentionCube(
            pattern=pattern,
            spec=self.spec,
            tokens=sequence["tokens"],
            token_ids=sequence["token_ids"],
            layers=(layer,),
            heads=self.heads,
            query_positions=positions,
            key_mask=sequence["key_mask"],
            query_mask=sequence["key_mask"][positions] if self.spec.site != CROSS else torch.ones(len(positions), dtype=torch.bool),
            metadata=dict(sequence["metadata"]),
            stream=stream,
            **side,
        )

    def _metadata(self) -> dict:
        kernels = sorted(set(self.kernels.values()))
        return {
            "versions": library_versions(),
            "kernel": kernels[0] if len(kernels) == 1 else kernels,
            "model_dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "cube_dtype": str(self.dtype).removeprefix("torch."),
            "last_queries": self.last_queries,
        }

    def cube(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, tokenizer=None,
             prompt=None, source: str | None = None) -> AttentionCube:
        """The cube of the last forward pass (`"l h q k"` for one sequence, `"b l h q k"` for a batch)."""
        if not self.keep:
            raise InputError("this probe streamed to consumers with keep=False, so it holds no cube; use keep=True.")
        if self._buffer is None:
            raise InputError("no forward pass was captured; call the model inside the `with capture(model)` block first.")
        missing = [layer for layer in self.layers if layer not in self._seen]
        if missing:
            raise InputError(f"layers {missing} did not run in the last forward pass; run a full forward pass inside the block.")
        ids = self._inputs[0] if input_ids is None else torch.as_tensor(input_ids)
        if attention_mask is None and input_ids is None:
            attention_mask = self._inputs[1]
        if ids is None:
            raise InputError("probe.cube() needs the input_ids of the forward pass (the model was called with inputs_embeds).")
        ids = ids.detach().cpu()
        ids = ids[None] if ids.ndim == 1 else ids
        batch, _, _, _, keys = self._buffer.shape
        if tuple(ids.shape) != (batch, keys):
            raise InputError(
                f"input_ids of shape {tuple(ids.shape)} do not match the captured pass ({batch} sequences of {keys} keys); "
                "pass the input_ids the model was called with."
            )
        if attention_mask is None:
            key_mask = torch.ones(batch, keys, dtype=torch.bool)
        else:
            key_mask = torch.as_tensor(attention_mask).detach().cpu().bool().reshape(batch, -1)[:, -keys:]
        tokenizer = tokenizer or self.tokenizer
        tokens = [token_strings(row, tokenizer) for row in ids]
        query_mask = key_mask[:, self._positions] if self.spec.site != CROSS else \
            torch.ones(batch, len(self._positions), dtype=torch.bool)
        source = source or source_name(self.model)
        cube = AttentionCube(
            pattern=self._buffer,
            spec=self.spec,
            tokens=tokens,
            token_ids=ids,
            layers=self.layers,
            heads=self.heads,
            query_positions=self._positions,
            key_mask=key_mask,
            query_mask=query_mask,
            prompt=prompt,
            source=source,
            metadata=self._metadata(),
            **self._side,
        )
        if batch > 1:
            return cube
        if bool(key_mask.all()):
            return AttentionCube(
                pattern=self._buffer[0], spec=self.spec, tokens=tokens[0], token_ids=ids[0], layers=self.layers,
                heads=self.heads, query_positions=self._positions, key_mask=key_mask[0],
                query_mask=query_mask[0], prompt=prompt[0] if isinstance(prompt, list) else prompt,
                source=source, metadata=cube.metadata, **{name: tensor[0] for name, tensor in self._side.items()},
            )
        return cube.item(0)


@dataclass
class _FactorRequest:
    """What the consumers asked one block's native softmax to multiply it by."""

    asked: dict  # consumer -> native_softmax.Factors

    def factors(self) -> native_softmax.Factors:
        """Every consumer's key columns and row weights, one consumer after another."""
        return native_softmax.Factors(key_columns=tuple(c for f in self.asked.values() for c in f.key_columns),
                                      row_weights=tuple(u for f in self.asked.values() for u in f.row_weights))

    def split(self, products: native_softmax.Products | None) -> dict | None:
        """Each consumer's `native_softmax.Products` (`"1 h q f"` key sums, `"1 h g k"` row sums), from the block's
        (None: the native softmax did not run)."""
        if products is None:
            return None
        key_sums, row_sums, given = list(products.key_sums), list(products.row_sums), {}
        for consumer, asked in self.asked.items():
            given[consumer] = native_softmax.Products(key_sums=tuple(key_sums.pop(0) for _ in asked.key_columns),
                                                      row_sums=tuple(row_sums.pop(0) for _ in asked.row_weights))
        return given


@dataclass
class _Packed:
    """A packed layer's forward in progress: its segments' bounds (`cu_seqlens`), how many have been captured,
    and their side tensors."""

    bounds: tuple[int, ...]
    done: int = 0
    sides: list = field(default_factory=list)


def _head_outputs(output, num_queries: int, num_heads: int) -> torch.Tensor:
    """The kernel's per-head output as `"b q h d"` (transformers' kernels return `(output, weights)`)."""
    heads_out = output[0] if isinstance(output, (tuple, list)) else output
    if heads_out.shape[1] == num_heads and heads_out.shape[2] == num_queries and heads_out.shape[1] != num_queries:
        heads_out = heads_out.transpose(1, 2)
    return heads_out.detach()


def _part_side(side: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """A streamed part's side tensors: the layer's (its one batch row standing for the part's one layer),
    query-row tensors cut to the part's rows."""
    return {name: tensor[:, :, start:stop] if name in ("output_norms", "queries") else tensor
            for name, tensor in side.items()}


def token_strings(ids: torch.Tensor, tokenizer) -> list[str]:
    """Token strings as the tokenizer names them (`convert_ids_to_tokens`: "Ġcat"), or the ids as text."""
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def capture(model: nn.Module, *, spec: ModelSpec | None = None, consumers=None, tokenizer=None, **options) -> Probe:
    """A context manager that records the attention patterns of every forward pass run inside it:
    `with capture(model, layers=[0, 1]) as probe: model(ids)`. `options` are `CaptureOptions`' fields;
    the rest are `Probe`'s."""
    return Probe(model, CaptureOptions(**options), spec=spec, consumers=consumers, tokenizer=tokenizer)


def encode_prompt(tokenizer, prompt, *, chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a prompt (a string, a list of strings, or chat messages)."""
    if tokenizer is None:
        raise InputError("a tokenizer is needed to encode a prompt; pass the tokenizer load_model returned.")
    if not prompt:
        raise InputError("the prompt is empty; pass some text.")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("this tokenizer has no chat template, so the prompt cannot be sent as a chat (chat=True); "
                             "send it as plain text.")
        messages = prompt if isinstance(prompt, list) and isinstance(prompt[0], dict) else [{"role": "user", "content": prompt}]
        if not isinstance(messages[0].get("content"), str):
            raise InputError("chat=True takes one prompt string or a list of {'role', 'content'} messages.")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    elif isinstance(prompt, (list, tuple)):
        if tokenizer.pad_token is None:
            raise InputError("the tokenizer has no pad token, so a list of prompts cannot be batched; capture them one by one.")
        encoded = tokenizer(list(prompt), padding=True, return_tensors="pt")
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    ids = encoded["input_ids"]
    mask = encoded.get("attention_mask")
    return ids, (torch.ones_like(ids) if mask is None else mask)


def forward_kwargs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Arguments for a capture forward: no KV cache, only the last logits row, positions that skip padding."""
    device = next(model.parameters()).device
    kwargs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    accepted = inspect.signature(model.forward).parameters
    if "use_cache" in accepted:
        kwargs["use_cache"] = False
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = 1
    if "position_ids" in accepted and not bool(attention_mask.bool().all()):
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).to(device)
    config = getattr(model, "config", None)
    start = getattr(config, "decoder_start_token_id", None)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in accepted and start is not None:
        # the tokens reach an encoder-decoder's encoder, whose attention does not depend on the decoder's input: one
        # start token per row keeps the decoder's work small, and lets a family without a default (T5) run
        kwargs["decoder_input_ids"] = torch.full((input_ids.shape[0], 1), start, device=device)
    return kwargs


def capture_prompt(model: nn.Module, tokenizer, prompt, *, spec: ModelSpec | None = None, chat: bool = False,
                   consumers=None, keep: bool = True, source: str | None = None, **capture_options) -> AttentionCube | None:
    """Tokenize `prompt`, run one forward pass under `capture`, and return its cube (None when keep=False)."""
    input_ids, attention_mask = encode_prompt(tokenizer, prompt, chat=chat)
    probe = capture(model, spec=spec, consumers=consumers, keep=keep, tokenizer=tokenizer, **capture_options)
    with torch.no_grad(), probe:
        model(**forward_kwargs(model, input_ids, attention_mask))
    if not keep:
        return None
    return probe.cube(input_ids, attention_mask, tokenizer=tokenizer, prompt=prompt, source=source)
