"""Keep a long CPU training run's memory flat.

glibc's allocator keeps freed blocks of the many differently shaped activation tensors of a training step in
its heaps and rarely returns them, so a process's resident memory only grows. Measured here (mini backbone,
256 px pages, batch 32, varying text lengths): 8–14 GB after 100–170 steps with the defaults — the kernel's
out-of-memory killer ended three runs — and a flat ≈ 2 GB with large blocks served by ``mmap`` (handed
back on free) and two arenas, the same settings as ``MALLOC_MMAP_THRESHOLD_=131072
MALLOC_TRIM_THRESHOLD_=131072 MALLOC_ARENA_MAX=2`` in the environment.

Those mappings cost a page fault per 4 KiB the first time a step touches them (≈ 100,000 faults a second per
mini run). glibc's ``glibc.malloc.hugetlb=1`` tunable asks for transparent huge pages on its mappings (one fault
per 2 MiB): ``benchmarks/page_faults.py`` measures 60× fewer faults and a wall-time gain that grows with the
load — 1.1× at load 3 (``docs/bench/page-faults.json``), 11× in one unstored run at load 7 (348 s → 31 s, same CPU
time: the faults wait, they do not compute). Tunables are read only when a process starts, so
:func:`restart_with_huge_pages` re-executes the command once with it set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
LARGE_BLOCK = 128 * 1024  # allocations from this size up get their own mapping, returned to the OS when freed
ARENAS = 2


def limit_heap_fragmentation() -> bool:
    """Apply the settings above through ``mallopt``; True when glibc took them, False elsewhere (no-op)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl has no mallopt), or no C library found
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, LARGE_BLOCK), (M_TRIM_THRESHOLD, LARGE_BLOCK), (M_ARENA_MAX, ARENAS))
    return all(mallopt(option, value) == 1 for option, value in settings)


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_environment(environ: Mapping[str, str], thp_mode: str | None) -> dict[str, str] | None:
    """The environment to restart with so glibc maps large blocks on huge pages, or None to keep this one.

    None when the kernel gives no transparent huge pages (``thp_mode`` "[never]" or unknown) or
    ``GLIBC_TUNABLES`` already names the tunable (an explicit ``…hugetlb=0`` wins). Other tunables are kept.
    """
    if thp_mode is None or "[never]" in thp_mode:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if HUGE_PAGES_TUNABLE in tunables:
        return None
    joined = f"{tunables}:{HUGE_PAGES_TUNABLE}=1" if tunables else f"{HUGE_PAGES_TUNABLE}=1"
    return {**environ, "GLIBC_TUNABLES": joined}


def restart_with_huge_pages() -> None:
    """Re-execute this process (same interpreter, same arguments) with huge pages for glibc's mappings.

    Returns only when no restart is needed or possible (not Linux, no huge pages, tunable already set).
    Call it before any work: the process image is replaced.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        thp_mode = THP_MODE.read_text()
    except OSError:
        return
    environ = huge_page_environment(os.environ, thp_mode)
    if environ is not None:
        sys.stdout.flush(), sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
