"""The kernel tap: wrap the attention function a model runs, through transformers' `AttentionInterface`.

While at least one probe listens, the registry entry of each tapped kernel key (`sdpa`, `eager`,
`flash_attention_2`, ...) is a wrapper that calls the original kernel with its arguments unchanged
and then hands those same arguments (query, key, value, mask, scaling, softcap, ...) and the kernel's
output to the listeners of the calling module. A module may instead have one *computer*
(`compute_instead`), which returns the kernel's output itself (the capture's computed mode,
`kernel_output.py`); the kernel is then not called. The key stays the same, so everything transformers decides by the name of the
kernel is unchanged.

Only the registry's public surface is used. A key of the class-wide map (`sdpa`, flash kernels) is
swapped with `AttentionInterface.register`, so every registry instance that does not override it
sees the wrapper; a key the shared `ALL_ATTENTION_FUNCTIONS` instance overrides, or one that no map
holds (`eager`, which models take from their own module when it is missing), is set as an item of
that instance and, on release, set back or deleted. The last listener to leave restores the
registry exactly as found.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from llm_heatmap.errors import InputError

from . import native_softmax
from .entropy_terms import EntropyTerms
from .group_matmul import group_matmul
from .reused_memory import ReusedMemory

_MISSING = object()


@dataclass
class _Tap:
    key: str
    original_global: object  # what the class-wide map held under the key, or _MISSING
    original_local: object  # what ALL_ATTENTION_FUNCTIONS itself overrode it with, or _MISSING
    wrapper: Callable
    count: int = 0


_taps: dict[str, _Tap] = {}
_listeners: dict[nn.Module, list[Callable]] = {}
_computers: dict[nn.Module, Callable] = {}
_signatures: dict[Callable, inspect.Signature] = {}


def _registry():
    """(the shared `ALL_ATTENTION_FUNCTIONS` map, the `AttentionInterface` class), imported on first use so that
    importing the probes (to read a cube file) does not import transformers."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    return ALL_ATTENTION_FUNCTIONS, AttentionInterface


def kernel_key(module: nn.Module, model: nn.Module | None = None) -> str:
    """The registry key the module's attention kernel is looked up under."""
    config = getattr(module, "config", None) or getattr(model, "config", None)
    key = getattr(config, "_attn_implementation", None)
    if key is None:
        raise InputError(
            f"attention module {type(module).__name__} has no configured attention implementation; "
            "load the model with from_pretrained/from_config so config._attn_implementation is set."
        )
    if key.startswith("paged|") and key != "paged|eager":
        key = key.removeprefix("paged|")
    return key


def eager_default(module: nn.Module) -> Callable:
    """The `eager_attention_forward` a module falls back to when "eager" is not in the registry."""
    function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if function is None:
        raise InputError(
            f"{type(module).__name__} runs eager attention without a module-level eager_attention_forward, "
            "so llm-heatmap cannot tap it; load the model with attn_implementation='sdpa'."
        )
    return function


def check_tappable(module: nn.Module, key: str) -> None:
    """Raise `InputError` before the forward when no kernel can be found for `module` under `key`."""
    tap = _taps.get(key)
    local = tap.original_local if tap else _registry()[0].get(key, _MISSING)
    if local is _MISSING and _class_wide(key) is _MISSING:
        eager_default(module)


def _original(tap: _Tap, module: nn.Module) -> Callable:
    if tap.original_local is not _MISSING:
        return tap.original_local
    if tap.original_global is not _MISSING:
        return tap.original_global
    return eager_default(module)


def _named_arguments(function: Callable, args: tuple, kwargs: dict) -> dict:
    """kwargs plus any extra positional arguments, named by the kernel's own signature."""
    if not args:
        return kwargs
    signature = _signatures.get(function)
    if signature is None:
        signature = _signatures[function] = inspect.signature(function)
    names = [p for p in signature.parameters][5:]
    return {**dict(zip(names, args)), **kwargs}


def _make_wrapper(key: str) -> Callable:
    def tapped_attention(module, query, key_states, value, attention_mask, *args, **kwargs):
        tap = _taps[key]
        kernel = _original(tap, module)
        computer = _computers.get(module)
        if computer is not None:
            arguments = _named_arguments(kernel, args, kwargs)
            output = computer(module, key, query, key_states, value, attention_mask, arguments)
        else:
            output = kernel(module, query, key_states, value, attention_mask, *args, **kwargs)
        listeners = _listeners.get(module)
        if listeners:
            arguments = _named_arguments(kernel, args, kwargs)
            for listener in list(listeners):
                listener(module, key, query, key_states, value, attention_mask, arguments, output)
        return output

    tapped_attention.__name__ = f"llm_heatmap_tapped_{key.replace('|', '_')}"
    return tapped_attention


def _class_wide(key: str):
    """The class-wide registry entry under `key`: a fresh instance has no overrides of its own."""
    return _registry()[1]().get(key, _MISSING)


def acquire(key: str) -> None:
    """Put the wrapper under `key` in the registry (refcounted)."""
    tap = _taps.get(key)
    ALL_ATTENTION_FUNCTIONS, AttentionInterface = _registry()
    if tap is None:
        original_global = _class_wide(key)
        current = ALL_ATTENTION_FUNCTIONS.get(key, _MISSING)
        tap = _Tap(key=key, original_global=original_global,
                   original_local=_MISSING if current is original_global else current, wrapper=_make_wrapper(key))
        _taps[key] = tap
        if original_global is not _MISSING:
            AttentionInterface.register(key, tap.wrapper)
        if tap.original_local is not _MISSING or original_global is _MISSING:
            ALL_ATTENTION_FUNCTIONS[key] = tap.wrapper
    tap.count += 1


def release(key: str) -> None:
    """Undo one `acquire`; the last one puts the registry back exactly as found."""
    tap = _taps[key]
    tap.count -= 1
    if tap.count > 0:
        return
    del _taps[key]
    ALL_ATTENTION_FUNCTIONS, AttentionInterface = _registry()
    if tap.original_global is not _MISSING:
        AttentionInterface.register(key, tap.original_global)
    if tap.original_local is not _MISSING:
        ALL_ATTENTION_FUNCTIONS[key] = tap.original_local
    elif tap.original_global is _MISSING:
        del ALL_ATTENTION_FUNCTIONS[key]


def listen(module: nn.Module, listener: Callable) -> None:
    _listeners.setdefault(module, []).append(listener)


def unlisten(module: nn.Module, listener: Callable) -> None:
    listeners = _listeners.get(module, [])
    if listener in listeners:
        listeners.remove(listener)
    if not listeners:
        _listeners.pop(module, None)


def compute_instead(module: nn.Module, computer: Callable) -> None:
    """Have `computer(module, kernel, query, key, value, mask, arguments)` return the kernel's output
    `(output "b q h d", None)` in place of the kernel, for this module (one computer per module)."""
    if module in _computers:
        raise InputError(
            f"{type(module).__name__} already has its attention output computed by another capture; "
            "nest captures with compute_output=False."
        )
    _computers[module] = computer


def is_computed(module: nn.Module) -> bool:
    """Whether a capture already computes this module's attention output."""
    return module in _computers


def stop_computing(module: nn.Module, computer: Callable) -> None:
    if _computers.get(module) == computer:  # bound methods are equal, not identical
        del _computers[module]


def _floor(scores: torch.Tensor) -> float:
    """The score a masked key gets: the lowest finite value, so that a row with every key masked stays finite."""
    return torch.finfo(scores.dtype).min


def _slice_mask(mask: torch.Tensor, heads: torch.Tensor, start: int, stop: int, num_keys: int) -> torch.Tensor:
    """A `"b h q k"` mask or bias (any of b, h, q may be 1 for broadcasting) cut to heads, rows and keys."""
    if mask.shape[1] > 1:
        mask = mask.index_select(1, heads.to(mask.device))
    if mask.shape[2] > 1:
        mask = mask[:, :, start:stop]
    return mask[..., :num_keys]


@dataclass
class KernelCall:
    """The arguments one attention-kernel call received, enough to recompute its pattern.

    `causal` is how the kernel applies causality when it gets no mask: "top_left" (SDPA's
    `is_causal`, row i sees keys <= i), "bottom_right" (flash kernels: row i sees keys
    <= i + keys - queries) or None. `window` is the sliding window flash kernels apply
    themselves (sdpa/eager get it inside the mask). `scores_memory`: where `pattern` computes a block's scores
    (a capture passes one for all its calls, so that a layer does not fault in fresh memory).
    """

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None
    scaling: float
    softcap: float | None = None
    position_bias: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
    causal: str | None = None
    window: int | None = None
    scores_memory: ReusedMemory = field(default_factory=ReusedMemory, repr=False, compare=False)

    @classmethod
    def from_arguments(cls, module, kernel: str, query, key, mask, arguments: dict,
                       scores_memory: ReusedMemory) -> "KernelCall":
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise InputError(
                f"attention kernel '{kernel}' got a {type(mask).__name__} mask, which llm-heatmap cannot read; "
                "load the model with attn_implementation='sdpa' or 'eager'."
            )
        scaling = arguments.get("scaling")
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        is_causal = arguments.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        causal, window = None, None
        if "flash" in kernel:
            causal = "bottom_right" if is_causal else None
            window = arguments.get("sliding_window")
        elif kernel == "sdpa" and mask is None and query.shape[2] > 1 and is_causal:
            causal = "top_left"
        return cls(
            query=query.detach(),
            key=key.detach(),
            mask=None if mask is None else mask.detach(),
            scaling=float(scaling),
            softcap=arguments.get("softcap"),
            position_bias=arguments.get("position_bias"),
            sinks=arguments.get("s_aux"),
            causal=causal,
            window=window,
            scores_memory=scores_memory,
        )

    @property
    def batch_size(self) -> int:
        return self.query.shape[0]

    @property
    def num_queries(self) -> int:
        return self.query.shape[2]

    @property
    def num_keys(self) -> int:
        return self.key.shape[2]

    def pattern(self, heads: torch.Tensor, start: int, stop: int, pad: bool = True,
                out: torch.Tensor | None = None, value_norms: torch.Tensor | None = None,
                factors: native_softmax.Factors = native_softmax.Factors(), in_place: bool = False) -> torch.Tensor:
        """fp32 attention probabilities `"b h q k"` of query rows `start:stop` for the given heads.

        softmax((q * scaling) k^T, softcapped, + position bias, + mask) with each query head
        reading its KV head (for a head subset the KV heads are indexed, `"b g k d -> b (g r) k d"`).
        With `pad=False` the keys past the last one the kernel's causal rule lets these rows see
        are left out (they are 0); the caller fills them. `out` (fp32 `"b h q k"`, with pad=False): where
        the probabilities are written, returned as its first keys. `value_norms` (`"h k"`, for `heads`): the
        second column of this block's `entropy_terms`; `factors`: what the native softmax multiplies the block
        by in its pass (`products()`). `in_place`: the native softmax writes the probabilities over the block's
        scores (`scores_memory`, which the next block reuses), and `out` is for torch's softmax only: a block then
        takes one buffer instead of two (pages of `out` that nothing writes are never faulted in).
        """
        all_heads = self._all_heads(heads)
        heads = heads.to(self.query.device)
        q = self.query[:, :, start:stop] * self.scaling
        keys = self.block_keys(stop)
        batch, rows = q.shape[0], q.shape[2]
        scores = self._scores_buffer(batch, len(heads), rows, keys)
        if all_heads:
            # the query heads of a KV group share its keys: one matmul per KV head with the group's rows
            # stacked ("b (g r) q d -> b g (r q) d"), which a small block of rows needs to keep the matmul fast
            kv = self.key[:, :, :keys]
            group_matmul(q.reshape(batch, kv.shape[1], -1, q.shape[-1]), kv.transpose(-1, -2),
                         out=scores.view(batch, kv.shape[1], -1, keys))
        else:
            torch.matmul(q.index_select(1, heads), self._keys(heads)[:, :, :keys].transpose(-1, -2), out=scores)
        if self.softcap is not None:
            scores.div_(self.softcap).tanh_().mul_(self.softcap)
        if self.position_bias is not None:
            scores.add_(_slice_mask(self.position_bias, heads, start, stop, keys))
        floor = _floor(scores)
        mask = self.mask
        if mask is not None and mask.ndim == 2:  # flash kernels get the 2-D padding mask
            scores.masked_fill_(~mask[:, None, None, :keys].bool(), floor)
        elif mask is not None and mask.dtype == torch.bool:
            scores.masked_fill_(~_slice_mask(mask, heads, start, stop, keys), floor)
        elif mask is not None:
            scores.add_(_slice_mask(mask, heads, start, stop, keys))
        rule = self._key_rule(start, rows, keys)
        if rule is None:
            self._fill_rule_mask(scores, start, stop, keys)
        sinks = None if self.sinks is None else self.sinks.to(scores.device).index_select(0, heads).to(scores.dtype)
        into = out[..., :keys] if out is not None and out.dtype == torch.float32 and out.shape[-1] >= keys and not pad \
            else None  # straight into the caller's buffer (its rows of the cube): no second copy of the block
        native = native_softmax.softmax(scores, scores if in_place else into, sinks, value_norms, factors, rule)
        if native is None and rule is not None:
            self._fill_rule_mask(scores, start, stop, keys)
        self._native, self._softmax_input, self._value_norms = native, scores, value_norms
        if native is not None:
            probs = native.probs
        elif sinks is not None:
            sinks = sinks[None, :, None, None].expand(*scores.shape[:3], 1)
            probs = torch.softmax(torch.cat([scores, sinks], -1), dim=-1, dtype=torch.float32)[..., :-1]
        elif into is not None:
            probs = into
            torch.softmax(scores, dim=-1, dtype=torch.float32, out=probs)
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if keys == self.num_keys or not pad:
            return probs
        del scores
        full = probs.new_empty(*probs.shape[:-1], self.num_keys)
        full[..., :keys] = probs
        full[..., keys:] = 0
        return full

    def entropy_terms(self, probs: torch.Tensor) -> EntropyTerms | None:
        """The entropy terms of the block `pattern` just returned as `probs`, or None where its scores are not float32
        (called before the next block: the torch path computes them in place of its scores, in memory the next
        block reuses)."""
        if self._native is not None:
            return EntropyTerms(sums=self._native.sums, peak=self._native.peaks)
        if self._softmax_input.dtype != torch.float32:
            return None
        return EntropyTerms.from_scores(self._softmax_input, probs[..., :self._softmax_input.shape[-1]],
                                        self._value_norms)

    def block_keys(self, stop: int) -> int:
        """How many keys `pattern(..., pad=False)` computes for rows before `stop`: the kernel's causal rule
        gives every later key weight 0."""
        if self.causal is None:
            return self.num_keys
        return min(self.num_keys, stop + (self.num_keys - self.num_queries if self.causal == "bottom_right" else 0))

    def products(self) -> native_softmax.Products | None:
        """The last block times the `factors` `pattern` got, where the native softmax computed it (None: torch
        did, and the caller multiplies)."""
        return None if self._native is None else self._native.products

    def _all_heads(self, heads: torch.Tensor) -> bool:
        """Whether `heads` are all the query heads in order, checked once per call for the tensor every row chunk passes."""
        cached = getattr(self, "_all_heads_cache", None)
        if cached is None or cached[0] is not heads:
            every = len(heads) == self.query.shape[1] and bool((heads.cpu() == torch.arange(len(heads))).all())
            cached = self._all_heads_cache = (heads, every)
        return cached[1]

    def _scores_buffer(self, batch: int, heads: int, rows: int, keys: int) -> torch.Tensor:
        """An uninitialised `"b h q k"` tensor over `scores_memory`, which every row chunk of this call reuses (and
        every call of a capture: the probe passes its own), first sized for every key (the widest chunk)."""
        return self.scores_memory.view((batch, heads, rows, keys), self.query.dtype, self.query.device,
                                       reserve=batch * heads * rows * self.num_keys)

    def _keys(self, heads: torch.Tensor) -> torch.Tensor:
        """Keys repeated to a subset of query heads, built once per call and reused by every row chunk."""
        cached = getattr(self, "_key_cache", None)
        if cached is None or not torch.equal(cached[0], heads):
            group = self.query.shape[1] // self.key.shape[1]
            cached = self._key_cache = (heads, self.key.index_select(1, torch.div(heads, group, rounding_mode="floor")))
        return cached[1]

    def _window(self) -> int | None:
        """The sliding window the kernel applies itself, where it leaves out any key."""
        return self.window if self.window and self.num_keys > self.window else None

    def _diagonal(self, start: int) -> int:
        """The key index of row `start`'s own position."""
        return start + (self.num_keys - self.num_queries if self.causal == "bottom_right" else 0)

    def _key_rule(self, start: int, rows: int, keys: int) -> native_softmax.KeyRule | None:
        """The kernel's causal/window rule for the native softmax to apply to rows start.. over `keys` keys, or None:
        no rule, or one where a row could see no key at all (a mask, or a row whose own key is outside the block),
        which the rule's mask filled into the scores handles as torch does."""
        window = self._window()
        diagonal = self._diagonal(start)
        if (self.causal is None and window is None) or self.mask is not None or not 0 <= diagonal <= keys - rows:
            return None
        return native_softmax.KeyRule(diagonal, self.causal is not None, window)

    def _fill_rule_mask(self, scores: torch.Tensor, start: int, stop: int, keys: int) -> None:
        """Give the keys the kernel's own causal/window rule blocks the lowest score."""
        blocked = self._rule_mask(start, stop, keys, scores.device)
        if blocked is not None:
            first, blocked = blocked
            scores[..., first:].masked_fill_(blocked, _floor(scores))

    def _rule_mask(self, start: int, stop: int, keys: int, device) -> tuple[int, torch.Tensor] | None:
        """(first key, bool `"q k"` over keys first..keys-1): True where the kernel's own causal/window rule blocks a key.

        Keys before `first` are all allowed (without a window, a causal chunk only blocks keys
        after its first row's position), so the mask covers only the rest.
        """
        window = self._window()
        if self.causal is None and window is None:
            return None
        diagonal = self._diagonal(start)
        first = min(keys, diagonal + 1) if self.causal is not None and window is None else 0
        ones = torch.ones(stop - start, keys - first, dtype=torch.bool, device=device)
        blocked = ones.triu(diagonal - first + 1 if self.causal is not None else diagonal - first + window)
        if window:
            blocked |= ones.tril(diagonal - first - window)
        return first, blocked
