"""Loading the optional C extensions (built by setup.py where a compiler exists) as plain ctypes libraries."""

from __future__ import annotations

import ctypes
import importlib.util


def load_library(module: str) -> ctypes.CDLL | None:
    """The compiled extension ``module`` (e.g. ``metaembed._mapguard``) as a ctypes library; None if not built."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None
    try:
        return ctypes.CDLL(spec.origin)
    except OSError:
        return None
