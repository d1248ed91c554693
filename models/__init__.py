"""Loading models and describing their attention: `load_model`, `ModelSpec`."""

from llm_heatmap.lazy import lazy_exports

from .offline import DEFAULT_MODEL, OFFLINE_MODELS

_EXPORTS = {
    "load_model": ".loading",
    "parse_dtype": ".loading",
    "ModelSpec": ".spec",
    "find_attention_modules": ".spec",
    "spec_from_model": ".spec",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["DEFAULT_MODEL", "OFFLINE_MODELS", *_EXPORTS]
