"""The planner's inputs: quality from ``metaembed eval`` result files and scoring cost from ``metaembed bench
scoring`` rows (or measured now), each keyed by the setting it measured.

Quality measured with fp32 scores counts as measured for fp32 and bf16 storage (bf16 storage rounds each stored
value by ~2⁻⁹ relative, products accumulate in fp32; the test-split check in docs/planner.md finds the same
precision@1); for int8 and
two-stage it is an *assumption* (marked, and not recommended unless allowed) until a result for that
storage or mode is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaembed.budget import Budget
from metaembed.errors import MetaEmbedError

DTYPES = ("fp32", "bf16", "int8")
MODES = ("exhaustive", "two-stage")


class PlanError(MetaEmbedError, ValueError):
    """Planner input that cannot be used (unknown file, clashing measurements, a target nothing meets)."""


@dataclass(frozen=True, order=True)
class Setting:
    budget: Budget
    dtype: str
    mode: str = "exhaustive"

    def __str__(self) -> str:
        return f"{self.budget} {self.dtype} {self.mode}"


@dataclass
class Quality:
    value: float  # a fraction in [0, 1]
    source: str
    measured: bool


@dataclass
class CostRow:
    """One measured latency: a setting at ``n`` items of width ``dim``, one query's p50 / p99 in ms."""

    budget: Budget
    dtype: str
    mode: str
    n: int
    dim: int
    p50_ms: float
    p99_ms: float | None
    queries: int
    source: str


def parse_tagged(spec: str) -> tuple[set[str], Path]:
    """``[TAG,TAG=]PATH`` → tags (dtypes, ``two-stage``, ``exhaustive``) and the path."""
    tags: set[str] = set()
    path = spec
    if "=" in spec:
        head, path = spec.split("=", 1)
        tags = {t.strip() for t in head.split(",") if t.strip()}
        unknown = tags - set(DTYPES) - set(MODES)
        if unknown:
            raise PlanError(f"unknown tag(s) {sorted(unknown)} in {spec!r}; allowed: {', '.join(DTYPES + MODES)}")
    return tags, Path(path)


def load_quality(
    specs: Sequence[str], *, group: str = "overall", task: str | None = None, metric: str | None = None
) -> dict[tuple[Budget, str | None, str], Quality]:
    """Quality per (budget, dtype or None = unquantised scores, mode) from eval result files.

    A file tagged ``int8=path`` or ``two-stage=path`` (or an index-retrieval result that records its index
    dtype) measured that storage / mode; an untagged file measured fp32 scores of an exhaustive search.
    """
    from metaembed.eval.report import EvalResult, ReportError

    out: dict[tuple[Budget, str | None, str], Quality] = {}
    for spec in specs:
        tags, path = parse_tagged(spec)
        try:
            result = EvalResult.load(path)
        except ReportError as error:
            raise PlanError(str(error)) from None
        recorded = {d.get("index_dtype") for d in result.datasets} - {None}
        dtypes = tags & set(DTYPES) or (recorded if len(recorded) == 1 else set())
        if len(dtypes) > 1:
            raise PlanError(f"{spec}: one quality file measures one storage dtype, got tags {sorted(dtypes)}")
        modes = tags & set(MODES)
        if len(modes) > 1:
            raise PlanError(f"{spec}: tag one mode, exhaustive or two-stage")
        dtype = next(iter(dtypes), None)
        mode = next(iter(modes), "exhaustive")
        for name in result.budgets:
            budget = Budget.parse(name)
            try:
                value = result.value(task, name, metric) if task else result.group_value(group, name, metric)
            except ReportError as error:
                raise PlanError(f"{path}: {error}") from None
            key = (budget, dtype, mode)
            if key in out:
                raise PlanError(
                    f"two quality files measure budget {budget} ({dtype or 'any dtype'}, {mode}): "
                    f"{out[key].source} and {path}; tag them (e.g. int8=PATH) or pass one"
                )
            label = metric or result.main_metric
            out[key] = Quality(value, f"{path} ({task or group} {label})", True)
    if not out:
        raise PlanError("no quality measurements: pass --quality RESULT.json (from metaembed eval)")
    return out


def quality_for(setting: Setting, measured: dict[tuple[Budget, str | None, str], Quality]) -> Quality | None:
    """The quality of a setting: measured for it (fp32 scores stand for fp32 and bf16 storage), else assumed
    from the nearest measurement (int8 from unquantised scores, two-stage from exhaustive), marked as such."""
    b, dtype, mode = setting.budget, setting.dtype, setting.mode
    exact = measured.get((b, dtype, mode))
    if exact is not None:
        return exact
    base = measured.get((b, None, mode))
    if base is not None and dtype != "int8":
        return base
    fallback = base or measured.get((b, dtype, "exhaustive")) or measured.get((b, None, "exhaustive"))
    if fallback is None:
        return None
    unknown = [
        what
        for what, missing in (
            ("int8 storage", dtype == "int8" and (b, dtype, "exhaustive") not in measured),
            ("two-stage search", mode == "two-stage"),
        )
        if missing
    ]
    return Quality(fallback.value, f"assumed from {fallback.source}: {' and '.join(unknown)} not measured", False)


def cost_rows_from_bench(data: Any, source: str) -> list[CostRow]:
    """Rows of ``metaembed bench scoring --json`` output (a list of per-budget objects)."""
    if not isinstance(data, list) or not data:
        raise PlanError(f"{source} is not `metaembed bench scoring --json` output (a list of per-budget rows)")
    rows = []
    for i, row in enumerate(data):
        try:
            rows.append(
                CostRow(
                    budget=Budget.parse(row["budget"]),
                    dtype=str(row["dtype"]),
                    mode=str(row.get("mode", "exhaustive")),
                    n=int(row["n"]),
                    dim=int(row["dim"]),
                    p50_ms=float(row["latency_ms"]),
                    p99_ms=float(row["latency_ms_p99"]) if "latency_ms_p99" in row else None,
                    queries=int(row.get("queries", 1)),
                    source=source,
                )
            )
        except (KeyError, TypeError, ValueError) as error:
            raise PlanError(f"{source} row {i} lacks a field the planner needs: {error!r}") from None
    return rows


def load_costs(paths: Sequence[str | Path]) -> list[CostRow]:
    import json

    rows: list[CostRow] = []
    for path in paths:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise PlanError(f"cannot read cost file {path}: {error}") from None
        rows += cost_rows_from_bench(data, str(path))
    return rows


def measure_costs(
    n: int, dim: int, dtypes: Sequence[str], budgets: Sequence[Budget], repeats: int = 30
) -> list[CostRow]:
    """One query's latency at every budget and dtype, measured now on random vectors of the plan's N and D."""
    from metaembed.bench.ceilings import measure
    from metaembed.bench.scoring import BenchError, profile_scoring

    rows: list[CostRow] = []
    ceilings = measure("cpu")
    for dtype in dtypes:
        try:
            measured, _ = profile_scoring(dim, n, budgets, dtype=dtype, queries=1, repeats=repeats, ceilings=ceilings)
        except BenchError as error:
            raise PlanError(f"cannot measure {dtype} at N = {n:,}: {error}") from None
        for row in measured:
            rows.append(
                CostRow(
                    Budget.parse(row.budget),
                    dtype,
                    "exhaustive",
                    n,
                    dim,
                    row.latency_ms,
                    row.latency_ms_p99,
                    1,
                    f"measured now (N = {n:,}, {repeats} runs)",
                )
            )
    return rows
