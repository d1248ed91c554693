"""Loading models and describing their attention: `load_model`, `ModelSpec`."""

from llm_heatmap.lazy import lazy_exports

from .offline import DEFAULT_MODEL, OFFLINE_MODELS

_MODULES = {".loading": ("load_model", "parse_dtype"), ".spec": ("ModelSpec", "find_attention_modules", "spec_from_model", "site_specs"),
            ".sites": ("find_sites",), ".processed_images": ("processed_pictures",)}

__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
__all__ = ["DEFAULT_MODEL", "OFFLINE_MODELS", *(name for names in _MODULES.values() for name in names)]
