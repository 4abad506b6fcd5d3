"""docs/kernels.md's result tables are the stored benchmark JSON rendered, line for line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_docs_tables_are_the_stored_json_rendered(benchmark_script, assert_rendered_in):
    result = json.loads((ROOT / "docs" / "bench" / "kernels.json").read_text())
    assert_rendered_in(benchmark_script("kernel_claims").markdown(result), "docs/kernels.md")
    for cell in result["cells"]:
        assert len(cell["ms"]) == len(result["rounds"])  # one value per round: medians and spreads are real
    for state in result["rounds"]:
        assert state["threads"] >= 1 and len(state["load_before"]) == 3 and state["ceilings"]["bandwidth_gbs"] > 0


def test_the_stored_result_names_its_clock_and_the_tables_say_it(benchmark_script):
    result = json.loads((ROOT / "docs" / "bench" / "kernels.json").read_text())
    threads = result["rounds"][0]["threads"]
    assert result["clock"] == ("thread_cpu" if threads == 1 else "wall")  # one thread's CPU time covers one thread
    for state in result["rounds"]:
        assert state["clock"] == state["ceilings"]["clock"] == result["clock"]
    assert f"Clock: `{result['clock']}`" in benchmark_script("kernel_claims").markdown(result)


def test_median_ms_times_by_the_clock_it_is_given(monkeypatch, benchmark_script):
    from metaembed.bench import ceilings

    readings = iter([0.0, 1.0, 1.0, 4.0, 4.0, 6.0])
    monkeypatch.setattr(ceilings.time, "thread_time", lambda: next(readings))
    monkeypatch.setattr(ceilings.time, "perf_counter", lambda: pytest.fail("wall clock read"))
    calls = []
    # one warm-up call (untimed), then 3 timed calls of 1, 3 and 2 s: median 2 s, 1 s per query of 2
    assert benchmark_script("kernel_claims").median_ms(lambda: calls.append(1), 3, per=2, clock="thread_cpu") == 1000.0
    assert len(calls) == 4
