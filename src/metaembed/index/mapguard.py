"""The SIGBUS guard (``_mapguard.c``): a truncated mapped file becomes a counted fault, not a dead process.

Reading a page of a mapping past the end of its file raises SIGBUS. With the guard installed, a fault inside a
registered range is answered with a zero page and counted for that range; the index checks the counts after
every read and reports the file as damaged (:mod:`metaembed.index.files`). Without the compiled extension (no C
compiler at install time) :func:`available` is False and the index relies on its size checks alone.
"""

from __future__ import annotations

import ctypes
import functools
import threading

from metaembed.native import load_library

_lock = threading.Lock()


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library("metaembed._mapguard")
    if lib is None:
        return None
    lib.metaembed_mapguard_install.restype = ctypes.c_int
    lib.metaembed_mapguard_add.restype = ctypes.c_int
    lib.metaembed_mapguard_add.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    lib.metaembed_mapguard_faults.restype = ctypes.c_long
    lib.metaembed_mapguard_faults.argtypes = [ctypes.c_int]
    lib.metaembed_mapguard_remove.argtypes = [ctypes.c_int]
    with _lock:
        if lib.metaembed_mapguard_install() != 0:
            return None
    return lib


def available() -> bool:
    """True when the guard is built and its SIGBUS handler is installed in this process."""
    return _library() is not None


class Guard:
    """One guarded address range; ``faults`` counts the reads past the end of its file since it was registered."""

    def __init__(self, address: int, length: int) -> None:
        lib = _library()
        self._slot = -1 if lib is None else lib.metaembed_mapguard_add(address, length)

    @property
    def active(self) -> bool:
        """False when the guard is not built or its table was full (the range is then unprotected)."""
        return self._slot >= 0

    def faults(self) -> int:
        lib = _library()
        return 0 if lib is None or self._slot < 0 else int(lib.metaembed_mapguard_faults(self._slot))

    def release(self) -> None:
        lib = _library()
        if lib is not None and self._slot >= 0:
            lib.metaembed_mapguard_remove(self._slot)
        self._slot = -1
