"""One flood process of serve_soak.py: CLIENTS connections without a key loop on /v1/embeddings for SECONDS.

Run as ``python serve_flood_client.py URL CLIENTS SECONDS``; prints one JSON object: the answers by status (or by
error type), every answer's latency by status as this process measured it, each transport error, and how much CPU
this process got. The CPU figures say whose time a slow 503 was: ``runqueue_wait_s`` is how long this process was
ready to run but waited for a core (from /proc/self/schedstat), which every latency it measures includes.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

import httpx

BODY = {"input": [f"flood text {i} " * 120 for i in range(8)]}  # 8 items of ~1,800 characters


def schedstat() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of this process's main thread."""
    with open("/proc/self/schedstat") as f:
        on_cpu, waiting, _ = (int(x) for x in f.read().split())
    return on_cpu / 1e9, waiting / 1e9


async def client(http: httpx.AsyncClient, url: str, stop: float, counts: dict[str, int], waits: dict, errors):
    while time.monotonic() < stop:
        start = time.perf_counter()
        try:
            response = await http.post(url + "/v1/embeddings", json=BODY, timeout=60)
            key = str(response.status_code)
            waits.setdefault(key, []).append(time.perf_counter() - start)
            if response.status_code == 503:
                await asyncio.sleep(float(response.headers.get("retry-after", "1")) / 10)
        except httpx.HTTPError as error:
            key = type(error).__name__
            errors.append([key, repr(error.__context__ or error)[:200], round(time.perf_counter() - start, 3)])
        counts[key] = counts.get(key, 0) + 1


async def main(url: str, clients: int, seconds: float) -> dict:
    counts: dict[str, int] = {}
    waits: dict[str, list[float]] = {}
    errors: list[list] = []
    cpu_before, wait_before = schedstat()
    wall = time.perf_counter()
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(limits=limits) as http:
        await asyncio.gather(*(client(http, url, stop, counts, waits, errors) for _ in range(clients)))
    cpu, waiting = schedstat()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "counts": counts,
        "latencies_s": waits,  # by status
        "transport_errors": errors,  # [type, the underlying error, seconds after the request was sent]
        "wall_s": time.perf_counter() - wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "main_thread_cpu_s": cpu - cpu_before,
        "runqueue_wait_s": waiting - wait_before,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))))
