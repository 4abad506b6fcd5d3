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


def test_huge_pages_are_asked_for_once_and_an_explicit_setting_wins():
    from metaembed.train.memory import huge_page_environment

    madvise = "always [madvise] never\n"
    assert huge_page_environment({"A": "1"}, madvise) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    kept = huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, madvise)
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, madvise) is None
    assert huge_page_environment(kept, madvise) is None  # the restarted process does not restart again
    assert huge_page_environment({}, "always madvise [never]\n") is None
    assert huge_page_environment({}, None) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")
def test_the_process_restarts_itself_with_the_tunable():
    import os
    import subprocess
    from pathlib import Path

    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.is_file() or "[never]" in mode.read_text():
        pytest.skip("no transparent huge pages on this kernel")
    code = "import os; from metaembed.train.memory import restart_with_huge_pages as r; r()"
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    child = subprocess.run(
        [sys.executable, "-c", code + "; print(os.environ['GLIBC_TUNABLES'])"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert child.stdout.split()[-1] == "glibc.malloc.hugetlb=1"


def test_only_the_command_line_restarts_the_process(monkeypatch, tmp_path):
    """``main([...])`` called as a library must never replace the caller's process."""
    from metaembed import cli
    from metaembed.train import memory

    calls = []
    monkeypatch.setattr(memory, "restart_with_huge_pages", lambda: calls.append("restart"))
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["metaembed", "train", str(tmp_path / "missing.yaml")])
    assert cli.main() == 2
    assert calls == ["restart"]
