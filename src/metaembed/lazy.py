"""Lazy re-exports: a package names what it offers without importing torch until one of them is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that imports ``where[name]`` (a module path) the first time ``name`` is used.

    Example (in a package ``__init__``): ``__getattr__ = lazy_exports(__name__, {"maxsim": "metaembed.scoring"})``.
    """

    def __getattr__(name: str) -> object:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
