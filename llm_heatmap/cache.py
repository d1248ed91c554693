"""Where llm-heatmap keeps what it builds once per machine (converted GGUF models, the native softmax)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("LLM_HEATMAP_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "llm-heatmap"
