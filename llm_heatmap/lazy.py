"""Names a package exports, imported on first use (PEP 562), so that importing the package is cheap."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, modules: dict[str, tuple[str, ...]]):
    """`(__getattr__, __dir__)` for `package`: `modules` maps each module to the public names it defines."""
    exports = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(sys.modules[package], name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
