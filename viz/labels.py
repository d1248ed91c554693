"""Text measurement in pixels, so layouts reserve exactly the room their labels need."""

from __future__ import annotations

import unicodedata
from functools import lru_cache

from matplotlib.font_manager import FontProperties, findfont
from matplotlib.ft2font import FT2Font
from matplotlib.textpath import TextToPath

_TEXT = TextToPath()
REPLACEMENT = "\ufffd"  # drawn for characters the font lacks
_NOT_DRAWN = ("Cc", "Cf", "Cs", "Co", "Cn")  # control, format, surrogate, private-use and unassigned characters


@lru_cache(maxsize=1)
def _font_characters() -> frozenset[int]:
    """Code points the default font has a glyph for, in both weights the labels use."""
    maps = [set(FT2Font(findfont(FontProperties(weight=weight))).get_charmap()) for weight in ("normal", "bold")]
    return frozenset(maps[0] & maps[1])


def drawable(text: str) -> str:
    """`text` as the labels can draw it: every character the default font has no glyph for, and every
    control or format character, replaced by U+FFFD (so matplotlib never warns about a missing glyph),
    and `$` escaped (so a prompt is never read as mathtext)."""
    known = _font_characters()
    kept = "".join(c if c == "\n" or (ord(c) in known and unicodedata.category(c) not in _NOT_DRAWN) else REPLACEMENT
                   for c in text)
    return kept.replace("$", r"\$")


@lru_cache(maxsize=4096)
def text_size(text: str, px: float, weight: str = "normal") -> tuple[float, float]:
    """(width, height) in pixels of one line of `text` at a font size of `px` pixels (descent included)."""
    font = FontProperties(size=px, weight=weight)
    width, height, descent = _TEXT.get_text_width_height_descent(text, font, ismath=False)
    return width, height + descent


def block_size(text: str, px: float, spacing: float = 1.2) -> tuple[float, float]:
    """(width, height) of a possibly multi-line label."""
    lines = text.split("\n")
    return max(text_size(line, px)[0] for line in lines), px * spacing * len(lines)


def fit_text(text: str, px: float, width: float, weight: str = "normal") -> str:
    """`text` cut (with an ellipsis) so that one line fits in `width` pixels; only the characters that could
    fit are measured (no glyph is narrower than a tenth of the font size), so a huge prompt costs nothing."""
    text = text[:int(width / (0.1 * px)) + 2]
    if text_size(text, px, weight)[0] <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_size(text[:mid] + "…", px, weight)[0] <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet back to bytes (`Ġ` is a space, `Ċ` a newline, ...)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", " ": "␣"}


@lru_cache(maxsize=65536)
def token_text(token) -> str:
    """The one way every view shows a token: byte-level BPE (`Ġa`, `Ċ`) and SentencePiece (`▁a`) markers
    decoded, then a space shown as `␣` and a newline, return or tab as `\\n`, `\\r`, `\\t`, so
    the PNG, the HTML page, tables and titles agree (the HTML keeps the raw token for hover)."""
    text = str(token)
    decoder = _byte_decoder()
    if text and all(c in decoder for c in text):
        try:
            text = bytes(decoder[c] for c in text).decode("utf-8")
        except UnicodeDecodeError:  # not byte-level (e.g. a WordPiece token with an accent): as written
            pass
    text = text.replace("▁", " ")
    return "".join(_ESCAPES.get(c, c) for c in text)


def token_label(token: str, limit: int = 14) -> str:
    """`token_text(token)` as the figures draw it: long ones cut, undrawable characters replaced."""
    text = token_text(token)
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return drawable(text)


def model_name(source) -> str:
    """A short name for a model source: a path (a directory, a `.gguf` file, a cache folder) by its
    last part, an offline name or hub id (`Qwen/Qwen3-0.6B`) as it is."""
    text = "".join(c if c.isprintable() else " " for c in str(source or ""))  # a newline is no glyph
    looks_like_path = text.startswith(("/", "~", ".")) or text.count("/") > 1 or "\\" in text or text.endswith(".gguf")
    if not looks_like_path:
        return text
    name = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".gguf")


def positions_text(cube) -> str | None:
    """What a cube without a prompt reads where its positions are no text ("50 audio frames", "4 x 4 patches":
    their labels say nothing a title should), else None."""
    axis = getattr(cube, "key_axis", None)
    if isinstance(cube.prompt, str) or axis is None:
        return None
    if axis.kind == "frames":
        return f"{axis.length} audio frames"
    if axis.kind == "patches" and axis.grids:
        specials = [axis.special[position] for position in sorted(axis.special)]
        return " + ".join([*specials, *(f"{rows} x {cols} patches" for rows, cols in axis.grids)])
    return None


def prompt_text(cube) -> str:
    """The cube's prompt on one line (its tokens joined when it has no prompt, or `positions_text`)."""
    prompt = cube.prompt if isinstance(cube.prompt, str) else positions_text(cube)
    if prompt is None and cube.tokens:
        prompt = " ".join(str(t) for t in cube.tokens)
    return drawable(" ".join((prompt or "").split()))
