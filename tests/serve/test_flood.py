"""A loopback soak test: 300 clients without a key flood /v1/embeddings while /health, keyed writes and a quiet
unkeyed client are probed.

The server (``metaembed serve`` on the tiny model), the flood (flood_client.py) and the probes each run in their own
processes, so the probes' timings are neither the flood's GIL nor its event loop: the latency bounds asserted are
what a client that is not itself overloaded sees. The flood's own 503 latencies are reported with how long its
processes waited for a CPU, not asserted (they are mostly that wait). Always asserted: the statuses, no keyed write
lost, every request after the flood answered, a server log without errors. The latency bounds need the server to
get a CPU: when its event loop spent more than half the flood runnable but waiting for one (a machine busy with
other work; the flood shares it too), they are not checked and the test says so (skipped, with the numbers).
Bounded: the flood stops after ``FLOOD_S`` seconds. Run with ``pytest -m slow tests/serve/test_flood.py -s``
(docs/serve.md has the numbers of runs).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from flood_client import BODY  # what each flood client sends

KEY = "flood-test-key-0123456789"
# Two flood processes: each is another task competing with the server for this machine's cores, and the flood's
# own latencies are not asserted, so more processes would only starve the server more.
CLIENTS, PROCESSES, FLOOD_S = 300, 2, 40
STARVED = 0.5  # share of the flood the server's event loop waited for a CPU beyond which latency says nothing
HERE = Path(__file__).resolve().parent
SRC = str(HERE.parents[1] / "src")
AFTER_SEARCHES = [("keyed item 0", None), ("keyed item 4", "1x1"), ("keyed item 8", "2x4"), ("anything", 1)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Threads:")))


def _schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a process's main thread (the server's event loop)."""
    with open(f"/proc/{pid}/schedstat") as f:
        on_cpu, waiting, _ = (int(x) for x in f.read().split())
    return on_cpu / 1e9, waiting / 1e9


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a whole process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _start_server(tmp_path: Path, model_dir: Path, port: int, log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "METAEMBED_API_KEY": KEY}
    return subprocess.Popen(
        [sys.executable, "-m", "metaembed.cli", "serve", "--model", str(model_dir), "--index", str(tmp_path / "index"),
         "--port", str(port), "--torch-threads", "1", "--log-level", "info"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _keyed_add(client: httpx.Client, url: str, n: int, auth: dict[str, str]) -> httpx.Response:
    return client.post(url + "/v1/index/add", json={"items": [f"keyed item {n}"], "ids": [f"k{n}"]}, headers=auth)


def _wait_healthy(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
        time.sleep(0.5)


def _probe(stop: threading.Event, period_s: float, request) -> list[tuple[int, float]]:
    """(status, seconds) of ``request(client)`` every ``period_s`` until ``stop``, on its own connection."""
    samples = []
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            start = time.perf_counter()
            status = request(client).status_code
            samples.append((status, time.perf_counter() - start))
            stop.wait(period_s)
    return samples


@pytest.mark.slow
def test_a_flood_without_a_key_gets_fast_503s_while_health_and_keyed_writes_stay_responsive(serve_model, tmp_path):
    serve_model.save_pretrained(tmp_path / "ckpt")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: a pipe nobody drains would block the server's logging
        server = _start_server(tmp_path, tmp_path / "ckpt", port, log)
    auth = {"Authorization": f"Bearer {KEY}"}
    ids = itertools.count()
    probes = {  # each in its own thread, so a slow answer to one never delays the others' samples
        "health": (0.25, lambda client: client.get(url + "/health")),
        # an unkeyed client like the flood's, but one that is not itself overloaded
        "quiet": (0.5, lambda client: client.post(url + "/v1/embeddings", json=BODY)),
        "writes": (1.0, lambda client: _keyed_add(client, url, next(ids), auth)),
    }
    try:
        _wait_healthy(url, server)
        flood_command = [sys.executable, str(HERE / "flood_client.py"), url, str(CLIENTS // PROCESSES), str(FLOOD_S)]
        floods = [subprocess.Popen(flood_command, stdout=subprocess.PIPE, text=True) for _ in range(PROCESSES)]
        threads, loads = [], []
        time.sleep(3)  # let the flood build up
        stop = threading.Event()
        with ThreadPoolExecutor(len(probes)) as pool:
            running = {name: pool.submit(_probe, stop, period, call) for name, (period, call) in probes.items()}
            loop_before, cpu_before, window_start = _schedstat(server.pid), _cpu_s(server.pid), time.monotonic()
            while any(flood.poll() is None for flood in floods):
                threads.append(_threads(server.pid))
                loads.append(os.getloadavg())
                time.sleep(1)
            loop_after, cpu_after, window = _schedstat(server.pid), _cpu_s(server.pid), time.monotonic() - window_start
            stop.set()
            health, quiet, writes = (running[name].result() for name in ("health", "quiet", "writes"))
        flooded = [json.loads(flood.communicate(timeout=120)[0]) for flood in floods]
        with httpx.Client(timeout=60) as client:
            after = [client.post(url + "/v1/embeddings", json={"input": ["after"]}).status_code for _ in range(5)]
            for query, budget in AFTER_SEARCHES:
                response = client.post(url + "/v1/search", json={"query": query, "k": 3, "budget": budget})
                after.append(response.status_code)
            index_size = client.get(url + "/health").json()["index_size"]
    finally:
        server.terminate()
        server.wait(60)
    server_log = log_path.read_text(errors="replace")
    counts: dict[str, int] = {}
    for part in flooded:
        for key, value in part["counts"].items():
            counts[key] = counts.get(key, 0) + value
    flood_503 = [seconds for part in flooded for seconds in part["latencies_503_s"]]
    health_s = [seconds for _, seconds in health]
    quiet_503 = [seconds for status, seconds in quiet if status == 503]
    report = {
        "health": {"n": len(health), "p50_s": _quantile(health_s, 0.5), "p99_s": _quantile(health_s, 0.99)},
        "health_statuses": sorted({status for status, _ in health}),
        "quiet_unkeyed": {
            "statuses": {str(s): sum(1 for status, _ in quiet if status == s) for s in {s for s, _ in quiet}},
            "503_p50_s": _quantile(quiet_503, 0.5),
            "503_p99_s": _quantile(quiet_503, 0.99),
            "503_max_s": max(quiet_503, default=0.0),
        },
        "keyed_writes": {str(s): sum(1 for status, _ in writes if status == s) for s in {s for s, _ in writes}},
        "keyed_write_max_s": max(seconds for _, seconds in writes),
        "keyed_503_max_s": max([seconds for status, seconds in writes if status == 503], default=0.0),
        "flood": {
            "counts": counts,
            "transport_errors": [error for part in flooded for error in part["transport_errors"]][:10],
            "503_p50_s": _quantile(flood_503, 0.5),
            "503_p99_s": _quantile(flood_503, 0.99),
            "503_over_1s": sum(1 for seconds in flood_503 if seconds > 1),
            "processes_cpu_s": [round(part["cpu_s"], 1) for part in flooded],
            "processes_runqueue_wait_s": [round(part["runqueue_wait_s"], 1) for part in flooded],
            "wall_s": round(max(part["wall_s"] for part in flooded), 1),
        },
        "server": {
            "window_s": round(window, 1),
            "process_cpu_s": round(cpu_after - cpu_before, 1),
            "event_loop_cpu_s": round(loop_after[0] - loop_before[0], 1),
            "event_loop_runqueue_wait_s": round(loop_after[1] - loop_before[1], 1),
        },
        "after": after,
        "index_size_after": index_size,
        "server_threads_max": max(threads),
        "load_average_1min": [min(a for a, _, _ in loads), max(a for a, _, _ in loads)],
    }
    print(json.dumps(report, indent=1))
    print(server_log[-3000:])
    waited = report["server"]["event_loop_runqueue_wait_s"]
    starved = waited > STARVED * window
    late = {"504"} if starved else set()  # a server that gets no CPU cannot keep a deadline
    # always: only the answers the server means to give, every keyed write stored, nothing logged as an error
    assert report["health_statuses"] == [200]
    assert set(report["quiet_unkeyed"]["statuses"]) <= {"200", "503"} | late and len(quiet_503) >= 5
    assert set(report["keyed_writes"]) <= {"200", "503"} | late and "200" in report["keyed_writes"]
    assert index_size == report["keyed_writes"]["200"]  # every acknowledged write is in the index, nothing else
    # the flood's transport errors are reported, not asserted: see docs/serve.md (the probes, never starved of
    # their own CPU the way the flood is, would fail this test on one)
    assert {key for key in counts if key.isdigit()} <= {"200", "503"} | late, counts
    assert after == [200] * (5 + len(AFTER_SEARCHES))
    assert "Traceback" not in server_log and "ERROR" not in server_log, server_log[-3000:]
    if starved:
        pytest.skip(
            f"latency bounds not checked: the server's event loop waited {waited} of {window:.0f} s for a CPU (load "
            f"average {report['load_average_1min']}); the machine, not the server, set the latencies above"
        )
    # what the server controls, seen by clients that are not themselves overloaded
    assert report["health"]["p99_s"] <= 1.0
    assert report["quiet_unkeyed"]["503_p99_s"] <= 1.0 and report["keyed_503_max_s"] <= 1.0
