"""The allocator settings a training run applies: taken by glibc here, harmless to call twice."""

from __future__ import annotations

import sys

import pytest

from metaembed.train.memory import limit_heap_fragmentation


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_glibc_takes_the_settings_and_allocation_still_works():
    assert limit_heap_fragmentation() is True
    assert limit_heap_fragmentation() is True
    blocks = [bytearray(300_000) for _ in range(20)]  # above the mmap threshold: each its own mapping
    assert sum(len(b) for b in blocks) == 6_000_000
