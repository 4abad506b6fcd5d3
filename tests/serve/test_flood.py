"""The flood soak (benchmarks/serve_soak.py) as a test: 300 clients without a key flood /v1/embeddings while
/health, keyed writes and a quiet unkeyed client are probed.

Always asserted: the statuses, no keyed write lost, every request after the flood answered, a server log without
errors. The latency bounds need the server to get a CPU: when its event loop spent more than half the flood runnable
but waiting for one (a machine busy with other work; the flood shares it too), they are not checked and the test
says so (skipped, with the numbers). Run with ``pytest -m slow tests/serve/test_flood.py -s``; the benchmark writes
the same report to docs/bench/serve-soak.json (docs/serve.md has the numbers of runs).
"""

from __future__ import annotations

import json

import pytest

STARVED = 0.5  # share of the flood the server's event loop waited for a CPU beyond which latency says nothing


@pytest.mark.slow
def test_a_flood_without_a_key_gets_fast_503s_while_health_and_keyed_writes_stay_responsive(
    serve_model, tmp_path, benchmark_script
):
    serve_model.save_pretrained(tmp_path / "ckpt")
    report = benchmark_script("serve_soak").run_soak(tmp_path / "ckpt", tmp_path)
    print(json.dumps(report, indent=1))
    routes, errors = report["routes"], report["errors"]
    statuses = {name: set(stats["by_status"]) for name, stats in routes.items()}
    waited, window = report["server_cpu"]["event_loop_runqueue_wait_s"], report["server_cpu"]["window_s"]
    starved = waited > STARVED * window
    late = {"504"} if starved else set()  # a server that gets no CPU cannot keep a deadline
    # always: only the answers the server means to give, every keyed write stored, nothing logged as an error
    assert statuses["health"] == {"200"}
    assert statuses["quiet"] <= {"200", "503"} | late and routes["quiet"]["by_status"]["503"]["n"] >= 5
    assert statuses["writes"] <= {"200", "503"} | late and "200" in statuses["writes"]
    # every acknowledged write is in the index, nothing else
    assert report["index_size_after"] == routes["writes"]["by_status"]["200"]["n"]
    # the flood's transport errors are reported, not asserted: see docs/serve.md (the probes, never starved of
    # their own CPU the way the flood is, would fail this test on one)
    assert statuses["flood"] <= {"200", "503"} | late, routes["flood"]
    assert errors["statuses_after_flood"] == [200] * 9
    assert errors["server_log_errors"] == 0, report["server_log_tail"]
    if starved:
        pytest.skip(
            f"latency bounds not checked: the server's event loop waited {waited} of {window:.0f} s for a CPU (load "
            f"average {report['machine']['load_average_1min_during']}); the machine, not the server, set the latencies"
        )
    # what the server controls, seen by clients that are not themselves overloaded
    assert routes["health"]["p99_s"] <= 1.0
    assert routes["quiet"]["by_status"]["503"]["p99_s"] <= 1.0
    assert routes["writes"]["by_status"].get("503", {"max_s": 0.0})["max_s"] <= 1.0
