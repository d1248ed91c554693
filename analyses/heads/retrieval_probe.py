"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality"),
measured on a built-in needle-in-a-haystack grid (`needle.py`).

At each decode step the model generates token w. A head copies from the needle at that step when its
most-attended key j lies in the needle's answer span k and the prompt token at j is w. A head's score
on one run is |g_h ∩ k| / |k|, with g_h the needle positions it copied (the paper's set definition;
the reference code, retrieval_head_detection.py `retrieval_calculate`, adds 1/|k| per copying step,
which is the same number unless a position is copied twice). Only runs whose answer recalls the
needle count (`rouge1_recall` of the answer at least `min_recall`; the reference keeps ROUGE-1 recall
above 50%), and a head's score is its mean over those runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from llm_heatmap.errors import InputError
from llm_heatmap.models import spec_from_model
from llm_heatmap.probes.decode import capture_decode

from llm_heatmap.analyses.bounds import check_needle_grid
from llm_heatmap.analyses.runs.progress import progress_bar
from llm_heatmap.analyses.heads.needle import (CONTEXT_LENGTHS, DEPTHS, Needle, NeedlePrompt, check_tokenizer,
                                               needle_prompt, rouge1_recall)


def answer_steps(tokenizer, generated: torch.Tensor) -> int:
    """How many decode steps make the answer: up to the first line break after some text, or the end."""
    text = ""
    for step, token in enumerate(generated.tolist()):
        piece = tokenizer.decode([token])
        if "\n" in piece and text.strip():
            return step
        text += piece
    return len(generated)


def copy_steps(top_keys: torch.Tensor, sequence: torch.Tensor, prompt_tokens: int,
               answer: tuple[int, int]) -> torch.Tensor:
    """"s l h" True where a head's most-attended key is an answer token equal to the token generated at step s."""
    start, stop = answer
    generated = sequence[prompt_tokens:prompt_tokens + top_keys.shape[0]]
    inside = (top_keys >= start) & (top_keys < stop)
    return inside & (sequence[top_keys] == generated[:, None, None])


def run_score(top_keys: torch.Tensor, copies: torch.Tensor, answer: tuple[int, int]) -> torch.Tensor:
    """"l h": the share of the answer's positions each head copied at some step (|g_h ∩ k| / |k|)."""
    start, stop = answer
    positions = torch.nn.functional.one_hot((top_keys - start).clamp(0, stop - start - 1), stop - start)
    copied = (positions.bool() & copies[..., None]).any(0)  # "s l h k -> l h k"
    return copied.sum(-1).double() / (stop - start)


def grid_scores(scores: torch.Tensor, recalled: torch.Tensor) -> torch.Tensor:
    """"r l h" run scores -> "l h": the mean over recalled runs (NaN where no run recalled)."""
    if not bool(recalled.any()):
        return torch.full(scores.shape[1:], float("nan"), dtype=torch.float64)
    return scores[recalled].double().mean(0)


@dataclass
class RetrievalScores:
    """The retrieval probe's result.

    `heads`: one row per head, columns layer, head, kv_group, probe_retrieval_score (mean over recalled
    runs, NaN when none recalled), probe_retrieval_copies (copying steps over the recalled runs).
    `runs`: one row per grid cell: context_length, depth, prompt_tokens, answer_start, answer_stop
    (token positions of the answer), answer (the generated text), recall, recalled.
    `run_scores` / `run_copies`: "r l h", every run's head scores and copying steps (recalled or not).
    """

    heads: pd.DataFrame
    runs: pd.DataFrame
    run_scores: np.ndarray
    run_copies: np.ndarray
    layers: tuple[int, ...]

    def retrieval_heads(self, threshold: float = 0.1) -> pd.DataFrame:
        """Heads scoring above `threshold` (the paper's 0.1), best first."""
        chosen = self.heads[self.heads["probe_retrieval_score"] > threshold]
        return chosen.sort_values("probe_retrieval_score", ascending=False, kind="stable")

    def run_heads(self) -> pd.DataFrame:
        """Long table, one row per run x head: context_length, depth, recall, recalled, layer, head, score."""
        runs, (layers, heads) = len(self.runs), self.run_scores.shape[1:]
        frame = self.runs.loc[np.repeat(np.arange(runs), layers * heads),
                              ["context_length", "depth", "recall", "recalled"]].reset_index(drop=True)
        frame["layer"] = np.tile(np.repeat(np.asarray(self.layers), heads), runs)
        frame["head"] = np.tile(np.arange(heads), runs * layers)
        frame["score"] = self.run_scores.reshape(-1)
        return frame


def measure_cell(model, tokenizer, cell: NeedlePrompt, needle: Needle, *, max_new_tokens: int, spec):
    """One grid cell: its row (the answer and its recall), every head's score "l h" and copying steps "l h"."""
    steps = capture_decode(model, tokenizer, cell.prompt, chat=cell.chat, max_new_tokens=max_new_tokens, spec=spec,
                           do_sample=False)
    if not torch.equal(steps.sequence[:steps.prompt_tokens], cell.input_ids):
        raise InputError("the prompt was encoded differently from the needle's positions; the probe cannot "
                         "locate the needle with this tokenizer.")
    answer_span = (cell.answer_start, cell.answer_stop)
    kept = answer_steps(tokenizer, steps.generated)
    top = steps.top_keys()[:kept]
    copied = copy_steps(top, steps.sequence, steps.prompt_tokens, answer_span)
    answer = tokenizer.decode(steps.generated[:kept], skip_special_tokens=True).strip()
    row = {"context_length": cell.context_length, "depth": cell.depth, "prompt_tokens": steps.prompt_tokens,
           "answer_start": cell.answer_start, "answer_stop": cell.answer_stop, "answer": answer,
           "recall": rouge1_recall(needle.answer, answer)}
    return row, run_score(top, copied, answer_span), copied.sum(0)


def retrieval_head_scores(model, tokenizer, *, spec=None, context_lengths=CONTEXT_LENGTHS, depths=DEPTHS,
                          needle: Needle | None = None, chat: bool | None = None, max_new_tokens: int | None = None,
                          min_recall: float = 0.5, on_run=None) -> RetrievalScores:
    """Score every head as a retrieval head on a needle-in-a-haystack grid (module docstring).

    One greedy generation per `context_lengths` x `depths` cell (lengths in tokens of the document,
    depths in 0..1 of it). `chat`: send the prompt through the tokenizer's chat template (default:
    when it has one). `max_new_tokens`: default the answer's tokens plus 24. A run recalls the needle
    when at least `min_recall` of the answer's words are in the generated answer (ROUGE-1 recall,
    lower-case words, no stemming). `on_run(row)` is called with each finished run's row.
    """
    spec = spec or spec_from_model(model)
    if not spec.causal:
        raise InputError(f"the retrieval probe needs a causal language model that generates text; {spec.summary} "
                         "is not one.")
    needle = needle or Needle()
    lengths, depths = check_needle_grid(context_lengths, depths)
    check_tokenizer(tokenizer)
    if not 0.0 <= float(min_recall) <= 1.0:
        raise InputError(f"min_recall={min_recall} must lie in 0..1 (the share of the answer's words recalled).")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = has_template if chat is None else bool(chat)
    if chat and not has_template:
        raise InputError("chat=True needs a tokenizer with a chat template, and this one has none; pass chat=False.")
    if max_new_tokens is None:
        max_new_tokens = len(tokenizer(" " + needle.answer, add_special_tokens=False)["input_ids"]) + 24
    max_new_tokens = int(max_new_tokens)
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    cells = [needle_prompt(tokenizer, length, depth, needle, chat) for length in lengths for depth in depths]
    longest = max(cells, key=lambda cell: len(cell.input_ids))
    if spec.max_positions and len(longest.input_ids) + max_new_tokens > spec.max_positions:
        raise InputError(f"context length {longest.context_length} makes a prompt of {len(longest.input_ids)} tokens, "
                         f"which with {max_new_tokens} new tokens passes the model's {spec.max_positions} positions; "
                         "pick shorter context lengths.")
    rows, scores, copies = [], [], []
    bar = progress_bar(len(cells), "needle prompts", unit="prompt")
    for cell in cells:
        row, score, copied = measure_cell(model, tokenizer, cell, needle, max_new_tokens=max_new_tokens, spec=spec)
        rows.append({**row, "recalled": row["recall"] >= min_recall})
        scores.append(score)
        copies.append(copied)
        bar.update()
        if on_run is not None:
            on_run(rows[-1])
    bar.close()
    runs = pd.DataFrame(rows)
    scores, copies = torch.stack(scores), torch.stack(copies)
    recalled = torch.tensor(runs["recalled"].to_numpy(dtype=bool))
    layers = tuple(range(spec.num_layers))
    heads = pd.DataFrame({"layer": np.repeat(layers, spec.num_heads),
                          "head": np.tile(np.arange(spec.num_heads), len(layers)),
                          "kv_group": np.tile([spec.kv_group(h) for h in range(spec.num_heads)], len(layers)),
                          "probe_retrieval_score": grid_scores(scores, recalled).reshape(-1).numpy(),
                          "probe_retrieval_copies": copies[recalled].sum(0).reshape(-1).numpy()})
    return RetrievalScores(heads=heads, runs=runs, run_scores=scores.numpy(), run_copies=copies.numpy(), layers=layers)
