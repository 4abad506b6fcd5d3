"""Ingest N items in batches into the embedded index and measure what the merge policy costs.

Each batch is one ``add`` of ``--batch`` items of ``(--num-vectors, --dim)`` vectors (one random batch reused
with new ids: the bytes written do not depend on the values, and generating 600,000 × 64 × 384 random
numbers would dominate the run). Prints and stores: items/s, the bytes this process wrote to disk
(``/proc/self/io`` write_bytes: every segment file, every merge, every manifest) divided by the final index
bytes (the write amplification), the peak bytes the index directory held (sampled every 50 ms, so a merge's
old and new segments both count), and that curve at checkpoints, next to the bound the policy guarantees:
``2 + floor(log_T(cap / batch bytes))`` (see metaembed/index/merge.py). Also: how long each ``add`` took
(median, p99, max, and how many of them ran a merge: with ``on_write`` merges run inside ``add``), the load
average sampled every 5 s during the run, and the least free disk seen; the run aborts (and removes the index)
when the disk's free space falls under ``--min-free-gib``.

    PYTHONPATH=src python benchmarks/ingest_merge.py --items 600000 --batch 1000 --path /work/ingest-bench \
        --json docs/bench/ingest-600k.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from metaembed.eval.report import write_json_atomic
from metaembed.index import create_index
from metaembed.index.merge import MergePolicy


def write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no write_bytes line")


def directory_bytes(path: Path) -> int:
    """Bytes of the files in ``path``, each file once (an in-place merge names its base's files twice a moment)."""
    total, seen = 0, set()
    for entry in os.scandir(path):
        with contextlib.suppress(FileNotFoundError):  # a merge removed it meanwhile
            st = entry.stat()
            if entry.is_file() and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


class PeakSampler(threading.Thread):
    """Peak directory bytes (every 50 ms), least free disk, and the 1-minute load average every 5 s."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.peak, self.stop = path, 0, threading.Event()
        self.min_free = shutil.disk_usage(path).free
        self.loads: list[float] = []

    def run(self) -> None:
        ticks = 0
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, directory_bytes(self.path))
            self.min_free = min(self.min_free, shutil.disk_usage(self.path).free)
            ticks += 1
            if ticks % 100 == 0:
                self.loads.append(os.getloadavg()[0])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--num-vectors", type=int, default=64)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--ratio", type=int, default=MergePolicy.ratio)
    parser.add_argument("--max-merged-gib", type=float, default=MergePolicy.max_merged_bytes / 2**30)
    parser.add_argument("--path", type=Path, required=True, help="a new directory for the index (removed after)")
    parser.add_argument("--checkpoints", type=int, default=12)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--min-free-gib", type=float, default=5.0, help="abort when the disk has less free")
    args = parser.parse_args()

    policy = MergePolicy(ratio=args.ratio, max_merged_bytes=int(args.max_merged_gib * 2**30))
    vectors = torch.nn.functional.normalize(torch.randn(args.batch, args.num_vectors, args.dim), dim=-1)
    load_before = os.getloadavg()
    shutil.rmtree(args.path, ignore_errors=True)
    ix = create_index(args.path, args.dim, args.num_vectors, dtype=args.dtype, merge_policy=policy)
    row = args.num_vectors * args.dim * {"fp32": 4, "bf16": 2, "int8": 1}[args.dtype]
    bound = 2 + math.floor(math.log(policy.max_merged_bytes / (args.batch * row), policy.ratio))
    sampler = PeakSampler(args.path)
    sampler.start()
    written0, start = write_bytes(), time.perf_counter()
    batches = math.ceil(args.items / args.batch)
    every = max(1, batches // args.checkpoints)
    curve, add_seconds, merging_adds = [], [], 0
    for b in range(batches):
        n = min(args.batch, args.items - b * args.batch)
        segments_before, t0 = len(ix.segments), time.perf_counter()
        ix.add([f"item-{b}-{j}" for j in range(n)], vectors[:n])
        add_seconds.append(time.perf_counter() - t0)
        merging_adds += len(ix.segments) <= segments_before  # the add's own segment was merged away
        if sampler.min_free < args.min_free_gib * 2**30:
            ix.close()
            shutil.rmtree(args.path, ignore_errors=True)
            raise SystemExit(f"aborted after {len(ix):,} items: under {args.min_free_gib} GiB free on the disk")
        if (b + 1) % every == 0 or b + 1 == batches:
            index_bytes = directory_bytes(args.path)
            point = {
                "items": len(ix),
                "seconds": round(time.perf_counter() - start, 1),
                "written_bytes": write_bytes() - written0,
                "index_bytes": index_bytes,
                "segments": len(ix.segments),
            }
            point["write_amplification"] = round(point["written_bytes"] / index_bytes, 3)
            curve.append(point)
            print(json.dumps(point), flush=True)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    final = curve[-1]
    result = {
        "items": args.items,
        "batch": args.batch,
        "shape": [args.num_vectors, args.dim],
        "dtype": args.dtype,
        "policy": {"ratio": policy.ratio, "max_merged_bytes": policy.max_merged_bytes},
        "items_per_s": round(args.items / seconds, 1),
        "seconds": round(seconds, 1),
        "written_bytes": final["written_bytes"],
        "index_bytes": final["index_bytes"],
        "write_amplification": final["write_amplification"],
        "write_amplification_bound": bound,
        "peak_index_bytes": max(sampler.peak, final["index_bytes"]),
        "segments": final["segments"],
        "add_seconds": {
            "median": round(percentile(add_seconds, 0.5), 3),
            "p99": round(percentile(add_seconds, 0.99), 3),
            "max": round(max(add_seconds), 3),
            "adds": len(add_seconds),
            "adds_that_merged": merging_adds,
        },
        "min_free_disk_bytes": sampler.min_free,
        "curve": curve,
        "load_average_before": load_before,
        "load_average_during": {
            "mean": round(sum(sampler.loads) / len(sampler.loads), 2) if sampler.loads else None,
            "max": round(max(sampler.loads), 2) if sampler.loads else None,
            "samples": len(sampler.loads),
        },
        "load_average_after": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }
    ix.close()
    shutil.rmtree(args.path, ignore_errors=True)
    print(
        f"{args.items:,} items in {seconds:.0f} s ({result['items_per_s']:.0f} items/s); wrote "
        f"{result['written_bytes'] / 1e9:.2f} GB for a {result['index_bytes'] / 1e9:.2f} GB index: "
        f"{result['write_amplification']:.3f}x (bound {bound}x); peak {result['peak_index_bytes'] / 1e9:.2f} GB; "
        f"{result['segments']} segments; load {load_before[0]:.1f} -> {result['load_average_after'][0]:.1f}; "
        f"add median {result['add_seconds']['median']:.2f} s, max {result['add_seconds']['max']:.2f} s "
        f"({merging_adds} of {len(add_seconds)} adds ran a merge)"
    )
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
