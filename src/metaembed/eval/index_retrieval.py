"""Test-split retrieval through a real index: every query against *all* of the split's candidates.

The MMEB protocol ranks each query among its own ~100 candidates. This protocol is what a deployment
does instead: the split's distinct candidates are encoded once, written to an on-disk index, and each
query searches the whole index at every budget. It reports Precision@1 and Recall@5 (one gold per
query, so Recall@5 = hit@5), the scoring latency per query and the index bytes each budget reads.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from metaembed.budget import Budget
from metaembed.eval.mmeb import MMEBDataset, model_items
from metaembed.eval.report import EvalResult, mean
from metaembed.eval.runner import TaskFamily, TaskSummary, run

MEASURES = ("precision_at_1", "recall_at_5")
TIMING_REPEATS = 5
BYTES_PER_VALUE = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0}


class IndexRetrievalFamily(TaskFamily):
    """Each dataset's distinct candidates written to an index under ``root``; every query searches all of them."""

    benchmark = "test-split retrieval"
    main_metric = "precision_at_1"
    measures = MEASURES
    noun = "dataset"

    def __init__(self, root: Path, dtype: str) -> None:
        self.root, self.dtype = root, dtype

    @staticmethod
    def _candidate_keys(task: MMEBDataset) -> list:
        return list(dict.fromkeys(k for c in task.candidates for k in c))

    def items(self, task: MMEBDataset) -> tuple[list[dict], list[dict]]:
        return model_items(task.queries, task.image_root), model_items(self._candidate_keys(task), task.image_root)

    def score(
        self, task: MMEBDataset, queries: torch.Tensor, candidates: torch.Tensor, budgets: Sequence[Budget]
    ) -> dict:
        from metaembed.index import create_index
        from metaembed.index.base import budget_bytes

        keys = self._candidate_keys(task)
        position = {key: i for i, key in enumerate(keys)}
        dim = int(candidates.shape[2])
        path = self.root / task.name
        shutil.rmtree(path, ignore_errors=True)
        index = create_index(path, dim=dim, num_vectors=candidates.shape[1], dtype=self.dtype)
        values: dict[str, dict[str, float]] = {}
        try:
            index.add([str(i) for i in range(len(keys))], candidates, [{"text": t, "image": i} for t, i in keys])
            gold = [str(position[c[0]]) for c in task.candidates]
            stored = budget_bytes(len(index), dim, self.dtype, budgets, index.num_vectors)
            for budget in budgets:
                times, hits = [], None
                for _ in range(TIMING_REPEATS):
                    start = time.perf_counter()
                    hits = index.search(queries, budget, k=5)
                    times.append((time.perf_counter() - start) * 1000 / len(task.queries))
                assert hits is not None
                values[str(budget)] = {
                    "precision_at_1": mean([float(h[0] == g) for h, g in zip(hits.ids, gold, strict=True)]),
                    "recall_at_5": mean([float(g in h[:5]) for h, g in zip(hits.ids, gold, strict=True)]),
                    "latency_ms": statistics.median(times),
                    "index_bytes": float(stored[str(budget)]),
                }
        finally:
            index.close()
        return {"values": values, "dim": dim, "num_candidates": len(keys), "index": str(path)}

    def summarize(self, task: MMEBDataset, payload: dict, budgets: Sequence[Budget]) -> TaskSummary:
        described = dict(
            name=task.name,
            id=task.source,
            revision=task.revision,
            num_queries=len(task.queries),
            num_candidates=payload["num_candidates"],
            index=payload["index"],
            index_dtype=self.dtype,
        )
        return TaskSummary(payload["values"], payload["dim"], described)

    def result_fields(self) -> dict:
        return {"bytes_per_value": BYTES_PER_VALUE[self.dtype]}


def evaluate_index_retrieval(
    encoder: Any,
    datasets: Sequence[MMEBDataset],
    index_dir: str | Path,
    budgets: Sequence[Budget | str] | None = None,
    *,
    dtype: str = "bf16",
    batch_size: int = 32,
    model_name: str | None = None,
    progress: Callable[[str], None] | None = None,
    resume_dir: str | Path | None = None,
) -> EvalResult:
    """Index each dataset's distinct candidates under ``index_dir/<dataset>`` and search them at every budget.

    ``index_dir`` is owned by this function: an index left there by an earlier run is replaced. Scores
    rows carry ``precision_at_1``, ``recall_at_5``, ``latency_ms`` (median per query over
    :data:`TIMING_REPEATS` searches of all queries) and ``index_bytes``; group means average the first two.
    """
    family = IndexRetrievalFamily(Path(index_dir), dtype)
    return run(family, encoder, datasets, budgets, batch_size=batch_size, model_name=model_name,
               progress=progress, resume_dir=resume_dir)  # fmt: skip
