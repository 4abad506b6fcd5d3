"""``metaembed bench``: ``scoring`` (the paper's Table 3 against this machine's roofline) and ``ceilings``."""

from __future__ import annotations

import argparse
import json
import sys
import time

CPU_N = 20_000  # a run of about a minute on a 2-core CPU, index generation included
PAPER_N, PAPER_QUERIES = 100_000, 1_000  # Table 3: 100,000 candidates per query, a scoring batch of 1,000


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure scoring efficiency against this machine's limits")
    commands = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    scoring = commands.add_parser(
        "scoring",
        help="per budget: FLOPs, scoring latency, index bytes, roofline and ratio (the paper's Table 3)",
        description="Score a batch of random queries against N random candidates in the index layout at each "
        "budget; report per-query FLOPs, latency (median, std over --repeats runs), index bytes, and the "
        "roofline measured in the same process.",
    )
    scoring.add_argument("--dim", type=int, default=384, help="embedding dimension D (default 384, metaembed-mini's)")
    scoring.add_argument("--n", type=int, help=f"number of candidates N (default {CPU_N:,}; --paper: {PAPER_N:,})")
    scoring.add_argument("--budgets", default=None, help='budgets, e.g. "1x1 4x8 16x64" (default: the ladder)')
    scoring.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16", "int8"], help="index dtype")
    scoring.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    scoring.add_argument(
        "--queries", type=int, help="scoring batch size (default: sized per budget to fit --seconds; --paper: 1,000)"
    )
    scoring.add_argument("--seconds", type=float, default=60.0, help="time for all timed runs without --queries")
    scoring.add_argument(
        "--paper",
        action="store_true",
        help=f"the paper's Table 3 setting: N={PAPER_N:,}, {PAPER_QUERIES:,} queries × 10 runs (30+ min on 2 cores)",
    )
    scoring.add_argument("--repeats", type=int, default=10, help="timed runs per budget (default 10)")
    scoring.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    scoring.add_argument("--seed", type=int, default=0)
    scoring.add_argument("--json", action="store_true", help="print a JSON list of per-budget objects")
    scoring.set_defaults(func=run_scoring)

    ceilings = commands.add_parser("ceilings", help="measure bandwidth and GEMM peaks (about a second)")
    ceilings.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ceilings.add_argument("--threads", type=int, default=None)
    ceilings.add_argument("--json", action="store_true")
    ceilings.set_defaults(func=run_ceilings)


def _threads(value: int | None) -> None:
    import torch

    from metaembed.bench.scoring import BenchError

    if value is not None:
        if value < 1:
            raise BenchError(f"--threads must be at least 1, got {value}")
        torch.set_num_threads(value)


def run_scoring(args: argparse.Namespace) -> int:
    from metaembed.bench.scoring import markdown_table, profile_scoring, rows_as_dicts
    from metaembed.budget import Budget

    _threads(args.threads)
    began = time.perf_counter()
    n = args.n if args.n is not None else PAPER_N if args.paper else CPU_N
    queries = args.queries if args.queries is not None else PAPER_QUERIES if args.paper else None
    rows, ceilings = profile_scoring(
        args.dim,
        n,
        Budget.parse_many(args.budgets),
        dtype=args.dtype,
        device=args.device,
        queries=queries,
        repeats=args.repeats,
        seed=args.seed,
        seconds=args.seconds,
        progress=True,
    )
    if args.json:
        print(json.dumps(rows_as_dicts(rows, ceilings), indent=2))
    else:
        batches = ", ".join(f"{row.budget} {row.queries:,}" for row in rows)
        print(f"scoring × {n:,} candidates, D={args.dim}, {args.dtype}, {args.device}; queries per batch: {batches}")
        print(markdown_table(rows, ceilings))
    print(f"bench: done in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return 0


def run_ceilings(args: argparse.Namespace) -> int:
    from metaembed.bench.ceilings import measure

    _threads(args.threads)
    c = measure(args.device)
    if args.json:
        print(json.dumps(c.as_dict(), indent=2))
    else:
        print(f"{c.device}, {c.threads} threads, measured in {c.seconds:.1f} s, timed by the {c.clock} clock")
        print(f"streaming read bandwidth: {c.bandwidth_gbs:.1f} GB/s")
        for name, peak in c.peak_gflops.items():
            print(f"{name} GEMM peak: {peak:,.0f} GFLOP/s")
    return 0
