"""Checking an ``auto`` policy on held-out tasks through the real index: quality and measured cost.

Each task's distinct candidates go into an embedded index (the storage dtype a deployment would use); each
query is ranked among its own candidates (the MMEB protocol, gold first, ties against the gold) with
:func:`metaembed.index.adaptive.rerank_slots` — at every fixed ladder budget (a policy whose ladder is that
one budget, so fixed and ``auto`` run the same code) and under the policy. Per query and setting it records
whether the gold is first, the candidate-vector bytes read and the wall time (median of ``repeats`` runs,
the settings interleaved, in a rotating order, so they share the machine's load and its caches).
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from metaembed.auto_budget import AutoBudget
from metaembed.budget import Budget
from metaembed.eval.report import machine_state
from metaembed.plan.calibrate import correct_at_1
from metaembed.plan.encoded import EncodedTask

AUTO = "auto"


def fixed_policy(budget: Budget, k: int) -> AutoBudget:
    """A policy that scores at ``budget`` and never moves: a fixed budget run through the ``auto`` code path."""
    return AutoBudget(0.0, cheap=budget, ceiling=budget, ladder=(budget,), top_m=k)


def evaluate_policy(
    tasks: Sequence[EncodedTask],
    policy: AutoBudget,
    workdir: str | Path,
    *,
    dtype: str = "bf16",
    repeats: int = 3,
    k: int = 10,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Precision@1, mean bytes and mean ms per query of every fixed ladder budget up to the ceiling and of
    ``policy``, per task and over all tasks; ``workdir`` holds the temporary indexes (removed afterwards)."""
    from metaembed.index import create_index
    from metaembed.index.adaptive import rerank_slots

    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    budgets = [b for b in Budget.LADDER if b.r_q <= policy.ceiling.r_q and b.r_c <= policy.ceiling.r_c]
    settings = {str(b): fixed_policy(b, k) for b in budgets} | {AUTO: policy}
    names = list(settings)
    started = machine_state()
    root = Path(workdir)
    per_task, pooled = [], {name: {"bytes": 0.0, "ms": 0.0, "queries": 0} for name in settings}
    for task in tasks:
        path = root / task.name
        shutil.rmtree(path, ignore_errors=True)
        rows: dict[str, dict[str, list]] = {name: {"right": [], "bytes": [], "ms": []} for name in settings}
        ended: dict[str, int] = {}
        with create_index(path, int(task.candidates.shape[2]), int(task.candidates.shape[1]), dtype=dtype) as index:
            index.add([str(i) for i in range(len(task.candidates))], task.candidates)
            assert len(index.segments) == 1  # one write: slot i is candidate i
            if progress:
                progress(f"{task.name}: {len(task)} queries × {len(settings)} settings × {repeats} runs")
            for record, slots in enumerate(task.candidate_lists):
                query = task.queries[int(task.query_of[record])][None]
                times: dict[str, list[float]] = {name: [] for name in settings}
                outcomes = {}
                for repeat in range(repeats):
                    # rotate which setting goes first: none always finds the query's rows warm from another
                    shift = (record + repeat) % len(names)
                    for name in names[shift:] + names[:shift]:
                        setting = settings[name]
                        start = time.perf_counter()
                        outcomes[name] = rerank_slots(index, query, slots, setting, k)
                        times[name].append((time.perf_counter() - start) * 1000)
                for name, outcome in outcomes.items():
                    rows[name]["right"].append(correct_at_1(outcome.rows, outcome.scores, int(slots[0])))
                    rows[name]["bytes"].append(outcome.bytes_read)
                    rows[name]["ms"].append(statistics.median(times[name]))
                final = str(outcomes[AUTO].budget)
                ended[final] = ended.get(final, 0) + 1
        shutil.rmtree(path, ignore_errors=True)
        summary = {name: _summary(values) for name, values in rows.items()}
        summary[AUTO]["escalated_fraction"] = 1 - ended.get(str(policy.cheap), 0) / len(task)
        summary[AUTO]["final_budgets"] = dict(sorted(ended.items(), key=lambda kv: Budget.parse(kv[0])))
        per_task.append({"task": task.name, "queries": len(task), "settings": summary})
        for name, values in rows.items():
            pooled[name]["bytes"] += sum(values["bytes"])
            pooled[name]["ms"] += sum(values["ms"])
            pooled[name]["queries"] += len(values["bytes"])
    overall = {
        name: {
            "precision_at_1": statistics.fmean(t["settings"][name]["precision_at_1"] for t in per_task),
            "mean_bytes": pooled[name]["bytes"] / pooled[name]["queries"],
            "mean_ms": pooled[name]["ms"] / pooled[name]["queries"],
        }
        for name in settings
    }
    escalated = sum(t["settings"][AUTO]["escalated_fraction"] * t["queries"] for t in per_task)
    overall[AUTO]["escalated_fraction"] = escalated / sum(t["queries"] for t in per_task)
    return {
        "protocol": "each query among its own candidates (MMEB), gold first, ties against the gold; "
        f"candidates stored in an embedded {dtype} index, scored with rerank_slots",
        "policy": policy.to_dict(),
        "dtype": dtype,
        "k": k,
        "repeats": repeats,
        "machine_before": started,
        "machine_after": machine_state(),
        "tasks": per_task,
        "overall": overall,
        "verdict": verdict(per_task, overall, str(policy.ceiling)),
    }


def _summary(values: dict[str, list]) -> dict[str, float]:
    return {
        "precision_at_1": statistics.fmean(values["right"]),
        "mean_bytes": statistics.fmean(values["bytes"]),
        "mean_ms": statistics.fmean(values["ms"]),
        "p50_ms": statistics.median(values["ms"]),
    }


def verdict(per_task: Sequence[dict], overall: dict[str, dict], ceiling: str) -> dict[str, Any]:
    """``auto`` against the fixed ceiling: quality gap in points (per task and overall) and cost ratios."""
    gaps = {
        t["task"]: 100 * (t["settings"][AUTO]["precision_at_1"] - t["settings"][ceiling]["precision_at_1"])
        for t in per_task
    }
    return {
        "ceiling": ceiling,
        "points_vs_ceiling": gaps,
        "overall_points_vs_ceiling": 100 * (overall[AUTO]["precision_at_1"] - overall[ceiling]["precision_at_1"]),
        "worst_task_points_vs_ceiling": min(gaps.values()),
        "bytes_ratio": overall[AUTO]["mean_bytes"] / overall[ceiling]["mean_bytes"],
        "ms_ratio": overall[AUTO]["mean_ms"] / overall[ceiling]["mean_ms"],
        "escalated_fraction": overall[AUTO]["escalated_fraction"],
    }
