"""docs/kernels.md's result tables are the stored benchmark JSON rendered, line for line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _claims_module():
    spec = importlib.util.spec_from_file_location("kernel_claims", ROOT / "benchmarks" / "kernel_claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_tables_are_the_stored_json_rendered():
    result = json.loads((ROOT / "docs" / "bench" / "kernels.json").read_text())
    rendered = _claims_module().markdown(result)
    docs = (ROOT / "docs" / "kernels.md").read_text().splitlines()
    missing = [line for line in rendered.splitlines() if line.strip() and line not in docs]
    assert not missing, f"docs/kernels.md lacks {len(missing)} rendered lines, e.g. {missing[0]!r}"
    for cell in result["cells"]:
        assert len(cell["ms"]) == len(result["rounds"])  # one value per round: medians and spreads are real
    for state in result["rounds"]:
        assert state["threads"] >= 1 and len(state["load_before"]) == 3 and state["ceilings"]["bandwidth_gbs"] > 0


def test_the_stored_result_names_its_clock_and_the_tables_say_it():
    result = json.loads((ROOT / "docs" / "bench" / "kernels.json").read_text())
    threads = result["rounds"][0]["threads"]
    assert result["clock"] == ("thread_cpu" if threads == 1 else "wall")  # one thread's CPU time covers one thread
    for state in result["rounds"]:
        assert state["clock"] == state["ceilings"]["clock"] == result["clock"]
    assert f"Clock: `{result['clock']}`" in _claims_module().markdown(result)


def test_median_ms_times_by_the_clock_it_is_given(monkeypatch):
    from metaembed.bench import ceilings

    readings = iter([0.0, 1.0, 1.0, 4.0, 4.0, 6.0])
    monkeypatch.setattr(ceilings.time, "thread_time", lambda: next(readings))
    monkeypatch.setattr(ceilings.time, "perf_counter", lambda: pytest.fail("wall clock read"))
    calls = []
    # one warm-up call (untimed), then 3 timed calls of 1, 3 and 2 s: median 2 s, 1 s per query of 2
    assert _claims_module().median_ms(lambda: calls.append(1), 3, per=2, clock="thread_cpu") == 1000.0
    assert len(calls) == 4
