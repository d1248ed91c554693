"""Head ablation (Michel et al. 2019): replace chosen heads' outputs by zero or by their mean over a prompt set
and measure the change in the target's log-probability and in the prompt's loss.

A head's output row `o_h` is its slice of the output projection's input (`"(h d)"`), so a forward pre-hook on
the projection swaps that slice before `W_O` applies; the kernel itself is untouched. `ablation_effect`
ablates chosen heads together on one prompt; `head_ablation_rows` ablates every head alone, a batch of
copies of the prompt per forward (copy b ablates head b); `run_head_ablation` does that for every prompt of
a set on the run engine (resumable, shardable, data-parallel) and gives each head's mean effect with a
bootstrap interval over the prompts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from torch import nn

from llm_heatmap.errors import InputError


@contextlib.contextmanager
def heads_replaced(model: nn.Module, spec, heads: dict[int, tuple[int, ...]], means: torch.Tensor | None = None):
    """Inside the block, the outputs of `heads` ({layer: (head, ...)}) are zero, or `means` (`"l h d"`) where given."""
    for layer, chosen in heads.items():
        if not 0 <= layer < spec.num_layers or any(not 0 <= h < spec.num_heads for h in chosen):
            raise InputError(f"ablation of layer {layer}, heads {list(chosen)} is outside the model's "
                             f"{spec.num_layers} layers x {spec.num_heads} heads.")
        if not spec.output_projections[layer]:
            raise InputError(f"layer {layer} of {spec.architecture} has no output projection llm-heatmap can find, "
                             "so its heads cannot be ablated.")
    if means is not None and tuple(means.shape) != (spec.num_layers, spec.num_heads, spec.head_dim):
        raise InputError(f"means has shape {tuple(means.shape)}; pass one mean output per layer, head and head "
                         f"dimension, shape {(spec.num_layers, spec.num_heads, spec.head_dim)}.")

    def replace(layer: int, chosen: list[int]):
        def hook(module, args):
            rows = rearrange(args[0], "... (h d) -> ... h d", h=spec.num_heads).clone()
            rows[..., chosen, :] = 0 if means is None else means[layer, chosen].to(rows)
            return (rearrange(rows, "... h d -> ... (h d)"), *args[1:])
        return hook

    with contextlib.ExitStack() as stack:
        for layer, chosen in heads.items():
            projection = model.get_submodule(spec.output_projections[layer])
            stack.callback(projection.register_forward_pre_hook(replace(layer, list(chosen))).remove)
        yield model


@torch.no_grad()
def mean_head_outputs(model: nn.Module, prompts: list[torch.Tensor], spec) -> torch.Tensor:
    """float32 `"l h d"`: every head's output row averaged over all tokens of `prompts` (each `[1, T]` ids)."""
    if not prompts:
        raise InputError("mean ablation needs at least one prompt to average head outputs over.")
    device = next(model.parameters()).device
    return mean_outputs_of_forwards(model, [{"input_ids": ids.to(device), "use_cache": False} for ids in prompts], spec)


def mean_outputs_of_forwards(model: nn.Module, forwards: list[dict], spec) -> torch.Tensor:
    """float32 `"l h d"`: the output row of every head of `spec`'s layers averaged over all positions that its
    output projection sees in the forwards `model(**kwargs)` of `forwards` (each one sequence)."""
    sums = torch.zeros(spec.num_layers, spec.num_heads, spec.head_dim, dtype=torch.float64)
    counts = torch.zeros(spec.num_layers, dtype=torch.float64)

    def add(layer: int):
        def hook(module, args):
            rows = rearrange(args[0][0].double().cpu(), "t (h d) -> t h d", h=spec.num_heads)
            sums[layer] += rows.sum(0)
            counts[layer] += len(rows)
        return hook

    with contextlib.ExitStack() as stack:
        for layer, path in enumerate(spec.output_projections):
            stack.callback(model.get_submodule(path).register_forward_pre_hook(add(layer)).remove)
        for kwargs in forwards:
            model(**kwargs)
    return (sums / rearrange(counts, "l -> l 1 1")).float()


@dataclass
class AblationEffect:
    target_id: int
    log_prob: float
    ablated_log_prob: float

    @property
    def change(self) -> float:
        return self.ablated_log_prob - self.log_prob


@torch.no_grad()
def ablation_effect(model: nn.Module, input_ids: torch.Tensor, heads: dict[int, tuple[int, ...]], *, spec,
                    means: torch.Tensor | None = None, position: int = -1, target: int | None = None) -> AblationEffect:
    """The change in log p(target) at `position` when `heads` are zero-ablated (or mean-ablated with `means`)."""
    length = input_ids.shape[-1]
    if not -length <= position < length:
        raise InputError(f"position {position} is outside the prompt's {length} tokens; pass -{length} to {length - 1}.")
    device = next(model.parameters()).device

    def log_probs():
        logits = model(input_ids=input_ids.to(device), use_cache=False).logits[0, position]
        return torch.log_softmax(logits.double(), -1).cpu()

    clean = log_probs()
    target_id = int(clean.argmax()) if target is None else int(target)
    with heads_replaced(model, spec, heads, means):
        ablated = log_probs()
    return AblationEffect(target_id, float(clean[target_id]), float(ablated[target_id]))


ABLATION_MODES = ("zero", "mean")
LOGITS_BUDGET = 1 << 28  # bytes of fp32 logits one batched forward may hold ("b t v")


def _checked_means(model, spec, means):
    if not spec.causal or model.get_output_embeddings() is None:
        raise InputError(f"{spec.architecture} has no LM head, so an ablation has no next-token probability to "
                         "change; pass a decoder with an LM head.")
    check_ablatable(spec, means)


def check_ablatable(spec, means) -> None:
    """`means` (None, or one mean output per layer, head and head dimension) fits `spec`, and every layer has an
    output projection whose input holds the heads' rows."""
    if means is not None and tuple(means.shape) != (spec.num_layers, spec.num_heads, spec.head_dim):
        raise InputError(f"means has shape {tuple(means.shape)}; pass one mean output per layer, head and head "
                         f"dimension, shape {(spec.num_layers, spec.num_heads, spec.head_dim)}.")
    missing = [layer for layer, path in enumerate(spec.output_projections) if not path]
    if missing:
        raise InputError(f"layer {missing[0]} of {spec.architecture} has no output projection llm-heatmap can find, "
                         "so its heads cannot be ablated.")


@contextlib.contextmanager
def one_head_per_copy(model: nn.Module, spec, units: list[tuple[int, int]], means: torch.Tensor | None):
    """Inside the block, batch element b of a forward has head `units[b]` = (layer, head) zeroed (or set to its mean)."""
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for copy, (layer, head) in enumerate(units):
        by_layer.setdefault(layer, []).append((copy, head))

    def replace(layer: int, pairs: list[tuple[int, int]]):
        copies, heads = (torch.tensor(v) for v in zip(*pairs))

        def hook(module, args):
            rows = rearrange(args[0], "b t (h d) -> b t h d", h=spec.num_heads).clone()
            value = 0 if means is None else rearrange(means[layer, heads].to(rows), "n d -> n 1 d")
            rows[copies.to(rows.device), :, heads.to(rows.device), :] = value
            return (rearrange(rows, "b t h d -> b t (h d)"), *args[1:])
        return hook

    with contextlib.ExitStack() as stack:
        for layer, pairs in by_layer.items():
            projection = model.get_submodule(spec.output_projections[layer])
            stack.callback(projection.register_forward_pre_hook(replace(layer, pairs)).remove)
        yield


def _scores(logits: torch.Tensor, input_ids: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) at the last position, in float64; mean next-token loss over the prompt) of each row of
    `"b t v"` logits."""
    target_log_prob = torch.log_softmax(logits[:, -1].double(), -1)[:, target]
    if input_ids.shape[-1] < 2:
        return target_log_prob, torch.full_like(target_log_prob, float("nan"))
    following = input_ids[0, 1:].to(logits.device).repeat(len(logits))
    nll = torch.nn.functional.cross_entropy(rearrange(logits[:, :-1].float(), "b t v -> (b t) v"), following,
                                            reduction="none")
    return target_log_prob, rearrange(nll, "(b t) -> b t", b=len(logits)).double().mean(1)


@torch.no_grad()
def head_ablation_rows(model: nn.Module, input_ids: torch.Tensor, *, spec, means: torch.Tensor | None = None,
                       target: int | None = None, batch_size: int | None = None) -> pd.DataFrame:
    """Every head ablated alone (zero, or `means` `"l h d"`), one row per (layer, head): `target_id` (default the
    clean prediction at the last position), `log_prob` and `ablated_log_prob` of it there, `delta_log_prob`
    (ablated - clean), the prompt's mean next-token `loss` and `ablated_loss`, and `delta_loss`. Copies of
    the prompt run `batch_size` at a time (default: as many as `LOGITS_BUDGET` of logits holds)."""
    _checked_means(model, spec, means)
    device = next(model.parameters()).device
    input_ids = input_ids.reshape(1, -1).to(device)
    clean_logits = model(input_ids=input_ids, use_cache=False).logits
    target = int(clean_logits[0, -1].argmax()) if target is None else int(target)
    clean_log_prob, clean_loss = (float(v[0]) for v in _scores(clean_logits, input_ids, target))
    units = [(layer, head) for layer in range(spec.num_layers) for head in range(spec.num_heads)]
    size = batch_size or max(1, LOGITS_BUDGET // (4 * input_ids.shape[-1] * clean_logits.shape[-1]))
    log_probs, losses = [], []
    for start in range(0, len(units), size):
        chunk = units[start:start + size]
        with one_head_per_copy(model, spec, chunk, means):
            logits = model(input_ids=input_ids.expand(len(chunk), -1), use_cache=False).logits
        log_prob, loss = _scores(logits, input_ids, target)
        log_probs.append(log_prob.cpu())
        losses.append(loss.cpu())
    layers, heads = (np.array(v) for v in zip(*units))
    ablated_log_prob, ablated_loss = torch.cat(log_probs).numpy(), torch.cat(losses).numpy()
    return pd.DataFrame({"layer": layers, "head": heads, "kv_group": heads // (spec.num_heads // spec.num_kv_heads),
                         "target_id": target, "log_prob": clean_log_prob, "ablated_log_prob": ablated_log_prob,
                         "delta_log_prob": ablated_log_prob - clean_log_prob, "loss": clean_loss,
                         "ablated_loss": ablated_loss, "delta_loss": ablated_loss - clean_loss})


@dataclass
class HeadAblation:
    """A head ablation over a prompt set: `rows` (one per prompt x head, `head_ablation_rows` behind the run's
    prompt columns) and `importance` (one per head: the mean `delta_log_prob` and `delta_loss` over the prompts,
    each with a bootstrap interval); `scored`: what the log-probability is of ("next token", or on a site
    `site_ablation.TARGET` or `site_ablation.CLASS`)."""

    rows: pd.DataFrame
    importance: pd.DataFrame
    scored: str = "next token"

    def _repr_html_(self) -> str:
        from llm_heatmap.notebook import tables_html

        return tables_html("HeadAblation: each head ablated alone", {"importance": self.importance, "rows": self.rows})


def ablation_importance(rows: pd.DataFrame, bootstrap=None) -> pd.DataFrame:
    """One row per head of a `head_ablation_rows` table over prompts: mean and bootstrap interval (over the
    prompts) of `delta_log_prob` and `delta_loss`, and `n_prompts`."""
    from llm_heatmap.analyses.stats import Bootstrap

    bootstrap = bootstrap or Bootstrap()
    units = rows[["layer", "head", "kv_group"]].drop_duplicates().sort_values(["layer", "head"]).reset_index(drop=True)
    table = units.copy()
    for column in ("delta_log_prob", "delta_loss"):
        wide = rows.pivot_table(index="prompt_id", columns=["layer", "head"], values=column, dropna=False)
        wide = wide.reindex(columns=pd.MultiIndex.from_frame(units[["layer", "head"]]))
        stats = bootstrap.means(wide.to_numpy(float))
        table[column] = stats["mean"]
        table[f"{column}_low"], table[f"{column}_high"] = stats["ci_low"], stats["ci_high"]
    table["n_prompts"] = rows["prompt_id"].nunique()
    return table


def run_head_ablation(model: nn.Module, tokenizer, prompts, out_dir: str | Path, *, spec=None, source: str | None = None,
                      chat: bool = False, mode: str = "zero", bootstrap=None, run=None, site: str | None = None,
                      processor=None) -> HeadAblation | None:
    """Every head of `model` ablated alone on every prompt (`runs.prompts.Prompt`s), on the run engine into
    `out_dir` (`parts/`, `ablation.json`, `ablation.parquet`; `run`: `runs.engine.RunOptions`), and each head's
    mean effect over the prompts (`ablation_importance`). mode="mean" replaces a head's output by its mean over
    every token of the prompt set (`mean_head_outputs`, computed first). None on ranks other than rank 0.

    An encoder-decoder or an image classifier is ablated on one attention `site` (needed where the model has
    several; records give their `image`, prepared by `processor`, and `target`), and scored by its own output
    (`site_ablation`: the target's teacher-forced log-probability, or the predicted class's)."""
    from llm_heatmap.analyses.runs.engine import RunOptions, run_per_prompt
    from llm_heatmap.analyses.runs.prompts import check_length
    from llm_heatmap.models import spec_from_model
    from llm_heatmap.probes.capture import encode_prompt

    if mode not in ABLATION_MODES:
        raise InputError(f"mode={mode!r} is not an ablation mode; use one of {', '.join(ABLATION_MODES)}.")
    spec = spec or spec_from_model(model)
    prompts = list(prompts)
    if _through_sites(model):
        return _run_site_ablation(model, tokenizer, prompts, out_dir, spec=spec, source=source, chat=chat, mode=mode,
                                  bootstrap=bootstrap, run=run, site=site, processor=processor)
    if site is not None:
        from llm_heatmap.analyses.runs.sites import resolve_site

        resolve_site(model, spec, site, source or spec.architecture, "a head ablation reads one")
    _checked_means(model, spec, None)
    if not prompts:
        raise InputError("head ablation needs at least one prompt; pass prompts, e.g. read_prompts('prompts.txt').")
    for prompt in prompts:
        check_length(tokenizer, spec, prompt.text, chat=chat, where=prompt.where)
    ids = {p.id: encode_prompt(tokenizer, p.text, chat=chat)[0] for p in prompts}
    means = mean_head_outputs(model, list(ids.values()), spec) if mode == "mean" else None

    def measure(prompt):
        return head_ablation_rows(model, ids[prompt.id], spec=spec, means=means)

    record = run_per_prompt(measure, prompts, out_dir, kind="ablation", options=run or RunOptions(),
                            settings={"model": source or spec.architecture, "spec": spec.summary, "chat": chat,
                                      "mode": mode})
    if not record.ranks.is_main:
        return None
    rows = record.tables(record.sections[0])
    return HeadAblation(rows=rows, importance=ablation_importance(rows, bootstrap))


def _through_sites(model: nn.Module) -> bool:
    """Whether `model` is ablated on one of its sites: it has sites other than one self-attention stack, or reads
    images (a decoder-only LM and a BERT have one stack, read from the prompt's tokens)."""
    from llm_heatmap.models.loading import reads_images
    from llm_heatmap.models.sites import SELF, find_sites

    return not set(find_sites(model)) <= {SELF} or reads_images(getattr(model, "config", None))


def _run_site_ablation(model, tokenizer, prompts, out_dir, *, spec, source, chat, mode, bootstrap, run, site,
                       processor) -> HeadAblation | None:
    from llm_heatmap.analyses.runs.engine import RunOptions, run_per_prompt
    from llm_heatmap.analyses.runs.sites import check_site_run, record_lengths, resolve_site

    from .site_ablation import record_inputs, site_head_ablation_rows, site_mean_head_outputs, site_output

    name = source or type(model).__name__
    output = site_output(model)
    resolved = resolve_site(model, spec, site, name, "a head ablation reads one")
    if not prompts:
        raise InputError("head ablation needs at least one prompt; pass prompts, e.g. read_prompts('prompts.txt').")
    check_site_run(model, processor, resolved, prompts, chat=chat, name=name)
    record_lengths(tokenizer, resolved.spec, prompts)
    means = None
    if mode == "mean":
        means = site_mean_head_outputs(model, [record_inputs(model, tokenizer, processor, p) for p in prompts],
                                       resolved.spec)

    def measure(prompt):
        return site_head_ablation_rows(model, record_inputs(model, tokenizer, processor, prompt), spec=resolved.spec,
                                       output=output, means=means)

    record = run_per_prompt(measure, prompts, out_dir, kind="ablation", options=run or RunOptions(),
                            settings={"model": name, "spec": resolved.spec.summary, "chat": chat, "mode": mode,
                                      "site": resolved.name})
    if not record.ranks.is_main:
        return None
    rows = record.tables(record.sections[0])
    return HeadAblation(rows=rows, importance=ablation_importance(rows, bootstrap), scored=output)
