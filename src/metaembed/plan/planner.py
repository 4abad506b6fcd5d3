"""The budget planner: measured quality × measured cost → the Pareto frontier and one recommended setting.

A **setting** is a budget, a storage dtype and a search mode (exhaustive or two-stage). Its quality comes from
``metaembed eval`` result files; its scoring latency (p50 / p99 of one query) from ``metaembed bench scoring``
rows or a measurement on the spot, predicted at the index's N by scaling linearly in N (exhaustive scoring
reads every item once, so its time is proportional to N once the per-call overhead is small); its index bytes
are exact: ``N · r_c · (D · bytes per value + 4 for int8's scale)`` — what an index that keeps ``r_c`` vectors
per item stores, and what one exhaustive query reads (two-stage adds its HNSW graph, estimated).

Reading those measurements, and which of them count as measured for which setting, is
:mod:`metaembed.plan.measurements`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from metaembed.budget import Budget
from metaembed.plan.measurements import CostRow, PlanError, Quality, Setting, quality_for

BYTES_PER_VALUE = {"fp32": 4, "bf16": 2, "int8": 1}
HNSW_LINK_BYTES = 2 * 32 * 4  # faiss HNSW, M = 32: 2·M int32 neighbour ids per item on level 0


@dataclass
class Option:
    """A setting with its predicted numbers at the plan's N."""

    setting: Setting
    quality: float
    quality_source: str
    quality_measured: bool
    p50_ms: float
    p99_ms: float | None
    cost_source: str
    bytes_per_item: int
    index_bytes: int
    frontier: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["setting"] = {"budget": str(self.setting.budget), "dtype": self.setting.dtype, "mode": self.setting.mode}
        out["name"] = str(self.setting)
        return out


@dataclass
class Target:
    """Exactly one constraint: latency (ms, on ``stat``), bytes (per item or whole index), or quality (fraction)."""

    max_latency_ms: float | None = None
    max_bytes_per_item: float | None = None
    max_index_bytes: float | None = None
    min_quality: float | None = None
    stat: str = "p50"

    def __post_init__(self) -> None:
        given = [
            name
            for name in ("max_latency_ms", "max_bytes_per_item", "max_index_bytes", "min_quality")
            if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise PlanError(
                "give exactly one target: --max-latency-ms, --max-bytes-per-item, --max-index-gb or --min-quality"
                + (f" (got {', '.join(given)})" if given else "")
            )
        value = getattr(self, given[0])
        if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise PlanError(f"{given[0]} must be a positive number, got {value!r}")
        if self.stat not in ("p50", "p99"):
            raise PlanError(f"the latency statistic is p50 or p99, got {self.stat!r}")

    def describe(self) -> str:
        if self.max_latency_ms is not None:
            return f"{self.stat} scoring latency ≤ {self.max_latency_ms:g} ms"
        if self.max_bytes_per_item is not None:
            return f"index bytes per item ≤ {self.max_bytes_per_item:,.0f}"
        if self.max_index_bytes is not None:
            return f"index size ≤ {self.max_index_bytes / 1e9:g} GB"
        return f"quality ≥ {100 * self.min_quality:g} %"


# ------------------------------------------------------------------------------------------- the plan
def item_bytes(budget: Budget, dim: int, dtype: str, mode: str) -> int:
    """Index bytes per item of a setting: its r_c vectors (+ int8 scales), + the HNSW graph for two-stage."""
    size = budget.r_c * (dim * BYTES_PER_VALUE[dtype] + (4 if dtype == "int8" else 0))
    if mode == "two-stage":
        size += 4 * dim + HNSW_LINK_BYTES  # faiss IndexHNSWFlat keeps an fp32 copy of vector 0 and its links
    return size


def predict(rows: Sequence[CostRow], setting: Setting, n: int, dim: int) -> tuple[float, float | None, str] | None:
    """p50 / p99 ms of one query at ``n`` items from the closest measurement of the same setting and D."""
    same = [r for r in rows if (r.budget, r.dtype, r.mode) == (setting.budget, setting.dtype, setting.mode)]
    same = [r for r in same if r.dim == dim]
    if not same:
        return None
    row = min(same, key=lambda r: (abs(math.log(r.n / n)), r.queries))
    scale = n / row.n if setting.mode == "exhaustive" else 1.0  # a two-stage rerank reads a shortlist, not N
    source = row.source if row.n == n else f"{row.source}, N = {row.n:,} scaled ×{scale:.3g}"
    if row.queries > 1:
        source += f" (per query of a {row.queries}-query batch: below one query's latency)"
    p99 = row.p99_ms * scale if row.p99_ms is not None else None
    return row.p50_ms * scale, p99, source


def options(
    quality: dict[tuple[Budget, str | None, str], Quality], costs: Sequence[CostRow], n: int, dim: int
) -> list[Option]:
    """Every setting that has a quality and a cost, with its numbers at ``n`` items."""
    budgets = sorted({key[0] for key in quality})
    settings = sorted({Setting(b, r.dtype, r.mode) for r in costs for b in budgets})
    out = []
    for setting in settings:
        q = quality_for(setting, quality)
        cost = predict(costs, setting, n, dim)
        if q is None or cost is None:
            continue
        p50, p99, source = cost
        per_item = item_bytes(setting.budget, dim, setting.dtype, setting.mode)
        out.append(Option(setting, q.value, q.source, q.measured, p50, p99, source, per_item, per_item * n))
    if not out:
        have = sorted({f"{r.budget} {r.dtype} {r.mode} D={r.dim}" for r in costs})
        raise PlanError(
            f"no setting has both a quality and a cost at D = {dim}: quality budgets {[str(b) for b in budgets]}, "
            f"costs {have[:8]}"
        )
    return out


def _latency(option: Option, stat: str) -> float:
    if stat == "p99":
        if option.p99_ms is None:
            raise PlanError(f"{option.setting}: its cost file has no p99 (rerun metaembed bench scoring)")
        return option.p99_ms
    return option.p50_ms


def mark_frontier(candidates: Sequence[Option], stat: str = "p50") -> None:
    """Set ``frontier`` on the options no other beats or ties on quality, latency and bytes together."""

    def key(o: Option) -> tuple[float, float, float]:
        return (-o.quality, _latency(o, stat), float(o.index_bytes))

    for option in candidates:
        mine = key(option)
        option.frontier = not any(
            all(a <= b for a, b in zip(key(other), mine, strict=True)) and key(other) != mine
            for other in candidates
            if other is not option
        )


@dataclass
class Plan:
    n: int
    dim: int
    target: Target
    options: list[Option]
    recommended: Option
    why: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "dim": self.dim,
            "target": {**asdict(self.target), "text": self.target.describe()},
            "recommended": self.recommended.as_dict(),
            "why": self.why,
            "frontier": [str(o.setting) for o in self.options if o.frontier],
            "options": [o.as_dict() for o in self.options],
            "notes": self.notes,
        }


def _rank(target: Target):
    """Sort key of "better" under a target: for a quality floor the fastest, else the best quality."""
    stat = target.stat
    if target.min_quality is not None:
        return lambda o: (_latency(o, stat), o.index_bytes, -o.quality)
    return lambda o: (-o.quality, _latency(o, stat), o.index_bytes)


def _fits(option: Option, target: Target) -> bool:
    if target.max_latency_ms is not None:
        return _latency(option, target.stat) <= target.max_latency_ms
    if target.max_bytes_per_item is not None:
        return option.bytes_per_item <= target.max_bytes_per_item
    if target.max_index_bytes is not None:
        return option.index_bytes <= target.max_index_bytes
    return option.quality >= target.min_quality - 1e-12


def recommend(all_options: Sequence[Option], target: Target, *, allow_assumed: bool = False) -> tuple[Option, str]:
    """The best option under the target among those with measured quality (or all, ``allow_assumed``)."""
    pool = [o for o in all_options if o.quality_measured or allow_assumed]
    if not pool:
        raise PlanError("every option's quality is assumed, not measured; pass --allow-assumed or a tagged result")
    stat, rank = target.stat, _rank(target)
    feasible = [o for o in pool if _fits(o, target)]
    if not feasible:
        if target.min_quality is not None:
            nearest = max(pool, key=lambda o: o.quality)
        elif target.max_latency_ms is not None:
            nearest = min(pool, key=lambda o: _latency(o, stat))
        else:
            nearest = min(pool, key=lambda o: o.index_bytes)
        raise PlanError(
            f"no setting meets {target.describe()}; the nearest is {nearest.setting}: {describe(nearest, stat)}"
        )
    pick = min(feasible, key=rank)
    why = f"{pick.setting}: {describe(pick, stat)}; it meets {target.describe()}"
    if target.min_quality is not None:
        faster = [o for o in pool if _latency(o, stat) < _latency(pick, stat)]
        why += " at the lowest latency"
        if faster:
            best = max(faster, key=lambda o: o.quality)
            why += f"; every faster setting is below it, the best of them {best.setting} at {100 * best.quality:.1f} %"
    else:
        better = [o for o in pool if o.quality > pick.quality]
        why += " with the highest quality"
        if better:
            nxt = min(better, key=lambda o: (_latency(o, stat), o.index_bytes))
            why += f"; the cheapest better one, {nxt.setting}, is out: {describe(nxt, stat)}"
    return pick, why


def describe(option: Option, stat: str = "p50") -> str:
    return (
        f"quality {100 * option.quality:.1f} %, {stat} {_latency(option, stat):,.2f} ms, "
        f"{option.index_bytes / 1e9:,.3g} GB ({option.bytes_per_item:,} B/item)"
    )


def make_plan(
    quality: dict[tuple[Budget, str | None, str], Quality],
    costs: Sequence[CostRow],
    n: int,
    dim: int,
    target: Target,
    *,
    allow_assumed: bool = False,
) -> Plan:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PlanError(f"N must be a positive int, got {n!r}")
    found = options(quality, costs, n, dim)
    considered = [o for o in found if o.quality_measured or allow_assumed]
    mark_frontier(considered or found, target.stat)
    pick, why = recommend(found, target, allow_assumed=allow_assumed)
    notes = [f"{o.setting}: quality {o.quality_source}" for o in found if not o.quality_measured]
    if any(r.queries > 1 for r in costs):
        notes.append("some costs are per query of a batch (bench scoring --queries > 1): one query's latency is higher")
    return Plan(n, dim, target, found, pick, why, notes)


def markdown(plan: Plan) -> str:
    lines = [
        f"plan for N = {plan.n:,} items, D = {plan.dim}; target: {plan.target.describe()}",
        "",
        "| setting | quality % | p50 ms | p99 ms | index GB | bytes/item | frontier |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in sorted(plan.options, key=lambda o: (o.p50_ms, -o.quality)):
        p99 = f"{o.p99_ms:,.2f}" if o.p99_ms is not None else "n/a"
        mark = "**yes**" if o.frontier else ""
        quality = f"{100 * o.quality:.1f}" + ("" if o.quality_measured else " (assumed)")
        lines.append(
            f"| {o.setting} | {quality} | {o.p50_ms:,.2f} | {p99} | {o.index_bytes / 1e9:,.3f} "
            f"| {o.bytes_per_item:,} | {mark} |"
        )
    lines += ["", f"recommended: {plan.why}"]
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines) + "\n"
