"""Token roles (special tokens, sentence segments) and the pattern class of each head.

Special tokens. A token string counts as special when, after stripping the word-boundary
markers tokenizers prepend (`Ġ` byte-level BPE, `▁` SentencePiece, `##` WordPiece) and
surrounding whitespace, it

- is one of `KNOWN_SPECIAL_TOKENS` ([CLS], [SEP], <s>, </s>, <|endoftext|>, <|im_start|>, ...), or
- looks like a control token: the whole string matches `^\\[[^\\[\\]\\s]+\\]$` (e.g. `[SEP]`) or
  `^<[^<>\\s]+>$` (e.g. `<bos>`, `<|eot_id|>`), or
- is pure punctuation: non-empty and every character is in a Unicode `P*` category.

Only the token strings of the cube are used, so the rule works on a saved cube without its
tokenizer. Words, numbers, newlines and whitespace tokens are not special.

Segments. A separator is a sentence-ending punctuation token (only characters from `. ! ? ;`
and their full-width forms), a newline token (`\\n` or byte-level `Ċ`), or a special
control token that follows some non-control token (so leading [CLS]/<s>/padding tokens do not
form a segment of their own).
A run of consecutive separators closes the current segment; the next token opens a new one.
`[CLS] a b . [SEP] c d [SEP]` has segments `{[CLS] a b . [SEP]}` and `{c d [SEP]}`.

Pattern classes (thresholds in `PATTERN_THRESHOLDS`, on columns of `head_metrics`):

- `vertical_score`: the largest, over key columns j seen by at least half as many spread
  rows as the most-seen column (all rows for full attention, about a window for sliding
  windows), of (mean attention those rows give j) - (mean attention uniform attention over
  each row's attendable keys would give j); `vertical_key` is that j. A sink/vertical-stripe head scores near
  its stripe mass, uniform attention scores 0.
- `diagonal_score`: mean over spread rows of the mass within |i - j| <= 1 minus the same
  mass under uniform attention.
- `block_score`: mean over spread rows of the mass on keys in the query's own segment minus
  the same mass under uniform attention (0 when the sequence is one segment).

class = `vertical+diagonal` if vertical_score >= 0.25 and diagonal_score >= 0.25;
`vertical` if vertical_score >= 0.3; `diagonal` if diagonal_score >= 0.3; `block` if
block_score >= 0.25; otherwise `heterogeneous`. The checks run in that order.
"""

from __future__ import annotations

import functools
import itertools
import operator
import re
import unicodedata

import pandas as pd
import torch

KNOWN_SPECIAL_TOKENS = frozenset({
    "[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]", "<s>", "</s>", "<pad>", "<unk>", "<mask>", "<bos>",
    "<eos>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
    "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>", "<end_of_turn>",
})
_MARKERS = ("Ġ", "▁", "##")
_CONTROL = re.compile(r"^\[[^\[\]\s]+\]$|^<[^<>\s]+>$")
_SENTENCE_END = set(".!?;。！？；…")
_NEWLINE = set("\nĊ\r")

PATTERN_THRESHOLDS = {"vertical+diagonal": 0.25, "vertical": 0.3, "diagonal": 0.3, "block": 0.25}
PATTERN_CLASSES = ("vertical+diagonal", "vertical", "diagonal", "block", "heterogeneous")


def _core(token: str) -> str:
    text = str(token)
    for marker in _MARKERS:
        if text.startswith(marker):
            text = text[len(marker):]
            break
    return text.strip(" \t")


@functools.lru_cache(maxsize=2**16)  # a prompt repeats its tokens, and a capture asks once per prompt
def is_control_token(token: str) -> bool:
    core = _core(token)
    return core in KNOWN_SPECIAL_TOKENS or bool(_CONTROL.match(core))


@functools.lru_cache(maxsize=2**16)
def is_special_token(token: str) -> bool:
    """True for control tokens ([CLS], <s>, ...) and pure-punctuation tokens (see module doc)."""
    core = _core(token)
    if is_control_token(token):
        return True
    return bool(core) and all(unicodedata.category(c).startswith("P") for c in core)


def special_token_mask(tokens) -> torch.Tensor:
    """bool `[k]`: which tokens are special (module docstring)."""
    return torch.tensor([is_special_token(t) for t in tokens], dtype=torch.bool)


@functools.lru_cache(maxsize=2**16)
def _is_separator(token: str, after_content: bool) -> bool:
    raw = str(token)
    core = _core(token)
    if raw and all(c in _NEWLINE for c in raw.replace("Ġ", "").replace("▁", "")):
        return True
    if core and all(c in _SENTENCE_END for c in core):
        return True
    return after_content and is_control_token(token)


def segment_ids(tokens) -> torch.Tensor:
    """long `[k]`: sentence/[SEP] segment of each token (module docstring)."""
    control = [is_control_token(t) for t in tokens]
    # whether some token before each one is not a control token
    after_content = list(itertools.accumulate((not c for c in control), operator.or_, initial=False))
    separator = torch.tensor([_is_separator(t, c) for t, c in zip(tokens, after_content)], dtype=torch.bool)
    if len(separator) == 0:
        return torch.zeros(0, dtype=torch.long)
    following = torch.cat([separator[1:], torch.tensor([False])])
    closes = separator & ~following
    return torch.cat([torch.zeros(1, dtype=torch.long), closes[:-1].long().cumsum(0)])


def classify_heads(table: pd.DataFrame, thresholds: dict | None = None) -> pd.Series:
    """Pattern class of each row of a `head_metrics` table (rules in the module docstring)."""
    t = {**PATTERN_THRESHOLDS, **(thresholds or {})}
    vertical, diagonal, block = table["vertical_score"], table["diagonal_score"], table["block_score"]
    labels = pd.Series("heterogeneous", index=table.index, dtype=object)
    rules = [
        ("block", block >= t["block"]),
        ("diagonal", diagonal >= t["diagonal"]),
        ("vertical", vertical >= t["vertical"]),
        ("vertical+diagonal", (vertical >= t["vertical+diagonal"]) & (diagonal >= t["vertical+diagonal"])),
    ]
    # applied lowest priority first so the documented order wins
    for name, hit in rules:
        labels[hit] = name
    return labels
