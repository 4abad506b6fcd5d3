"""``budget="auto"`` on the embedded index: the cheap stage over the index, escalations over a shortlist.

The cheap stage is the index's own search at ``policy.cheap`` — exhaustive (every row read at the cheap
budget's groups) or two-stage (the HNSW shortlist reranked at the cheap budget) — keeping the top
``max(top_m, k)`` rows per query. :func:`metaembed.auto_budget.escalate` then decides per query whether to
rescore those rows at the next budget, reading only their rows of the groups that budget needs. Results say,
per query, the budget it ended at, how many times it escalated and the candidate-vector bytes it read.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from metaembed.auto_budget import AutoBudget, AutoBudgetError, Outcome, escalate
from metaembed.budget import Budget
from metaembed.index.base import IndexBase, SearchResults, budget_bytes, check_search
from metaembed.index.scan import resolve, scan


@dataclass
class AutoSearchResults(SearchResults):
    """:class:`SearchResults` plus, per query, the final budget, escalations and candidate-vector bytes read."""

    budgets: list[str] = field(default_factory=list)
    escalations: list[int] = field(default_factory=list)
    bytes_read: list[int] = field(default_factory=list)
    policy: AutoBudget | None = None

    @property
    def escalated_fraction(self) -> float:
        return sum(e > 0 for e in self.escalations) / len(self.escalations) if self.escalations else 0.0

    def per_query(self) -> list[dict[str, object]]:
        """Per query: the budget it ended at, its escalations and the candidate-vector bytes it read."""
        return [
            {"budget": b, "escalations": e, "bytes_read": r}
            for b, e, r in zip(self.budgets, self.escalations, self.bytes_read, strict=True)
        ]


def resolve_policy(store: Any, budget: AutoBudget | str, *fallback: str | os.PathLike[str] | None) -> AutoBudget:
    """An AutoBudget as given; for ``"auto"`` the policy stored beside the index, else in a ``fallback`` folder
    (the model's). Only the embedded index runs ``auto``."""
    if getattr(store, "backend", None) != "embedded":
        raise AutoBudgetError(f'budget "auto" runs on the embedded index, not on {getattr(store, "backend", store)!r}')
    return budget if isinstance(budget, AutoBudget) else AutoBudget.find(store.path, *fallback)


def item_bytes(store: IndexBase, budgets: list[Budget]) -> dict[Budget, int]:
    """Candidate-vector bytes one item costs at each of ``budgets`` (int8: with its scales)."""
    return _item_bytes(store.dim, store.dtype, store.num_vectors, tuple(budgets))


@functools.cache
def _item_bytes(dim: int, dtype: str, num_vectors: int, budgets: tuple[Budget, ...]) -> dict[Budget, int]:
    # cached: a search over a short candidate list must not spend its time re-deriving these
    sizes = budget_bytes(1, dim, dtype, budgets, num_vectors)
    return {Budget.parse(name): size for name, size in sizes.items()}


def auto_search(
    store: IndexBase,
    queries: torch.Tensor,
    budget: AutoBudget | str,
    k: int,
    *,
    two_stage: bool = False,
    candidates: int | None = None,
) -> AutoSearchResults:
    """Top ``k`` per query under the ``auto`` policy (see the module docstring)."""
    policy = resolve_policy(store, budget)
    check_search(
        queries,
        policy.ceiling,
        k,
        dim=store.dim,
        num_vectors=store.num_vectors,
        two_stage=two_stage,
        candidates=candidates,
    )
    policy.validate(queries.shape[1], store.num_vectors)
    queries = queries.detach().cpu()
    keep = max(policy.top_m, k)
    sizes = item_bytes(store, policy.steps())
    if two_stage:
        ranked = store.shortlist_ranked(queries, policy.cheap, keep, candidates)
        if ranked is None:
            return _empty(queries.shape[0], policy)
        scores, slots, offsets, segments, scanned = ranked
    else:
        segments = store.segments
        scores, slots, offsets = scan(queries, policy.cheap, keep, segments)
        offsets = [*offsets, sum(s.count for s in segments)]
        scanned = [offsets[-1]] * queries.shape[0]
    return _escalate_all(store, queries, policy, k, scores, slots, offsets, segments, scanned, sizes)


def rescorer(
    store: IndexBase, query: torch.Tensor, segments: list, offsets: list[int]
) -> Callable[[Budget, torch.Tensor], torch.Tensor]:
    """``score(budget, slots)`` for one query ``(1, R_q, D)`` over a snapshot: scores aligned with the slots.

    Called once per level of every query, on a few rows, so it does no work twice: a bf16 index's query is
    rounded to bf16 once here (every bf16 scoring path rounds it so first: the same scores), and rows of several
    segments are sorted once, scored per segment in storage order and written straight to their places.
    """
    if getattr(store, "dtype", None) == "bf16" and query.dtype != torch.bfloat16:
        query = query.to(torch.bfloat16)
    if len(segments) == 1:  # slots are the segment's rows: no mapping, scores come back aligned

        def score_one(budget: Budget, slots: torch.Tensor) -> torch.Tensor:
            return segments[0].score(query, budget, slots)[0]

        return score_one
    starts = np.asarray(offsets[:-1], dtype=np.int64)

    def score(budget: Budget, slots: torch.Tensor) -> torch.Tensor:
        wanted = slots.numpy()
        order = np.argsort(wanted, kind="stable")
        ordered = wanted[order]
        seg_of = np.searchsorted(starts, ordered, side="right") - 1
        aligned = torch.empty(len(wanted), dtype=torch.float32)
        bounds = np.flatnonzero(np.diff(seg_of)) + 1
        for lo, hi in zip([0, *bounds], [*bounds, len(ordered)], strict=True):
            if lo == hi:
                continue
            s_idx = int(seg_of[lo])
            local = torch.from_numpy(ordered[lo:hi] - offsets[s_idx])
            aligned[torch.from_numpy(order[lo:hi])] = segments[s_idx].score(query, budget, local)[0]
        return aligned

    return score


def rerank_slots(store: IndexBase, query: torch.Tensor, slots: torch.Tensor, policy: AutoBudget, k: int) -> Outcome:
    """The ``auto`` policy over a given candidate list: ``slots`` (global rows of the current snapshot) scored at
    the cheap budget, then escalated. How an evaluation ranks each query among its own candidates."""
    segments = store.segments
    offsets = [0, *itertools.accumulate(s.count for s in segments)]
    score = rescorer(store, query, segments, offsets)
    sizes = item_bytes(store, policy.steps())
    first = score(policy.cheap, slots)
    return escalate(policy, slots, first, score, sizes.__getitem__, k, slots.numel() * sizes[policy.cheap])


def _escalate_all(store, queries, policy, k, scores, slots, offsets, segments, scanned, sizes) -> AutoSearchResults:
    outcomes: list[Outcome] = []
    for i in range(queries.shape[0]):
        live = torch.isfinite(scores[i])  # a scan over fewer than `keep` live rows pads with -inf
        score = rescorer(store, queries[i : i + 1], segments, offsets)
        first = scanned[i] * sizes[policy.cheap]
        outcomes.append(escalate(policy, slots[i][live], scores[i][live], score, sizes.__getitem__, k, first))
    width = min((o.rows.numel() for o in outcomes), default=0)
    results = resolve(
        torch.stack([o.scores[:width] for o in outcomes]),
        torch.stack([o.rows[:width] for o in outcomes]),
        offsets[:-1],
        k,
        segments,
    )
    return AutoSearchResults(
        ids=results.ids,
        scores=results.scores,
        metadata=results.metadata,
        budgets=[str(o.budget) for o in outcomes],
        escalations=[o.escalations for o in outcomes],
        bytes_read=[o.bytes_read for o in outcomes],
        policy=policy,
    )


def _empty(nq: int, policy: AutoBudget) -> AutoSearchResults:
    return AutoSearchResults(
        ids=[[] for _ in range(nq)],
        scores=torch.empty(nq, 0),
        metadata=[[] for _ in range(nq)],
        budgets=[str(policy.cheap)] * nq,
        escalations=[0] * nq,
        bytes_read=[0] * nq,
        policy=policy,
    )


__all__ = ["AutoSearchResults", "auto_search", "item_bytes", "rerank_slots", "rescorer", "resolve_policy"]
