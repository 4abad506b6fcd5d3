"""What one search reads from the index: the bytes of candidate vectors its budget touches."""

from __future__ import annotations

from typing import Any

from metaembed.budget import Budget
from metaembed.index.base import budget_bytes


def search_bytes(
    index: Any, budget: Budget, *, two_stage: bool = False, candidates: int | None = None, k: int = 10
) -> int:
    """Bytes of candidate vectors one query's search at ``budget`` reads.

    Exhaustive search reads the first ``r_c`` vectors of every item: N·r_c·D·bytes (+ int8 scales).
    Two-stage search reads them only for its ``candidates`` reranked items (the HNSW walk over the (1,1)
    vectors that picks them is not counted: it visits a graph-dependent few thousand vectors).
    """
    rows = len(index)
    if two_stage:
        from metaembed.index.layout import default_candidates

        rows = min(rows, max(candidates or default_candidates(k), k))
    return budget_bytes(rows, index.dim, index.dtype, [budget], index.num_vectors).get(str(budget), 0)
