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

from metaembed.budget import Budget
from metaembed.eval.common import describe_model, select_budgets
from metaembed.eval.mmeb import MMEBDataset, encode_keys
from metaembed.eval.report import EvalResult, mean

MEASURES = ("precision_at_1", "recall_at_5")
TIMING_REPEATS = 5


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
) -> EvalResult:
    """Index each dataset's distinct candidates under ``index_dir/<dataset>`` and search them at every budget.

    ``index_dir`` is owned by this function: an index left there by an earlier run is replaced. Scores
    rows carry ``precision_at_1``, ``recall_at_5``, ``latency_ms`` (median per query over
    :data:`TIMING_REPEATS` searches of all queries) and ``index_bytes``.
    """
    from metaembed.index import create_index
    from metaembed.index.base import budget_bytes

    chosen = select_budgets(encoder, budgets)
    root = Path(index_dir)
    scores, described = [], []
    per_dataset: dict[str, dict[str, dict[str, float]]] = {}
    dim = 0
    for dataset in datasets:
        keys = list(dict.fromkeys(k for c in dataset.candidates for k in c))
        position = {key: i for i, key in enumerate(keys)}
        if progress:
            progress(f"{dataset.name}: encoding {len(keys)} candidates and {len(dataset.queries)} queries")
        candidates = encode_keys(encoder, keys, dataset.image_root, "candidate", chosen, batch_size)
        queries = encode_keys(encoder, dataset.queries, dataset.image_root, "query", chosen, batch_size)
        dim = int(candidates.shape[2])
        path = root / dataset.name
        shutil.rmtree(path, ignore_errors=True)
        index = create_index(path, dim=dim, num_vectors=candidates.shape[1], dtype=dtype)
        try:
            ids = [str(i) for i in range(len(keys))]
            index.add(ids, candidates, [{"text": t, "image": i} for t, i in keys])
            gold = [str(position[c[0]]) for c in dataset.candidates]
            stored = budget_bytes(len(index), dim, dtype, chosen, index.num_vectors)
            per_dataset[dataset.name] = {}
            for budget in chosen:
                times, hits = [], None
                for _ in range(TIMING_REPEATS):
                    start = time.perf_counter()
                    hits = index.search(queries, budget, k=5)
                    times.append((time.perf_counter() - start) * 1000 / len(dataset.queries))
                assert hits is not None
                values = {
                    "precision_at_1": mean([float(h[0] == g) for h, g in zip(hits.ids, gold, strict=True)]),
                    "recall_at_5": mean([float(g in h[:5]) for h, g in zip(hits.ids, gold, strict=True)]),
                    "latency_ms": statistics.median(times),
                    "index_bytes": float(stored[str(budget)]),
                }
                per_dataset[dataset.name][str(budget)] = values
                scores += [dict(task=dataset.name, budget=str(budget), metric=m, value=v) for m, v in values.items()]
        finally:
            index.close()
        described.append(
            dict(name=dataset.name, id=dataset.source, revision=dataset.revision, num_queries=len(dataset.queries),
                 num_candidates=len(keys), index=str(path), index_dtype=dtype)
        )  # fmt: skip
    budget_names = [str(b) for b in chosen]
    groups = [
        dict(group="overall", budget=b, metric=m, value=mean([v[b][m] for v in per_dataset.values()]))
        for b in budget_names
        for m in MEASURES
    ]
    return EvalResult(
        benchmark="test-split retrieval",
        model=describe_model(encoder, model_name),
        main_metric="precision_at_1",
        budgets=budget_names,
        embedding_dim=dim,
        datasets=described,
        scores=scores,
        groups=groups,
        bytes_per_value={"fp32": 4.0, "bf16": 2.0, "int8": 1.0}[dtype],
    )
