"""Does the planner's predicted latency hold? Predict with `metaembed bench scoring`, then search a real index.

    PYTHONPATH=src python benchmarks/planner_check.py --quality docs/results/multi-slots-inputs-mmr/mmeb.json \
        --n 100000 --dim 384 --max-latency-ms 60 --out docs/results/planner

Back to back, in one process so the machine's load is the same for both halves:

1. ``metaembed bench scoring --n N --dim D --queries 1 --json`` → ``bench.json`` (one query's latency per budget
   on random vectors held in memory: the planner's cost source);
2. ``metaembed plan --quality ... --cost bench.json --n N --dim D --max-latency-ms T --json`` → ``plan.json``
   and ``plan.png`` (the frontier and the pick);
3. the embedded index of N random items (D, all 64 vectors, ``--dtype``, four segments), built before step 1
   so that nothing slow sits between prediction and check, is searched for one random query at a time at the
   pick's budget (k = 10), ``--repeats`` times after a warm-up; the measured p50 / p99 go into ``check.json``
   with the prediction, their ratio, the load average and thread count before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from metaembed.bench.scoring import percentile
from metaembed.budget import Budget
from metaembed.cli import main
from metaembed.eval.report import machine_state


def run_cli(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"metaembed {' '.join(argv)} exited {code}")
    return out.getvalue()


def build_index(path: Path, n: int, dim: int, dtype: str) -> None:
    """N random unit-vector items, all 64 vectors, written in four segments (as a growing index would be)."""
    from metaembed.index import create_index

    gen = torch.Generator().manual_seed(7)
    with create_index(path, dim, 64, dtype=dtype) as index:
        step = -(-n // 4)
        for lo in range(0, n, step):
            count = min(step, n - lo)
            vectors = torch.nn.functional.normalize(torch.randn(count, 64, dim, generator=gen), dim=-1)
            index.add([f"i{j}" for j in range(lo, lo + count)], vectors)


def time_index(path: Path, dim: int, budget: Budget, repeats: int) -> dict:
    """One random query at a time at ``budget``, k = 10: p50 / p99 ms over ``repeats`` after a warm-up."""
    from metaembed.index import open_index

    gen = torch.Generator().manual_seed(8)
    times = []
    with open_index(path, read_only=True) as index:
        queries = torch.nn.functional.normalize(torch.randn(repeats + 1, budget.r_q, dim, generator=gen), dim=-1)
        index.search(queries[:1], budget, k=10)  # warm-up: maps the files, first kernel call
        for i in range(1, repeats + 1):
            start = time.perf_counter()
            index.search(queries[i : i + 1], budget, k=10)
            times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": statistics.median(times), "p99_ms": percentile(times, 99), "runs": repeats}


def main_check() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quality", nargs="+", required=True)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32", "int8"))
    parser.add_argument("--max-latency-ms", type=float, required=True)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", help="folder for the temporary index (default: a temporary folder)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bench, plan = args.out / "bench.json", args.out / "plan.json"

    workdir = Path(tempfile.mkdtemp(prefix="planner-check-", dir=args.workdir))
    try:
        # the index is built first (untimed) so that prediction and check run back to back, under one load
        build_index(workdir / "index", args.n, args.dim, args.dtype)
        before = machine_state()
        size = f"--n {args.n} --dim {args.dim}".split()
        bench_argv = [
            "bench",
            "scoring",
            *size,
            "--dtype",
            args.dtype,
            "--queries",
            "1",
            "--repeats",
            str(args.repeats),
        ]
        bench.write_text(run_cli([*bench_argv, "--json"]))
        target = ["--max-latency-ms", str(args.max_latency_ms)]
        outputs = ["--json", "--out", str(plan), "--plot", str(args.out / "plan.png")]
        run_cli(["plan", "--quality", *args.quality, "--cost", str(bench), *size, *target, *outputs])
        predicted_at = machine_state()
        pick = json.loads(plan.read_text())["recommended"]
        if pick["setting"]["dtype"] != args.dtype:
            raise SystemExit(f"the plan picked {pick['name']}; the index was built in {args.dtype}")
        measured = time_index(workdir / "index", args.dim, Budget.parse(pick["setting"]["budget"]), args.repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    after = machine_state()
    check = {
        "command": "PYTHONPATH=src python benchmarks/planner_check.py " + " ".join(sys.argv[1:]),
        "n": args.n,
        "dim": args.dim,
        "pick": pick["name"],
        "predicted": {"p50_ms": pick["p50_ms"], "p99_ms": pick["p99_ms"], "source": pick["cost_source"]},
        "measured": measured,
        "p50_measured_over_predicted": measured["p50_ms"] / pick["p50_ms"],
        "within_20_percent": abs(measured["p50_ms"] / pick["p50_ms"] - 1) <= 0.2,
        "machine": {"before_bench": before, "after_plan": predicted_at, "after_index_search": after},
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    (args.out / "check.json").write_text(json.dumps(check, indent=2) + "\n")
    print(json.dumps({k: check[k] for k in ("pick", "predicted", "measured", "p50_measured_over_predicted")}, indent=2))


if __name__ == "__main__":
    main_check()
