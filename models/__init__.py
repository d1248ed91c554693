"""Loading models and describing their attention: `load_model`, `ModelSpec`."""

from .errors import InputError
from .loading import load_model, parse_dtype
from .offline import DEFAULT_MODEL, OFFLINE_MODELS
from .spec import ModelSpec, find_attention_modules, spec_from_model

__all__ = ["DEFAULT_MODEL", "InputError", "ModelSpec", "OFFLINE_MODELS", "find_attention_modules",
           "load_model", "parse_dtype", "spec_from_model"]
