"""Figures to files, the same figure giving the same bytes: no dates in PNG, SVG or PDF metadata, and SVG
element ids (clip paths, glyphs) derived from a fixed salt instead of a random one."""

from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

FORMATS = (".png", ".svg", ".pdf")
HASH_SALT = "llm-heatmap"
_NO_DATES = {".png": {}, ".svg": {"Date": None}, ".pdf": {"CreationDate": None}}


def save_deterministic(figure: Figure, path: Path, dpi: float) -> Path:
    """`figure.savefig` to `path` (.png, .svg or .pdf, by its suffix) without dates or random ids."""
    suffix = path.suffix.lower()
    with matplotlib.rc_context({"svg.hashsalt": HASH_SALT}):
        figure.savefig(path, dpi=dpi, format=suffix[1:], metadata=_NO_DATES[suffix])
    return path
