"""Every number in docs/kernels.md's results, from one command, into one JSON file.

    PYTHONPATH=src python benchmarks/kernel_claims.py --out docs/bench/kernels.json
    PYTHONPATH=src python benchmarks/kernel_claims.py --markdown docs/bench/kernels.json   # tables, no timing

Per round (``--rounds``, default 3) it records the machine state (``os.getloadavg()`` before and after, threads)
and re-measures the ceilings (streaming bandwidth, bf16 / fp32 / int8 GEMM peaks: ``metaembed.bench.ceilings``),
then times, per D and ladder budget, on random unit vectors in the index's grouped layout:

* ``bf16 1q``: one query through ``maxsim_grouped`` (the fused kernel where it runs);
* ``torch 1q``: the plain torch a practitioner writes on a dense ``(N, r_c, D)`` bf16 tensor: ``q @ cᵀ`` (bf16),
  ``amax`` over each item's vectors, ``sum`` over query vectors — the peer the headline speed-up is against;
* ``bf16 batch``: ``--batch`` queries in one call against ``--batch-n`` items (ms per query; fraction of the
  measured bf16 GEMM peak); with ``--batch-sizes``, also smaller batches against proportionally more items (their
  share of the peak, in one table);
* ``int8 1q``: one query against int8 groups with per-vector scales;
* ``strided`` (first D only): ``maxsim`` on a full ``(N, 64, D)`` tensor at the budget, against the same values
  as a dense prefix — the ratio full / dense.

Each timing is the median of ``--repeats`` calls after a warm-up; each cell stores one value per round, and the
tables show the median over rounds and the spread (min–max over rounds) of each time and ratio.

Clock (``"clock"`` in the JSON): with ``--threads 1`` every timing — the kernel, plain torch, the ceilings — is the
calling thread's CPU time (``time.thread_time()``, ``"thread_cpu"``), which leaves out time spent waiting for a core
on a loaded machine; a bandwidth measured so is the bandwidth while running. With more threads the work runs on
threads the calling thread's CPU time does not cover, so the clock is wall time (``"wall"``) and the numbers move
with the machine's load. The roofline of a cell is
``max(FLOPs / GEMM peak(dtype), bytes / bandwidth)`` with that round's ceilings. N is capped so one budget's
candidates fit ``--max-gib`` (printed per cell).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch

from metaembed import Budget, fused, maxsim
from metaembed.bench.ceilings import clock_for, measure
from metaembed.bench.scoring import GROUP_BOUNDS, index_bytes, time_ms
from metaembed.index.kernels import maxsim_grouped


def machine() -> dict:
    """CPU model, family / model numbers and the vector extensions that decide which engine runs."""
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "fused_kernel": fused.status()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return info
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    for key in ("Model name", "CPU family", "Model", "L2 cache", "L3 cache"):
        if key in fields:
            info[key.lower().replace(" ", "_")] = fields[key].strip()
    flags = fields.get("Flags", "").split()
    info["extensions"] = [f for f in ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return info


CLOCK_NOTES = {
    "thread_cpu": "the calling thread's CPU time (time.thread_time()): one thread does all the work, and time spent "
    "waiting for a core is left out",
    "wall": "wall time (time.perf_counter()): more than one thread works, which one thread's CPU time does not "
    "cover, so the numbers include time spent waiting for a core on a loaded machine",
}


# Environment variables that change what is measured: torch's CPU allocator asks for transparent huge pages with
# THP_MEM_ALLOC_ENABLE=1 (a full (N, 64, D) tensor read at a small budget touches a new 4 KiB page per item).
def environment_set() -> list[str]:
    return [f"{k}={os.environ[k]}" for k in ("THP_MEM_ALLOC_ENABLE",) if k in os.environ]


def median_ms(fn, repeats: int, per: int = 1, clock: str = "wall") -> float:
    return statistics.median(t / per for t in time_ms(fn, repeats, clock=clock))


def torch_peer(q: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Plain torch: one bf16 GEMM, the max over each item's vectors, the sum over query vectors."""
    n, r_c, dim = dense.shape
    sims = q[0] @ dense.view(n * r_c, dim).T
    return sims.view(-1, n, r_c).amax(dim=2).float().sum(dim=0, keepdim=True)


def unit_queries(nq: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(nq, 16, dim, generator=gen), dim=-1)


def grouped(
    rows: list[int], dim: int, dtype: str, seed: int, bounds: tuple[int, ...] = GROUP_BOUNDS
) -> tuple[list[torch.Tensor], list]:
    """Random unit vectors (int8: codes and scales) in groups of vectors [bounds[g], bounds[g + 1]); group g holds
    ``rows[g]`` items (groups with 0 rows are left out)."""
    groups, scales = [], []
    for (lo, hi), n in zip(itertools.pairwise(bounds), rows, strict=False):
        if n:
            gen = torch.Generator().manual_seed(seed + lo)
            if dtype == "int8":
                groups.append(torch.randint(-127, 128, (n, hi - lo, dim), dtype=torch.int8, generator=gen))
                scales.append(torch.rand(n, hi - lo, generator=gen) * (3 / (127 * dim**0.5)))
                continue
            group = torch.empty(n, hi - lo, dim, dtype=torch.bfloat16)
            for start in range(0, n, 4096):
                block = torch.randn(min(4096, n - start), hi - lo, dim, generator=gen)
                group[start : start + 4096] = torch.nn.functional.normalize(block, dim=-1)
            groups.append(group)
            scales.append(None)
    return groups, scales


def one_round(args, budgets: list[Budget], record) -> dict:
    load_before = os.getloadavg()
    clock = args.clock
    ceilings = measure("cpu", clock=clock)
    state = {
        "load_before": load_before,
        "threads": torch.get_num_threads(),
        "clock": clock,
        "ceilings": ceilings.as_dict(),
    }
    print(f"round: load {load_before}, ceilings {ceilings.bandwidth_gbs:.1f} GB/s {ceilings.peak_gflops}", flush=True)
    for d_index, dim in enumerate(args.dims):
        cap = int(args.max_gib * 2**30)
        n_of = {b: min(args.n, cap // (b.r_c * dim * 2)) for b in budgets}
        # group g holds as many items as the largest N of a budget that reads it (no more: memory is shared)
        rows = [max((n_of[b] for b in budgets if b.r_c > lo), default=0) for lo in GROUP_BOUNDS[:-1]]
        groups, _ = grouped(rows, dim, "bf16", dim)
        codes, scales = grouped(rows, dim, "int8", dim + 1)
        q1, qb = unit_queries(1, dim, 1), unit_queries(max([args.batch, *args.batch_sizes]), dim, 2)
        for budget in budgets:
            n = n_of[budget]
            needed = sum(1 for lo in GROUP_BOUNDS[:-1] if lo < budget.r_c)
            view = [g[:n] for g in groups[:needed]]
            flops = budget.flops(n, dim)
            cell = {"dim": dim, "budget": str(budget), "n": n}
            ms = median_ms(partial(maxsim_grouped, q1, view, budget), args.repeats, clock=clock)
            roof = ceilings.roofline_ms(flops, index_bytes(budget, n, dim, "bf16"), "bf16")
            dense = torch.cat(view, dim=1)[:, : budget.r_c].contiguous()
            qr = q1[:, : budget.r_q].to(torch.bfloat16)
            peer = median_ms(partial(torch_peer, qr, dense), args.repeats, clock=clock)
            record("bf16 1q", cell, ms=ms, roofline_ms=roof, torch_ms=peer)
            for nb in sorted({args.batch, *args.batch_sizes}):
                # a smaller batch scores proportionally more items, so every call does the same work and the
                # per-call cost (checks, dispatch) weighs the same for every batch size
                batch_n = min(n, args.batch_n * max(1, args.batch // nb))
                batch_view = [g[:batch_n] for g in view]
                ms_b = median_ms(
                    partial(maxsim_grouped, qb[:nb], batch_view, budget), max(1, args.repeats // 2), per=nb, clock=clock
                )
                roof_b = ceilings.roofline_ms(
                    budget.flops(batch_n, dim) * nb, index_bytes(budget, batch_n, dim, "bf16"), "bf16"
                )
                peak_share = budget.flops(batch_n, dim) / (ms_b * 1e6) / ceilings.peak("bf16")
                where = dict(cell, n=batch_n)
                record(f"bf16 batch {nb}", where, ms=ms_b, roofline_ms=roof_b / nb, bf16_peak_share=peak_share)
            code_view, scale_view = [g[:n] for g in codes[:needed]], [s[:n] for s in scales[:needed]]
            ms_i = median_ms(
                partial(maxsim_grouped, q1, code_view, budget, scale_view), max(1, args.repeats // 2), clock=clock
            )
            roof_i = ceilings.roofline_ms(flops, index_bytes(budget, n, dim, "int8"), "int8")
            record("int8 1q", cell, ms=ms_i, roofline_ms=roof_i, bf16_ms=ms)
            del dense
        del groups, codes, scales
        if d_index == 0:
            strided(args, budgets, dim, record)
    state["load_after"] = os.getloadavg()
    return state


def strided(args, budgets: list[Budget], dim: int, record) -> None:
    n = min(args.n, int(args.strided_gib * 2**30) // (64 * dim * 2))
    (full,), _ = grouped([n], dim, "bf16", 7, bounds=(0, 64))
    q1 = unit_queries(1, dim, 3)
    for budget in budgets:
        if budget.r_c == 64:
            continue  # the full tensor is its own dense prefix
        dense = full[:, : budget.r_c].contiguous()
        ms_full = median_ms(partial(maxsim, q1, full, budget), args.repeats, clock=args.clock)
        ms_dense = median_ms(partial(maxsim, q1, dense, budget), args.repeats, clock=args.clock)
        record("strided", {"dim": dim, "budget": str(budget), "n": n}, ms=ms_full, dense_ms=ms_dense)
        del dense
    del full


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    args.clock = clock_for("cpu")
    print(f"clock: {args.clock} — {CLOCK_NOTES[args.clock]}", flush=True)
    budgets = Budget.parse_many(args.budgets)
    cells: dict[tuple, dict] = {}

    def record(engine: str, where: dict, **values: float) -> None:
        key = (engine, where["dim"], where["budget"])
        cell = cells.setdefault(key, {"engine": engine, **where, **{k: [] for k in values}})
        for name, value in values.items():
            cell[name].append(value)
        print(f"  {engine:>14} D={where['dim']} {where['budget']:>5} N={where['n']:,}: "
              + ", ".join(f"{k} {v:,.3f}" for k, v in values.items()), flush=True)  # fmt: skip

    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    rounds = [one_round(args, budgets, record) for _ in range(args.rounds)]
    return {
        "command": " ".join([*environment_set(), "PYTHONPATH=src python benchmarks/kernel_claims.py", *sys.argv[1:]]),
        "started_utc": started,
        "finished_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "torch": torch.__version__,
        "clock": args.clock,
        "clock_note": CLOCK_NOTES[args.clock],
        "batch": args.batch,
        "rounds": rounds,
        "cells": list(cells.values()),
    }


def _summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _ratios(cell: dict, top: str, bottom: str) -> tuple[float, float, float]:
    return _summary([a / b for a, b in zip(cell[top], cell[bottom], strict=True)])


def _ms(values: list[float], digits: int = 2) -> str:
    """Median ms and its range over rounds: ``12.30 (11.90–13.10)``."""
    ms, lo, hi = _summary(values)
    return f"{ms:,.{digits}f} ({lo:,.{digits}f}–{hi:,.{digits}f})"


def _lead(cell: dict, ratio: tuple[float, float, float], digits: int = 2) -> str:
    """The first cells of a row: D, budget, N, median ms (min–max), and a ratio's median (min–max)."""
    r, lo, hi = ratio
    ms = _ms(cell["ms"], digits)
    return f"| {cell['dim']} | {cell['budget']} | {cell['n']:,} | {ms} | {r:.2f}× ({lo:.2f}–{hi:.2f}) "


def markdown(result: dict) -> str:
    """The tables docs/kernels.md shows, from a stored result."""
    out = []
    loads = [r["load_before"][0] for r in result["rounds"]] + [r["load_after"][0] for r in result["rounds"]]
    bw = [r["ceilings"]["bandwidth_gbs"] for r in result["rounds"]]
    bf16 = [r["ceilings"]["peak_gflops"]["bf16"] for r in result["rounds"]]
    m = result["machine"]
    note = result.get("clock_note")
    clock = f"`{result.get('clock', 'wall')}`" + (f", {note}" if note else "")
    out.append(
        f"`{result['command']}` ({result['started_utc']} – {result['finished_utc']}; {m.get('model_name', '?')}, "
        f"family {m.get('cpu_family', '?')} model {m.get('model', '?')}, {', '.join(m.get('extensions', []))}; "
        f"{result['rounds'][0]['threads']} threads; {len(result['rounds'])} rounds; 1-min load average "
        f"{min(loads):.1f}–{max(loads):.1f}; ceilings per round: {', '.join(f'{x:.1f}' for x in bw)} GB/s, "
        f"bf16 {', '.join(f'{x:,.0f}' for x in bf16)} GFLOP/s). Clock: {clock}. "
        "Medians over rounds; ranges (in brackets) are min–max over rounds."
    )
    by = {}
    for cell in result["cells"]:
        by.setdefault(cell["engine"], []).append(cell)
    out.append("\n| D | budget | N | bf16 1 query ms | ratio to roofline | plain torch ms | speed-up vs torch |")
    out.append("|---|---|---|---|---|---|---|")
    for c in by.get("bf16 1q", []):
        s, slo, shi = _ratios(c, "torch_ms", "ms")
        out.append(
            _lead(c, _ratios(c, "ms", "roofline_ms")) + f"| {_ms(c['torch_ms'])} | {s:.2f}× ({slo:.2f}–{shi:.2f}) |"
        )
    main = f"bf16 batch {result.get('batch', 32)}"
    out.append(f"\n| D | budget | N | {main}: ms / query | ratio to roofline | share of bf16 GEMM peak |")
    out.append("|---|---|---|---|---|---|")
    for c in by.get(main, []):
        p, plo, phi = _summary(c["bf16_peak_share"])
        out.append(_lead(c, _ratios(c, "ms", "roofline_ms"), 3) + f"| {p:.0%} ({plo:.0%}–{phi:.0%}) |")
    sizes = sorted(int(e.rsplit(" ", 1)[1]) for e in by if e.startswith("bf16 batch "))
    if len(sizes) > 1:  # every batch size's share of the bf16 GEMM peak (median over rounds), one row per cell
        top = result.get("batch", 32)
        head = f"N for {top} (a batch of k: {top}/k times as many)"
        out.append(f"\n| D | budget | {head} | " + " | ".join(f"batch of {k}: share of peak" for k in sizes) + " |")
        out.append("|---|---|---|" + "---|" * len(sizes))
        for c in by[main]:
            shares = [_summary(x["bf16_peak_share"])[0] for k in sizes for x in by[f"bf16 batch {k}"]
                      if (x["dim"], x["budget"]) == (c["dim"], c["budget"])]  # fmt: skip
            out.append(f"| {c['dim']} | {c['budget']} | {c['n']:,} | " + " | ".join(f"{x:.0%}" for x in shares) + " |")
    out.append("\n| D | budget | N | int8 1 query ms | ratio to int8 roofline | int8 / bf16 time |")
    out.append("|---|---|---|---|---|---|")
    for c in by.get("int8 1q", []):
        s, slo, shi = _ratios(c, "ms", "bf16_ms")
        out.append(_lead(c, _ratios(c, "ms", "roofline_ms")) + f"| {s:.2f}× ({slo:.2f}–{shi:.2f}) |")
    out.append("\n| D | budget | N | full (N, 64, D) ms | full / dense prefix | dense prefix ms |")
    out.append("|---|---|---|---|---|---|")
    for c in by.get("strided", []):
        out.append(_lead(c, _ratios(c, "ms", "dense_ms")) + f"| {_ms(c['dense_ms'])} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/bench/kernels.json"))
    parser.add_argument("--markdown", type=Path, help="print the tables of a stored result and exit")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 2048])
    parser.add_argument("--budgets", default=None, help='e.g. "1x1 16x64" (default: the ladder)')
    parser.add_argument("--max-gib", type=float, default=1.0, help="cap on one budget's bf16 candidate bytes")
    parser.add_argument("--strided-gib", type=float, default=2.0, help="size of the full (N, 64, D) tensor")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[], help="smaller batches, e.g. 2 4 8 16")
    parser.add_argument("--batch-n", type=int, default=4096, help="items the batch is scored against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
