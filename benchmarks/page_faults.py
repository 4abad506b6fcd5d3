"""Wall time and page faults of a training-shaped allocation pattern, with and without huge pages for glibc.

Each child process applies ``metaembed train``'s allocator settings (blocks ≥ 128 KiB from ``mmap``), then runs
a loop whose large temporaries are allocated and freed every iteration (a (96·256, 384) × (384, 1536) matmul +
GELU, as one batch of a mini training step does per layer). One child runs with ``GLIBC_TUNABLES`` naming
``glibc.malloc.hugetlb=1`` (what ``metaembed train`` restarts itself with), one with ``=0``. Both are measured
in the same run, one after the other, with the machine's load average and the torch thread count.

    PYTHONPATH=src python benchmarks/page_faults.py [--iterations 20] [--json docs/bench/page-faults.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time, torch
from metaembed.train.memory import limit_heap_fragmentation
limit_heap_fragmentation()
torch.set_num_threads(1)
x, w = torch.randn(96 * 256, 384), torch.randn(384, 1536)
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(int(sys.argv[1])):
    torch.nn.functional.gelu(x @ w).sum()
wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": wall, "user_s": after.ru_utime - before.ru_utime,
                  "sys_s": after.ru_stime - before.ru_stime, "minor_faults": after.ru_minflt - before.ru_minflt}))
"""


def run(iterations: int, huge_pages: bool) -> dict:
    env = {**os.environ, "GLIBC_TUNABLES": f"glibc.malloc.hugetlb={int(huge_pages)}"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(iterations)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = {"4 KiB pages": run(args.iterations, False), "huge pages": run(args.iterations, True)}
    report = {
        "iterations": args.iterations,
        "threads": 1,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "runs": rows,
        "wall_ratio": rows["4 KiB pages"]["wall_s"] / rows["huge pages"]["wall_s"],
    }
    for name, row in rows.items():
        print(
            f"{name:12s} wall {row['wall_s']:7.2f} s  user {row['user_s']:6.2f} s  sys {row['sys_s']:6.2f} s  "
            f"minor faults {row['minor_faults']:>9,}"
        )
    print(
        f"wall-time ratio {report['wall_ratio']:.1f}x; load {load_before[0]:.1f} → "
        f"{report['load_average_after'][0]:.1f}, 1 torch thread, {report['cpus']} CPUs"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
