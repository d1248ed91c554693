"""`capture_decode_sites`: what every head of an encoder-decoder looked at while it generated each token.

    steps = capture_decode_sites(model, tokenizer, "12345", max_new_tokens=8)
    steps.cube("decoder")   # "l h s T": step s's decoder self-attention row over the target positions
    steps.cube("cross")     # "l h s S": step s's cross-attention row over the source positions

`generate()` runs with the model's own cache while one probe per site (`capture_sites`, sites `decoder` and
`cross`) listens to each kernel call, as `capture_decode` does for a causal model: the encoder runs once over
the source (not captured: it does not step), then every decode forward calls each decoder layer's self- and
cross-attention, and each probe keeps the last query row of the calls of its own site's modules. A step's
decoder row is placed over the target positions 0..p (`decode.placed_rows`); its cross row covers every
source position (source tokens, or a Whisper encoder's audio frames).

Both cubes' rows are the steps: row s is the query at target position `prompt_tokens - 1 + s` (the decoder's
start tokens are its prompt), labelled with the token that step generated (`query_tokens`), so a reversal reads
as an anti-diagonal whose rows and columns carry the same digits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from llm_heatmap.choices import STEP_SITES
from llm_heatmap.errors import InputError
from llm_heatmap.models import ModelSpec
from llm_heatmap.models.offline import source_name
from llm_heatmap.models.sites import CROSS, DECODER

from .axes import Axis, text_axis
from .capture import token_strings
from .cube import AttentionCube
from .decode import DecodeSteps, Generated, _Steps, check_generation, placed_rows
from .sites import SiteCubes, axis_labels, capture_sites, position_axis, token_axis



def stacked_rows(layer_rows: list[torch.Tensor], position: int) -> torch.Tensor:
    """`"l h S"`: a cross-attention step's layers, each over every source position (no placement needed)."""
    return torch.stack(layer_rows)


class _SiteRouter:
    """The one consumer of every site's probe: a part goes to the step recorder of its site (`part.spec.site`);
    the recorders finish once, however many probes finish."""

    def __init__(self, recorders: dict[str, _Steps]):
        self.recorders, self._finished = recorders, False

    def consume(self, part: AttentionCube) -> None:
        self.recorders[part.spec.site].consume(part)

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            for recorder in self.recorders.values():
                recorder.finish()


@dataclass
class SiteDecodeSteps(Generated):
    """The decode steps of one generation of an encoder-decoder (module docstring): the decoder's `sequence`
    (its start tokens, `prompt_tokens` of them, then the generated ids) and `tokens`; per site the `rows` of
    each step (decoder: `"l h k"` over positions 0..p; cross: `"l h S"` over the source) and the `specs`; the
    source's ids (for audio: its frame indices), `source_tokens` (its labels) and `source_axis` (the three empty
    where neither the source's ids nor a kept cross row say what its positions are)."""

    sequence: torch.Tensor
    prompt_tokens: int
    rows: dict[str, list[torch.Tensor]]
    specs: dict[str, ModelSpec]
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    tokens: list[str]
    source_ids: torch.Tensor
    source_tokens: list[str]
    source_axis: Axis | None
    prompt: str | None = None
    source: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.rows)

    def __repr__(self) -> str:
        return (f"SiteDecodeSteps({self.num_steps} steps after {self.prompt_tokens} start tokens over "
                f"{len(self.source_tokens)} source positions, sites {', '.join(self.sites)}, "
                f"{len(self.layers)} layers x {len(self.heads)} heads, {self.source})")

    def _kept(self, site: str) -> list[torch.Tensor]:
        if site not in self.rows:
            raise InputError(f"site={site!r} was not captured; the captured sites are {', '.join(self.rows)}.")
        if not self.rows[site] and self.num_steps:
            raise InputError("this generation kept no rows (keep_rows=False); capture again with keep_rows=True, or "
                             "pass the step consumers you need to capture_decode_sites.")
        return self.rows[site]

    def decoder_steps(self) -> DecodeSteps:
        """The decoder site's steps as a causal model's `DecodeSteps` (its table, top keys, decode view)."""
        return DecodeSteps(sequence=self.sequence, prompt_tokens=self.prompt_tokens, rows=self._kept(DECODER),
                           spec=self.specs[DECODER], layers=self.layers, heads=self.heads, tokens=self.tokens,
                           prompt=self.prompt, source=self.source, metadata=self.metadata)

    def cube(self, site: str) -> AttentionCube:
        """`"l h s T"` (decoder: keys are the target positions, a key a step did not see is 0) or `"l h s S"`
        (cross: keys are the source's), rows labelled with the tokens the steps generated."""
        generated = self.tokens[self.prompt_tokens:]
        if site == DECODER:
            cube = self.decoder_steps().cube()
            return replace(cube, query_tokens=generated, key_axis=text_axis(len(self.sequence)))
        rows = self._kept(site)
        pattern = torch.stack(rows, 2).float()
        keys = pattern.shape[-1]
        return AttentionCube(pattern=pattern, spec=self.specs[site], tokens=self.source_tokens, token_ids=self.source_ids,
                             layers=self.layers, heads=self.heads,
                             query_positions=torch.arange(self.num_steps) + self.prompt_tokens - 1,
                             key_mask=torch.ones(keys, dtype=torch.bool),
                             query_mask=torch.ones(self.num_steps, dtype=torch.bool), prompt=self.prompt,
                             source=self.source, metadata=self.metadata, query_tokens=generated,
                             key_axis=self.source_axis)

    def cubes(self) -> SiteCubes:
        """Every captured site's step cube."""
        return SiteCubes({site: self.cube(site) for site in self.rows})


def _encoder_inputs(tokenizer, prompt) -> dict:
    """`generate`'s source arguments: a string's tokens, or a mapping of the encoder's inputs as given
    (`input_features` of a Whisper, `input_ids`)."""
    if isinstance(prompt, Mapping):
        return dict(prompt)
    if not isinstance(prompt, str) or not prompt:
        raise InputError("capture_decode_sites takes one source string (or a mapping of the encoder's inputs, such "
                         "as input_features); call it once per source.")
    if tokenizer is None:
        raise InputError("a tokenizer is needed to encode the source; pass the tokenizer load_model returned.")
    return dict(tokenizer(prompt, return_tensors="pt"))


def capture_decode_sites(model: nn.Module, tokenizer, prompt, *, max_new_tokens: int = 20, sites=STEP_SITES,
                         layers=None, heads=None, dtype: torch.dtype = torch.float32, source: str | None = None,
                         consumers: dict | None = None, keep_rows: bool = True, **generate_options) -> SiteDecodeSteps:
    """Generate from the source `prompt` (a string, or a mapping of encoder inputs such as Whisper's
    `input_features`) and keep each decode step's rows of the decoder and cross sites (module docstring).

    `sites`: "decoder", "cross" or both; `layers`/`heads` select the decoder layers and heads of each site;
    `consumers`: site -> `StepConsumer`s receiving that site's steps as they happen (`keep_rows=False` keeps
    none). `generate_options` go to `model.generate`; beam search is refused, as in `capture_decode`."""
    if not getattr(model.config, "is_encoder_decoder", False):
        raise InputError(f"{type(model).__name__} is not an encoder-decoder model; capture a decoder-only model's "
                         "steps with capture_decode.")
    chosen = [sites] if isinstance(sites, str) else list(sites)
    wrong = [site for site in chosen if site not in STEP_SITES]
    if wrong or not chosen:
        raise InputError(f"site={wrong[0] if wrong else None!r} does not step: the encoder reads the source once "
                         "before generation, and the decode steps run through the sites decoder and cross; pick "
                         "from those.")
    consumers = dict(consumers or {})
    if set(consumers) - set(chosen):
        raise InputError(f"consumers name the sites {', '.join(consumers)}, but the captured sites are "
                         f"{', '.join(chosen)}.")
    check_generation(max_new_tokens, generate_options)
    encoder_inputs = _encoder_inputs(tokenizer, prompt)
    device = next(model.parameters()).device
    encoder_inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in encoder_inputs.items()}
    recorders: dict[str, _Steps] = {}
    router = _SiteRouter(recorders)
    probe = capture_sites(model, sites=chosen, layers=layers, heads=heads, last_queries=1, keep=False,
                          compute_output=False, value_norms=False, consumers=[router])
    num_layers = len(next(iter(probe.probes.values())).layers)
    recorders.update({site: _Steps(num_layers, 0, list(consumers.get(site, ())), keep_rows, dtype,
                                   place=stacked_rows if site == CROSS else placed_rows) for site in chosen})
    fed: list[torch.Tensor] = []

    def before_forward(module, args, kwargs) -> None:
        """Each decode forward's new decoder tokens; the first forward's are the decoder's start tokens."""
        ids = kwargs.get("decoder_input_ids")
        if not isinstance(ids, torch.Tensor):
            raise InputError(f"{type(model).__name__} generated without decoder_input_ids, so its steps cannot be "
                             "told apart; generate from token ids.")
        if not fed:
            for recorder in recorders.values():
                recorder.prompt_tokens = ids.shape[-1]
        fed.append(ids[0].detach().cpu())

    pad = next((t for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                if t is not None), None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.callback(model.register_forward_pre_hook(before_forward, with_kwargs=True).remove)
        stack.enter_context(probe)
        output = model.generate(**encoder_inputs, max_new_tokens=int(max_new_tokens),
                                **({"pad_token_id": pad} if pad is not None else {}), **generate_options)
    steps, output = len(fed), output[0].cpu()  # one forward per step, and max_new_tokens >= 1 forwards at least once
    # Whisper returns the generated tokens without its start tokens: the start tokens are the first forward's
    sequence = torch.cat([fed[0], output[len(output) - steps:]])
    return SiteDecodeSteps(
        sequence=sequence, prompt_tokens=len(fed[0]),
        rows={site: recorder.rows[:steps] for site, recorder in recorders.items()},
        specs={site: site_probe.spec for site, site_probe in probe.probes.items()},
        layers=next(iter(probe.probes.values())).layers, heads=next(iter(probe.probes.values())).heads,
        tokens=token_strings(sequence, tokenizer), **_source_labels(model, tokenizer, encoder_inputs, recorders),
        prompt=prompt if isinstance(prompt, str) else None, source=source or source_name(model),
        metadata={"generation": {"max_new_tokens": int(max_new_tokens), "prompt_tokens": len(fed[0]),
                                 "generated_tokens": steps, **{k: repr(v) for k, v in generate_options.items()}}})


def _source_labels(model: nn.Module, tokenizer, encoder_inputs: dict, recorders: dict) -> dict:
    """The source's ids, labels and axis: its tokens where it was given as input_ids, else the positions
    the cross-attention keys stand for (a Whisper encoder's frames), counted from a kept cross row, else none."""
    ids = encoder_inputs.get("input_ids")
    if isinstance(ids, torch.Tensor):
        ids = ids[0].detach().cpu()
        tokens = token_strings(ids, tokenizer)
        return {"source_ids": ids, "source_tokens": tokens, "source_axis": token_axis(model, ids, None, tokens)}
    cross = recorders.get(CROSS)
    if cross is None or not cross.rows:
        return {"source_ids": torch.zeros(0, dtype=torch.long), "source_tokens": [], "source_axis": None}
    count = cross.rows[0].shape[-1]
    axis = position_axis(CROSS, count, model)
    return {"source_ids": torch.arange(count), "source_tokens": axis_labels(axis), "source_axis": axis}
