"""Time per query of exact budgeted MaxSim at every ladder budget, next to this machine's roofline.

For N candidates (default 100,000) at D = 384 and D = 2048, one query (and optionally a query batch) is
scored through the index's kernel (`metaembed.index.kernels.maxsim_grouped`) over the prefix-grouped layout
(vectors [0,1), [1,4), [4,8), [8,16), [16,64) in separate arrays), so a budget reads only N·r_c·D values.
The roofline is measured in the same run (`metaembed.bench.ceilings`):
    floor = max(FLOPs / GEMM peak(dtype), bytes / streaming bandwidth), ratio = measured / floor.
Where a budget's vectors would not fit in --max-gib, N is scaled down for that budget (printed in the table).

    PYTHONPATH=src python benchmarks/maxsim_roofline.py                 # D=384 and 2048, bf16 and fp32
    PYTHONPATH=src python benchmarks/maxsim_roofline.py --dims 384 --dtypes int8 --batch 32

bf16 and int8 queries (one or a batch) run on the fused AVX512-BF16 / -VNNI kernel where it is built
(`metaembed.fused`); the `path` column says which engine ran, and `--gemm-baseline` also times the torch-GEMM
engine on the same data (bf16 widened
to fp32 there; the speed-up column is GEMM time / fused time, measured back to back). docs/kernels.md's tables come
from `benchmarks/kernel_claims.py`, which stores them as JSON.

Timings on a shared machine are noisy: the script prints `uptime` and the spread, and ceilings are re-measured
per (D, dtype) block so each ratio compares against the machine as it was at that moment.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics

import torch

from metaembed import Budget, fused
from metaembed.bench.ceilings import bytes_per_value, measure
from metaembed.bench.scoring import GROUP_BOUNDS, index_bytes, time_ms
from metaembed.index.kernels import maxsim_grouped


def make_groups(rows_per_group: list[int], dim: int, dtype: str, seed: int):
    """Random unit vectors (int8: codes + scales) in the grouped layout; group g holds rows_per_group[g] items."""
    gen = torch.Generator().manual_seed(seed)
    groups, scales = [], []
    for (lo, hi), rows in zip(itertools.pairwise(GROUP_BOUNDS), rows_per_group, strict=True):
        width = hi - lo
        if rows == 0:
            break
        if dtype == "int8":
            groups.append(torch.randint(-127, 128, (rows, width, dim), dtype=torch.int8, generator=gen))
            scales.append(torch.rand(rows, width, generator=gen) * (3 / (127 * dim**0.5)))
            continue
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        group = torch.empty(rows, width, dim, dtype=torch_dtype)
        step = max(1, (1 << 24) // (width * dim))
        for start in range(0, rows, step):
            block = torch.randn(min(step, rows - start), width, dim, generator=gen)
            group[start : start + step] = torch.nn.functional.normalize(block, dim=-1)
        groups.append(group)
        scales.append(None)
    return groups, scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32", "int8"])
    parser.add_argument("--budgets", default=None, help='e.g. "1x1 16x64" (default: the ladder)')
    parser.add_argument("--batch", type=int, default=0, help="also time a batch of this many queries (per query)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-gib", type=float, default=6.0, help="cap on one budget's candidate bytes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gemm-baseline", action="store_true", help="also time the torch-GEMM engine where fused runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = Budget.parse_many(args.budgets)
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N = {args.n:,}, repeats = {args.repeats}\n")
    print(f"fused kernel: {fused.status()}\n")
    print(
        "| D | dtype | budget | N | queries | path | ms / query (median ± std) | roofline ms | ratio | GB/s | GFLOP/s "
        "| GEMM ms | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dim, dtype in itertools.product(args.dims, args.dtypes):
        cap = int(args.max_gib * 2**30)
        n_of = {b: min(args.n, cap // (b.r_c * dim * bytes_per_value(dtype))) for b in budgets}
        rows = [max((n_of[b] for b in budgets if b.r_c > lo), default=0) for lo in GROUP_BOUNDS[:-1]]
        groups, scales = make_groups(rows, dim, dtype, seed=dim)
        ceilings = measure("cpu")
        gen = torch.Generator().manual_seed(1)
        for budget in budgets:
            n = n_of[budget]
            needed = sum(1 for lo in GROUP_BOUNDS[:-1] if lo < budget.r_c)  # groups holding vectors < r_c
            view = [g[:n] for g in groups[:needed]]
            view_scales = [s[:n] for s in scales[:needed]] if dtype == "int8" else None
            for nq in [1] + ([args.batch] if args.batch > 1 else []):
                q = torch.nn.functional.normalize(torch.randn(nq, 16, dim, generator=gen), dim=-1)
                run = functools.partial(maxsim_grouped, q, view, budget, view_scales)
                blocks = [(g, None) for g in view]  # int8 carries scales: always the GEMM engine
                path = "fused" if view_scales is None and fused.supports(q[:, : budget.r_q], blocks) else "GEMM"
                times = [t / nq for t in time_ms(run, args.repeats)]
                flops, nbytes = budget.flops(n, dim), index_bytes(budget, n, dim, dtype)
                roof = ceilings.roofline_ms(flops * nq, nbytes, dtype) / nq
                med = statistics.median(times)
                baseline = ""
                if args.gemm_baseline and path == "fused":
                    with fused.disabled():
                        gemm = statistics.median(t / nq for t in time_ms(run, args.repeats))
                    baseline = f" {gemm:,.2f} | {gemm / med:.1f}× |"
                spread = statistics.stdev(times)
                print(
                    f"| {dim} | {dtype} | {budget} | {n:,} | {nq} | {path} | {med:,.2f} ± {spread:,.2f} "
                    f"| {roof:,.2f} | {med / roof:.2f}× | {nbytes / nq / med / 1e6:,.1f} | {flops / med / 1e6:,.0f} |"
                    + (baseline or " | |"),
                    flush=True,
                )
        print(
            f"<!-- ceilings D={dim} {dtype}: {ceilings.bandwidth_gbs:.1f} GB/s, "
            + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in ceilings.peak_gflops.items())
            + f"; uptime {os.popen('uptime').read().strip()} -->",
            flush=True,
        )
        del groups, scales


if __name__ == "__main__":
    main()
