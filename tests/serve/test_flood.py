"""A loopback soak test: 300 clients without a key flood /v1/embeddings while /health and keyed writes are probed.

The server (``metaembed serve`` on the tiny model) and the flood each run in their own process, so the probe's
timings are not the flood's GIL. Bounded: the flood stops after ``FLOOD_S`` seconds. Run with
``pytest -m slow tests/serve/test_flood.py -s`` (docs/serve.md has the numbers of a run).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

KEY = "flood-test-key-0123456789"
CLIENTS, FLOOD_S = 300, 40
SRC = str(Path(__file__).resolve().parents[2] / "src")

FLOOD = """
    import asyncio, json, sys, time
    import httpx

    url, clients, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    body = {"input": [("flood text %d " % i) * 120 for i in range(8)]}  # 8 items of ~1,800 characters
    counts, slow_503 = {}, 0

    async def client(http, stop):
        nonlocal_slow = 0
        while time.monotonic() < stop:
            start = time.monotonic()
            try:
                response = await http.post(url + "/v1/embeddings", json=body, timeout=60)
                key = str(response.status_code)
                if response.status_code == 503 and time.monotonic() - start > 1:
                    nonlocal_slow += 1
                if response.status_code == 503:
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")) / 10)
            except httpx.HTTPError as error:
                key = type(error).__name__
            counts[key] = counts.get(key, 0) + 1
        return nonlocal_slow

    async def main():
        stop = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
        async with httpx.AsyncClient(limits=limits) as http:
            slow = await asyncio.gather(*(client(http, stop) for _ in range(clients)))
        print(json.dumps({"counts": counts, "slow_503": sum(slow)}))

    asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _threads(pid: int) -> int:
    return int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("Threads:")))


@pytest.mark.slow
def test_a_flood_without_a_key_gets_fast_503s_while_health_and_keyed_writes_stay_responsive(serve_model, tmp_path):
    serve_model.save_pretrained(tmp_path / "ckpt")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": SRC, "METAEMBED_API_KEY": KEY}
    server = subprocess.Popen(
        [sys.executable, "-m", "metaembed.cli", "serve", "--model", str(tmp_path / "ckpt"), "--index",
         str(tmp_path / "index"), "--port", str(port), "--torch-threads", "1", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
            time.sleep(0.5)
        flood = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(FLOOD), url, str(CLIENTS), str(FLOOD_S)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        health, writes, threads, loads = [], [], [], []
        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(timeout=60) as probe:
            time.sleep(3)  # let the flood build up
            n = 0
            while flood.poll() is None:
                start = time.monotonic()
                status = probe.get(url + "/health").status_code
                health.append((status, time.monotonic() - start))
                if n % 4 == 0:
                    start = time.monotonic()
                    body = {"items": [f"keyed item {n}"], "ids": [f"k{n}"]}
                    status = probe.post(url + "/v1/index/add", json=body, headers=auth).status_code
                    writes.append((status, time.monotonic() - start))
                    threads.append(_threads(server.pid))
                    loads.append(os.getloadavg()[0])
                n += 1
                time.sleep(0.25)
            out, _ = flood.communicate(timeout=120)
            flooded = json.loads(out)
            after = [probe.post(url + "/v1/embeddings", json={"input": ["after"]}).status_code for _ in range(5)]
            after.append(probe.post(url + "/v1/search", json={"query": "keyed item 0", "k": 1}).status_code)
    finally:
        server.terminate()
        _, server_err = server.communicate(timeout=60)
    latencies = sorted(seconds for _, seconds in health)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    report = {
        "health_requests": len(health),
        "health_p50_s": latencies[len(latencies) // 2],
        "health_p99_s": p99,
        "health_statuses": sorted({status for status, _ in health}),
        "keyed_writes": {str(s): sum(1 for status, _ in writes if status == s) for s in {s for s, _ in writes}},
        "keyed_write_max_s": max(seconds for _, seconds in writes),
        "keyed_503_max_s": max([seconds for status, seconds in writes if status == 503], default=0.0),
        "flood": flooded,
        "after": after,
        "server_threads_max": max(threads),
        "load_average_1min": [min(loads), max(loads)],
    }
    print(json.dumps(report, indent=1))
    print(server_err[-3000:])
    assert p99 <= 1.0 and set(report["health_statuses"]) == {200}
    assert set(report["keyed_writes"]) <= {"200", "503"} and report["keyed_503_max_s"] <= 1.0
    assert "200" in report["keyed_writes"]
    # 503s are answered before the body is read; "slow_503" (over 1 s) is measured at the client, whose 300
    # connections share one Python process and the machine's cores, so it is reported, not asserted
    assert "504" not in flooded["counts"]
    assert not any(status >= 500 and status != 503 for status in map(int, filter(str.isdigit, flooded["counts"])))
    assert after == [200] * 6
    assert "Traceback" not in server_err and "Exception in ASGI application" not in server_err
