"""Fitting the ``auto`` budget's threshold on a dev split, to a quality target relative to the ceiling.

For every dev query and every candidate policy shape (cheap budget × ``top_m``), the query's whole walk up the
ladder is computed once with :func:`metaembed.auto_budget.levels` — the same code that serves — over exact
fp32 scores of its own candidates (the MMEB protocol: each query ranked among its own list, gold first).
What any threshold would do follows without rescoring: a query stops at the first level whose margin reaches
the threshold. The chosen policy is the cheapest (mean candidate bytes read) whose quality is within
``within`` points of the ceiling budget's on every task (or on the mean over tasks, ``per_task=False``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metaembed.auto_budget import AutoBudget, levels
from metaembed.budget import Budget
from metaembed.plan.encoded import EncodedTask
from metaembed.plan.measurements import PlanError

BYTES_PER_VALUE = {"fp32": 4, "bf16": 2, "int8": 1}
DEFAULT_CHEAP = (Budget(1, 1), Budget(2, 4))
DEFAULT_TOP_M = (4, 8, 16, 32)


class CalibrationError(PlanError):
    """A calibration that cannot run (no queries, a target no threshold meets, bad options)."""


def item_bytes(budget: Budget, dim: int, dtype: str) -> int:
    """Candidate-vector bytes one item costs at ``budget`` (int8 adds a 4-byte scale per vector)."""
    if dtype not in BYTES_PER_VALUE:
        raise CalibrationError(f"unknown storage dtype {dtype!r}; allowed: {', '.join(BYTES_PER_VALUE)}")
    return budget.r_c * (dim * BYTES_PER_VALUE[dtype] + (4 if dtype == "int8" else 0))


def correct_at_1(outcome_rows: torch.Tensor, outcome_scores: torch.Tensor, gold: int) -> bool:
    """Precision@1 of one ranking with the MMEB tie rule: a tie with the gold never counts for it."""
    if outcome_rows.numel() == 0 or int(outcome_rows[0]) != gold:
        return False
    return outcome_rows.numel() == 1 or bool(outcome_scores[0] > outcome_scores[1])


@dataclass
class Walks:
    """Every query's walk for one policy shape: per level its margin, whether it is right, the bytes read."""

    cheap: Budget
    top_m: int
    task_of: np.ndarray  # (queries,) task number
    margins: np.ndarray  # (queries, levels); the last level is inf
    correct: np.ndarray  # (queries, levels) bool
    bytes_read: np.ndarray  # (queries, levels)
    ceiling_bytes: np.ndarray  # (queries,) what the fixed ceiling reads for the query

    def stop_levels(self, threshold: float) -> np.ndarray:
        """The level each query ends at: the first whose margin reaches ``threshold``."""
        return np.argmax(self.margins >= threshold, axis=1)

    def at(self, threshold: float, tasks: int) -> tuple[np.ndarray, float, float]:
        """Per-task precision@1, pooled bytes read / ceiling bytes, and the escalated fraction at ``threshold``."""
        stop = self.stop_levels(threshold)
        rows = np.arange(len(stop))
        right = self.correct[rows, stop]
        quality = np.array([right[self.task_of == t].mean() for t in range(tasks)])
        cost = float(self.bytes_read[rows, stop].sum() / self.ceiling_bytes.sum())
        return quality, cost, float((stop > 0).mean())


def query_tables(task: EncodedTask, budgets: Sequence[Budget]) -> list[torch.Tensor]:
    """Per record, exact fp32 scores ``(len(budgets), candidates)`` of its own candidates at every budget."""
    from metaembed.eval.mmeb import budget_scores

    tables = []
    for record, rows in enumerate(task.candidate_lists):
        query = task.queries[int(task.query_of[record])]
        tables.append(budget_scores(query, task.candidates.index_select(0, rows), budgets))
    return tables


def walks(
    tasks: Sequence[EncodedTask],
    tables: Sequence[Sequence[torch.Tensor]],
    shape: AutoBudget,
    dtype: str = "bf16",
) -> Walks:
    """Walk every query of ``tasks`` (with their :func:`query_tables`) up ``shape``'s ladder to its ceiling."""
    ladder = list(Budget.LADDER)
    dim = int(tasks[0].candidates.shape[2])
    size = {b: item_bytes(b, dim, dtype) for b in shape.steps()}
    task_of, margins, correct, spent, ceiling = [], [], [], [], []
    for number, task_tables in enumerate(tables):
        for table in task_tables:
            n = table.shape[1]

            def lookup(budget: Budget, rows: torch.Tensor, table=table) -> torch.Tensor:
                return table[ladder.index(budget)].index_select(0, rows)

            rows = torch.arange(n)
            walk = list(
                levels(
                    shape,
                    rows,
                    lookup(shape.cheap, rows),
                    lookup,
                    size.__getitem__,
                    k=2,
                    bytes_read=n * size[shape.cheap],
                )
            )
            task_of.append(number)
            margins.append([m for m, _ in walk])
            correct.append([correct_at_1(o.rows, o.scores, 0) for _, o in walk])
            spent.append([o.bytes_read for _, o in walk])
            ceiling.append(n * size[shape.ceiling])
    return Walks(
        shape.cheap,
        shape.top_m,
        np.array(task_of),
        np.array(margins),
        np.array(correct),
        np.array(spent, dtype=np.float64),
        np.array(ceiling, dtype=np.float64),
    )


def thresholds(walk: Walks, count: int = 200) -> np.ndarray:
    """Candidate thresholds: 0 (never escalate), quantiles of the finite margins seen, and inf (always)."""
    finite = walk.margins[np.isfinite(walk.margins)]
    grid = np.quantile(finite, np.linspace(0, 1, count)) if finite.size else np.zeros(0)
    # a threshold just above each quantile, so "margin == threshold" cases fall on both sides of the grid
    return np.unique(np.concatenate([[0.0], grid, np.nextafter(grid, np.inf), [np.inf]]))


@dataclass
class Candidate:
    """One (policy shape, threshold) point of the calibration sweep."""

    policy: AutoBudget
    quality: list[float]  # per task, precision@1
    cost: float  # pooled bytes read / ceiling bytes
    escalated: float

    @property
    def mean_quality(self) -> float:
        return float(np.mean(self.quality))


def sweep(
    tasks: Sequence[EncodedTask],
    *,
    ceiling: Budget = Budget.LADDER[-1],
    cheap: Sequence[Budget] = DEFAULT_CHEAP,
    top_m: Sequence[int] = DEFAULT_TOP_M,
    margin_rank: Sequence[int] = (2,),
    direct: Sequence[bool] = (False, True),
    dtype: str = "bf16",
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Candidate], list[float]]:
    """Every (cheap, top_m, margin_rank, ladder, threshold) point on ``tasks``, and the ceiling's per-task precision@1.

    ``direct``: whether a shape escalates along the whole ladder (False) or from the cheap budget straight to
    the ceiling (True: one rescoring instead of up to four, which matters when per-call overhead rivals the
    scoring itself, as on short candidate lists).
    """
    if not tasks or any(len(t) == 0 for t in tasks):
        raise CalibrationError("calibration needs at least one task with at least one query")
    tables = [query_tables(t, Budget.LADDER) for t in tasks]
    top = list(Budget.LADDER).index(ceiling)
    ceiling_quality = [
        float(np.mean([bool((table[top, 1:] < table[top, 0]).all()) for table in task_tables]))
        for task_tables in tables
    ]
    points = []
    for start, m, rank, jump in itertools.product(cheap, top_m, margin_rank, direct):
        if jump and start == ceiling:
            continue
        ladder = (start, ceiling) if jump else Budget.LADDER
        shape = AutoBudget(0.0, cheap=start, ceiling=ceiling, top_m=m, margin_rank=rank, ladder=ladder)
        walk = walks(tasks, tables, shape, dtype)
        if progress:
            steps = " → ".join(str(b) for b in shape.steps())
            progress(f"walked {len(walk.margins)} queries along {steps}, top_m={m}, margin_rank={rank}")
        for threshold in thresholds(walk):
            quality, cost, escalated = walk.at(float(threshold), len(tasks))
            points.append(Candidate(shape.replace(threshold=float(threshold)), quality.tolist(), cost, escalated))
    return points, ceiling_quality


def choose(
    points: Sequence[Candidate], ceiling_quality: Sequence[float], within: float, *, per_task: bool = True
) -> Candidate:
    """The cheapest point within ``within`` (a fraction: 0.005 = half a point) of the ceiling's quality.

    ``per_task``: every task must be within it; otherwise the mean over tasks. Ties go to higher quality.
    """
    if within < 0:
        raise CalibrationError(f"--within must be ≥ 0 points, got {100 * within:g}")
    floor = np.asarray(ceiling_quality) - within - 1e-12

    def meets(p: Candidate) -> bool:
        if per_task:
            return bool((np.asarray(p.quality) >= floor).all())
        return p.mean_quality >= float(np.mean(ceiling_quality)) - within - 1e-12

    feasible = [p for p in points if meets(p)]
    if not feasible:
        raise CalibrationError("no threshold reaches the target, not even always escalating (raise top_m)")
    return min(feasible, key=lambda p: (p.cost, -p.mean_quality, p.policy.threshold))
