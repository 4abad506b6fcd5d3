"""The scoring profiler (the paper's Table 3): FLOPs, latency, index bytes and roofline per budget.

For each budget it scores a batch of queries (1,000 by default, as in the paper) against ``N`` random
candidates held in the index's prefix-grouped layout (vectors [0,1), [1,4), [4,8), [8,16), [16,64)), so a
budget reads only the bytes it needs, through the same kernel the index uses
(:func:`metaembed.index.kernels.maxsim_grouped`). Per query:

* ``flops`` = 2·N·r_q·r_c·D;
* ``latency_ms`` = batch time / batch size, median over ``repeats`` runs (``latency_ms_std`` its std,
  ``latency_ms_p99`` its 99th percentile; with ``queries=1`` these are one query's latency distribution);
* ``index_bytes`` = N·r_c·D·bytes per value (+ N·r_c·4 bytes of fp32 scales for int8);
* ``roofline_ms`` = max(batch FLOPs / GEMM peak, index bytes / bandwidth) / batch size, with both
  ceilings measured in the same process (:mod:`metaembed.bench.ceilings`): a batch streams the index once;
* ``ratio`` = latency / roofline (1.0 is the hardware limit);
* ``clock``: what timed the runs and the ceilings, ``thread_cpu`` (the calling thread's CPU time) on a CPU
  with one thread, else ``wall`` (:func:`metaembed.bench.ceilings.clock_for`).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from metaembed.bench.ceilings import (
    BenchError,
    CeilingError,
    Ceilings,
    bytes_per_value,
    clock_for,
    dtype_name,
    measure,
    timed,
)
from metaembed.budget import Budget

MAX_QUERIES = 1000
"""The paper's scoring batch (Table 3); the time-budgeted default never exceeds it."""
GROUP_BOUNDS = (0, 1, 4, 8, 16, 64)
"""The index's default prefix groups: a budget r_c reads groups up to r_c."""


@dataclass
class ScoringRow:
    budget: str
    flops: int
    latency_ms: float
    latency_ms_std: float
    latency_ms_p99: float
    index_bytes: int
    roofline_ms: float
    ratio: float
    batch_latency_ms: float
    queries: int
    n: int
    dim: int
    dtype: str
    device: str
    repeats: int
    clock: str = "wall"


def index_bytes(budget: Budget, n: int, dim: int, dtype: str) -> int:
    """Bytes a budget reads: N·r_c·D·bytes per value, plus N·r_c fp32 scales for int8."""
    scale_bytes = n * budget.r_c * 4 if dtype_name(dtype) == "int8" else 0
    return budget.index_bytes(n, dim, bytes_per_value(dtype)) + scale_bytes


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def stored_vectors(budgets: Sequence[Budget]) -> int:
    """How many vectors per candidate the groups must hold so every budget fits (a group boundary)."""
    need = max(b.r_c for b in budgets)
    for bound in GROUP_BOUNDS[1:]:
        if bound >= need:
            return bound
    return need


def random_groups(
    n: int, dim: int, stored: int, dtype: str, device: torch.device, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Random candidates in the grouped layout, written group by group without a large temporary."""
    name = dtype_name(dtype)
    bounds = [b for b in GROUP_BOUNDS if b < stored] + [stored]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    groups: list[torch.Tensor] = []
    scales: list[torch.Tensor | None] = []
    for lo, hi in itertools.pairwise(bounds):
        width = hi - lo
        if name == "int8":
            group = torch.randint(-127, 128, (n, width, dim), dtype=torch.int8, generator=gen)
            scale = torch.rand(n, width, generator=gen) * (3 / (127 * math.sqrt(dim)))
            groups.append(group.to(device))
            scales.append(scale.to(device))
            continue
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        group = torch.empty(n, width, dim, dtype=torch_dtype)
        step = max(1, (1 << 24) // (width * dim))
        for start in range(0, n, step):
            block = torch.randn(min(step, n - start), width, dim, generator=gen)
            group[start : start + step] = torch.nn.functional.normalize(block, dim=-1)
        groups.append(group.to(device))
        scales.append(None)
    return groups, scales


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object],
    repeats: int,
    device: torch.device | None = None,
    on_run: Callable[[], object] | None = None,
    clock: str = "wall",
) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn`` by ``clock`` after one warm-up call (buffers, kernel selection)."""
    fn()
    if device is not None:
        _sync(device)
    times = []
    for _ in range(repeats):
        times.append(timed(fn, clock, device) * 1e3)
        if on_run is not None:
            on_run()
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    lo = math.floor(position)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def profile_scoring(
    dim: int,
    n: int,
    budgets: Sequence[Budget] | None = None,
    *,
    dtype: str = "bf16",
    device: str = "cpu",
    queries: int | None = 1000,
    repeats: int = 10,
    seed: int = 0,
    ceilings: Ceilings | None = None,
    memory_fraction: float = 0.7,
    seconds: float = 60.0,
    progress: bool = False,
) -> tuple[list[ScoringRow], Ceilings]:
    """Time ``maxsim_grouped`` for a batch of ``queries`` at every budget; return the rows and the ceilings used.

    ``queries=None`` sizes the batch per budget so its timed runs take about ``seconds`` in all (one
    calibration call with one query per budget, at most :data:`MAX_QUERIES`): a CPU-sized run whose
    length does not depend on N and D. ``progress`` shows a bar over the timed runs on stderr.
    """
    from metaembed.index.kernels import maxsim_grouped

    budgets = list(budgets or Budget.LADDER)
    checks = [("dim", dim, 1), ("n", n, 1), ("repeats", repeats, 1), ("queries", 1 if queries is None else queries, 1)]
    for name, value, low in checks:
        if value < low:
            raise BenchError(f"--{name} must be at least {low}, got {value}")
    if queries is None and not seconds > 0:
        raise BenchError(f"--seconds must be positive, got {seconds}")
    try:
        name = dtype_name(dtype)
    except CeilingError as error:
        raise BenchError(str(error)) from error
    if name not in ("fp32", "bf16", "fp16", "int8"):
        raise BenchError(f"unknown dtype {dtype!r}; allowed: bf16, fp32, fp16, int8")
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda requested but torch.cuda.is_available() is False; use --device cpu")
    if torch_device.type not in ("cpu", "cuda"):
        raise BenchError(f"unknown device {device!r}; allowed: cpu, cuda")
    r_q_max = max(b.r_q for b in budgets)
    stored = stored_vectors(budgets)
    need = n * stored * dim * bytes_per_value(name) + (queries or MAX_QUERIES) * r_q_max * dim * 4
    available = _available_bytes()
    if torch_device.type == "cpu" and available is not None and need > memory_fraction * available:
        raise BenchError(
            f"the index ({n:,} candidates × {stored} vectors × D={dim} in {name}) needs {need / 2**30:.1f} GiB, "
            f"more than {memory_fraction:.0%} of the {available / 2**30:.1f} GiB available; lower --n or "
            f"the largest budget's r_c"
        )
    if progress:
        batch = f"{queries:,} queries" if queries else f"queries sized to take about {seconds:g} s"
        print(f"bench: generating {n:,} random candidates ({need / 2**30:.2f} GiB), then {batch}", file=sys.stderr)
    gen = torch.Generator().manual_seed(seed + 1)
    all_queries = torch.randn(queries or MAX_QUERIES, r_q_max, dim, generator=gen)
    all_queries = torch.nn.functional.normalize(all_queries, dim=-1).to(torch_device)
    groups, scales = random_groups(n, dim, stored, name, torch_device, seed)
    clock = clock_for(torch_device)
    if ceilings is None:
        ceilings = measure(torch_device, clock=clock)
    run_scales = scales if name == "int8" else None
    rows = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(budgets) * repeats, desc="bench scoring", unit="run", disable=not progress, mininterval=1)
    for budget in budgets:
        score = functools.partial(maxsim_grouped, groups=groups, budget=budget, scales=run_scales)
        batch = queries or _fit_queries(score, all_queries, seconds / len(budgets), repeats, torch_device, clock)
        bar.set_postfix_str(f"{budget}, {batch} queries")
        run = functools.partial(score, all_queries[:batch])
        times = time_ms(run, repeats, torch_device, on_run=bar.update, clock=clock)
        per_query = [t / batch for t in times]
        flops = budget.flops(n, dim)
        nbytes = index_bytes(budget, n, dim, name)
        roofline = ceilings.roofline_ms(flops * batch, nbytes, name) / batch
        latency = statistics.median(per_query)
        rows.append(
            ScoringRow(
                budget=str(budget),
                flops=flops,
                latency_ms=latency,
                latency_ms_std=statistics.stdev(per_query) if len(per_query) > 1 else 0.0,
                latency_ms_p99=percentile(per_query, 99),
                index_bytes=nbytes,
                roofline_ms=roofline,
                ratio=latency / roofline,
                batch_latency_ms=statistics.median(times),
                queries=batch,
                n=n,
                dim=dim,
                dtype=name,
                device=str(torch_device),
                repeats=repeats,
                clock=clock,
            )
        )
    bar.close()
    return rows, ceilings


def _fit_queries(
    score: Callable[[torch.Tensor], object],
    queries: torch.Tensor,
    seconds: float,
    repeats: int,
    device: torch.device,
    clock: str = "wall",
) -> int:
    """Queries per batch so that ``repeats`` timed runs take about ``seconds`` (from one timed 1-query call)."""
    one = max(time_ms(functools.partial(score, queries[:1]), 1, device, clock=clock)[0] / 1e3, 1e-6)
    # a batch amortises the index read, so per query it costs at most what one query alone does
    return max(1, min(len(queries), int(seconds / (repeats * one))))


def rows_as_dicts(rows: Sequence[ScoringRow], ceilings: Ceilings | None = None) -> list[dict]:
    """The rows as JSON-able dicts; with ``ceilings``, each row also carries the ceilings it was compared to."""
    extra = {} if ceilings is None else {"ceilings": ceilings.as_dict()}
    return [{**asdict(row), **extra} for row in rows]


def markdown_table(rows: Sequence[ScoringRow], ceilings: Ceilings) -> str:
    """A markdown table of the rows, headed by the ceilings they were compared against."""
    peaks = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in ceilings.peak_gflops.items())
    head = (
        f"ceilings ({ceilings.device}, {ceilings.threads} threads, clock {ceilings.clock}): "
        f"bandwidth {ceilings.bandwidth_gbs:.1f} GB/s"
    )
    lines = [
        f"{head}; {peaks}",
        "",
        "| budget | FLOPs / query | latency ms / query (median ± std) | index bytes | roofline ms / query | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.budget} | {row.flops / 1e9:,.2f} G | {row.latency_ms:,.3f} ± {row.latency_ms_std:,.3f} "
            f"| {row.index_bytes / 2**20:,.1f} MiB | {row.roofline_ms:,.3f} | {row.ratio:.2f}× |"
        )
    return "\n".join(lines)
