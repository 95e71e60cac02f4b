"""Package exports resolved on first use, so importing a package loads none of its heavy modules.

    __getattr__, __dir__, __all__ = lazy_exports(__name__, {"Name": "package.module", ...})

``from package import Name`` and ``package.Name`` import ``package.module`` then; the value is
cached in the package's namespace, so the lookup happens once.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_exports(package: str, module_of: Mapping[str, str]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    names = dict(module_of)

    def __getattr__(name: str) -> object:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__, sorted(names)


def by_module(exports: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """``{module: (names...)}`` -> ``{name: module}``."""
    return {name: module for module, names in exports.items() for name in names}
