"""Loopback load test of ``metaembed serve``: N concurrent clients for D seconds, batching on and off.

Starts the real server (uvicorn) in a subprocess on 127.0.0.1 with a tiny random Qwen2-VL checkpoint
(or ``--model``), fills its index through ``/v1/index/add``, then runs ``--clients`` concurrent
keep-alive clients against ``/v1/search`` and ``/v1/embeddings`` for ``--seconds`` each and prints
throughput, p50 / p99 latency and errors, once with dynamic batching and once without. A benchmark,
not a test: nothing is asserted except that the server started. Timings on a shared 2-core machine
are noisy; compare the two modes from the same run.

    PYTHONPATH=src python benchmarks/serve_load.py --clients 32 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEY = "load-test-key-0123456789"
QUERIES = [
    "a red bicycle leaning on a wall",
    "quarterly revenue table",
    "two dogs running on the beach",
    "a cat sitting on a chair",
    "page about operating costs",
    "blue car in the rain",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkpoint(directory: Path) -> Path:
    import torch

    from metaembed import MetaEmbedModel
    from metaembed.model.tiny import make_tiny_backbone

    torch.manual_seed(0)
    model = MetaEmbedModel.from_backbone(make_tiny_backbone(directory / "backbone-src", "qwen2_vl"))
    return model.save_pretrained(directory / "checkpoint")


def start_server(
    model: Path, index: Path, port: int, batching: bool, threads: int, wait_ms: float, log: Path
) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "metaembed.cli", "serve", "--model", str(model), "--index", str(index),
        "--port", str(port), "--torch-threads", str(threads), "--log-level", "warning",
        "--max-batch-wait-ms", str(wait_ms),
    ]  # fmt: skip
    if not batching:
        command.append("--no-batching")
    env = {**os.environ, "METAEMBED_API_KEY": KEY, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_healthy(base: str, process: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy in time")


def fill_index(base: str, n_items: int) -> None:
    import httpx

    with httpx.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        if client.get("/health").json()["index_size"] >= n_items:
            return
        for start in range(0, n_items, 64):
            ids = [f"doc-{i}" for i in range(start, min(n_items, start + 64))]
            items = [f"document {i}: {QUERIES[i % len(QUERIES)]} variant {i * 7919 % 1000}" for i in range(len(ids))]
            response = client.post("/v1/index/add", json={"items": items, "ids": ids, "upsert": True})
            response.raise_for_status()


async def load(base: str, endpoint: str, clients: int, seconds: float, budget: str) -> dict:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(worker: int, client: httpx.AsyncClient) -> None:
        i = worker
        while time.perf_counter() < deadline:
            text = QUERIES[i % len(QUERIES)]
            i += clients
            if endpoint == "search":
                body = {"query": text, "budget": budget, "k": 10}
            else:
                body = {"input": [text], "input_type": "query", "budget": budget}
            start = time.perf_counter()
            try:
                response = await client.post(f"/v1/{endpoint}", json=body)
                ok = response.status_code == 200
                key = str(response.status_code)
            except httpx.HTTPError as error:
                ok, key = False, type(error).__name__
            if ok:
                latencies.append(time.perf_counter() - start)
            else:
                errors[key] = errors.get(key, 0) + 1

    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        began = time.perf_counter()
        await asyncio.gather(*(client_loop(w, client) for w in range(clients)))
        elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "endpoint": endpoint,
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "seconds": elapsed,
        "throughput_rps": len(latencies) / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
    }


def batch_counters(base: str) -> tuple[float, float]:
    """(items, batches) the server's encode worker has run so far, from its own /metrics."""
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("metaembed_encode_batch_items_sum", "metaembed_encode_batch_items_count")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("metaembed_encode_batch_items_sum", 0.0), values.get("metaembed_encode_batch_items_count", 0.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: a tiny random Qwen2-VL)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="per endpoint and mode")
    parser.add_argument("--items", type=int, default=1000, help="items in the index")
    parser.add_argument("--budget", default="4x8")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0, help="the server's batching wait")
    parser.add_argument("--endpoints", default="search,embeddings")
    parser.add_argument("--modes", default="on,off", help="batching modes to run: on, off or both")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="metaembed-load-") as tmp:
        tmp = Path(tmp)
        model = args.model or make_checkpoint(tmp)
        index = tmp / "index"
        for mode in args.modes.split(","):
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            log = tmp / f"server-{mode}.log"
            process = start_server(model, index, port, mode == "on", args.threads, args.max_batch_wait_ms, log)
            try:
                wait_healthy(base, process)
                fill_index(base, args.items)
                for endpoint in args.endpoints.split(","):
                    asyncio.run(load(base, endpoint, 4, 2.0, args.budget))  # warm-up
                    items_before, batches_before = batch_counters(base)
                    result = asyncio.run(load(base, endpoint, args.clients, args.seconds, args.budget))
                    items_after, batches_after = batch_counters(base)
                    result.update(batching=mode, clients=args.clients, budget=args.budget, items=args.items)
                    batches = batches_after - batches_before
                    result["mean_batch_items"] = round((items_after - items_before) / batches, 1) if batches else None
                    results.append(result)
                    print(json.dumps(result), flush=True)
            finally:
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                server_log = log.read_text()
                if process.returncode not in (0, -15):
                    print(server_log[-3000:], file=sys.stderr)
                problems = [line for line in server_log.splitlines() if "ERROR" in line or "WARNING" in line]
                if problems:  # say what the server logged (connection errors, exceptions), not only the count
                    print(f"server log ({mode}): " + " | ".join(problems[-10:]), file=sys.stderr)

    print(f"\n{args.clients} clients × {args.seconds:g} s per row, budget {args.budget}, {args.items} items, "
          f"server torch threads {args.threads}, batch wait {args.max_batch_wait_ms:g} ms, loopback")  # fmt: skip
    print("| endpoint | batching | requests | throughput (req/s) | p50 ms | p99 ms | errors | mean items / batch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['endpoint']} | {r['batching']} | {r['requests']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {r['errors']} | {r['mean_batch_items']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
