"""The needle-in-a-haystack prompts of the retrieval probe: a needle sentence hidden at a depth of a
filler document of a given length, and the question that asks for it.

The haystack (`haystack.txt` beside this file) is plain filler written for this package: simple,
seeded, generated sentences about a village (no essay, no licence), repeated when a context is
longer than it. The needle's answer shares no word with the haystack beyond "a", "and", "at",
"the" and "to", so copying it can only come from the needle.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from llm_heatmap.errors import InputError

HAYSTACK = Path(__file__).with_name("haystack.txt")
CONTEXT_LENGTHS = (250, 500, 1000, 2000)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Needle:
    """A sentence to hide (`sentence`), the part of it an answer must copy (`answer`, a substring of
    `sentence`) and the question asking for it."""

    sentence: str = "The best thing to do in Lisbon is to eat a custard tart and ride the yellow tram up to the castle at sunset."
    answer: str = "eat a custard tart and ride the yellow tram up to the castle at sunset"
    question: str = "What is the best thing to do in Lisbon?"

    def __post_init__(self):
        if not self.sentence.strip() or not self.answer.strip() or not self.question.strip():
            raise InputError("the needle needs a sentence, an answer and a question, none of them empty.")
        if self.answer not in self.sentence:
            raise InputError(f"the needle's answer {self.answer!r} is not part of its sentence {self.sentence!r}; "
                             "pass the words of the sentence the model should copy.")


@dataclass(frozen=True)
class NeedlePrompt:
    """One cell of the grid: the prompt, its token ids, and where the answer's tokens sit in them."""

    context_length: int
    depth: float
    prompt: str  # the user's text; sent through the chat template when `chat`
    chat: bool
    input_ids: torch.Tensor  # "p", as `probes.capture.encode_prompt` encodes `prompt`
    answer_start: int  # the answer's tokens are input_ids[answer_start:answer_stop]
    answer_stop: int


@lru_cache(maxsize=1)
def haystack_text() -> str:
    return HAYSTACK.read_text(encoding="utf-8")


def haystack_ids(tokenizer, num_tokens: int) -> list[int]:
    """At least `num_tokens` token ids of the haystack, repeated as often as needed."""
    text = haystack_text().strip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    repeats = -(-num_tokens // max(1, len(ids)))
    if repeats > 1:
        ids = tokenizer("\n\n".join([text] * repeats), add_special_tokens=False)["input_ids"]
    return ids[:num_tokens]


def document(tokenizer, length: int, depth: float, needle: Needle) -> str:
    """About `length` tokens of haystack with the needle sentence at `depth` (0..1), placed at a sentence end."""
    needle_tokens = len(tokenizer(needle.sentence, add_special_tokens=False)["input_ids"])
    context = tokenizer.decode(haystack_ids(tokenizer, max(1, length - needle_tokens)))
    ends = [0] + [m.end() for m in re.finditer(r"[.!?]\s+", context)]
    context = context[:ends[-1]].rstrip() if len(ends) > 1 else context  # whole sentences only
    ends = [e for e in ends if e <= len(context)] + [len(context)]
    cut = max(e for e in ends if e <= depth * len(context) + 1e-9)
    before, after = context[:cut].rstrip(), context[cut:].lstrip()
    return " ".join(part for part in (before, needle.sentence, after) if part)


def user_prompt(text: str, needle: Needle, chat: bool) -> str:
    prompt = f"{text}\n\nBased on the text above, answer the question in one sentence.\nQuestion: {needle.question}"
    return prompt if chat else prompt + "\nAnswer:"


def needle_prompt(tokenizer, length: int, depth: float, needle: Needle, chat: bool) -> NeedlePrompt:
    """The prompt of one grid cell and the positions of the answer's tokens in its encoding."""
    prompt = user_prompt(document(tokenizer, length, depth, needle), needle, chat)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    else:
        text = prompt
        encoded = tokenizer(text, return_offsets_mapping=True)
    start = text.index(needle.sentence) + needle.sentence.index(needle.answer)
    stop = start + len(needle.answer)
    inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < stop and b > start]
    return NeedlePrompt(context_length=length, depth=depth, prompt=prompt, chat=chat,
                        input_ids=torch.tensor(encoded["input_ids"]), answer_start=inside[0], answer_stop=inside[-1] + 1)


def check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"the retrieval probe locates the needle by character offsets, which {type(tokenizer).__name__} "
                         "does not give; load the model's fast tokenizer.")


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words, as ROUGE tokenises (without its stemmer)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_recall(reference: str, response: str) -> float:
    """The share of `reference`'s words that `response` contains, counted with multiplicity (ROUGE-1 recall)."""
    wanted = Counter(words(reference))
    if not wanted:
        return 0.0
    return sum((wanted & Counter(words(response))).values()) / sum(wanted.values())
