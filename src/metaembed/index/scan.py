"""Exact search over one snapshot of segments: the exhaustive scan, the rerank of given rows, and the results.

A snapshot is a list of :class:`~metaembed.index.segment.Segment`; a row's *slot* is its global position in
it (segment offset + row). Nothing here locks or reads the manifest: the store hands in a snapshot that no
write changes (writes swap in a new list).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from metaembed.budget import Budget
from metaembed.index.base import SearchResults
from metaembed.index.segment import Segment

SEARCH_BLOCK_ROWS = 262_144  # rows scored per kernel call: bounds the (nq, rows) score buffer


def offsets_of(segments: Sequence[Segment]) -> list[int]:
    """First slot of every segment, plus the total."""
    return [0, *itertools.accumulate(s.count for s in segments)]


def scan(
    queries: torch.Tensor, budget: Budget, k: int, segments: Sequence[Segment]
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Exhaustive exact top ``k`` over a snapshot: ``(scores, global slots, segment offsets)``, unsorted."""
    nq = queries.shape[0]
    best_scores = torch.full((nq, 0), float("-inf"))
    best_slots = torch.empty((nq, 0), dtype=torch.long)
    offsets = offsets_of(segments)[:-1]
    for segment, offset in zip(segments, offsets, strict=True):
        for lo in range(0, segment.count, SEARCH_BLOCK_ROWS):
            hi = min(segment.count, lo + SEARCH_BLOCK_ROWS)
            live = segment.live[lo:hi]
            if not live.any():
                continue
            scores = segment.score(queries, budget, slice(lo, hi))
            scores[:, ~live] = float("-inf")
            top, idx = scores.topk(min(k, int(live.sum())), dim=1)
            best_scores = torch.cat([best_scores, top], dim=1)
            best_slots = torch.cat([best_slots, idx + offset + lo], dim=1)
            if best_scores.shape[1] > k:
                best_scores, keep = best_scores.topk(k, dim=1)
                best_slots = best_slots.gather(1, keep)
    return best_scores, best_slots, offsets


def score_slots(
    query: torch.Tensor,
    budget: Budget,
    segments: Sequence[Segment],
    offsets: Sequence[int],
    slots: np.ndarray | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact MaxSim of one query ``(1, R_q, D)`` against the rows at global ``slots`` of a snapshot.

    Returns ``(scores, slots)`` with the slots sorted (rows are read in storage order, one kernel call per
    segment), the scores aligned with them. ``offsets`` is :func:`offsets_of` the snapshot.
    """
    hits = np.sort(np.asarray(slots, dtype=np.int64))
    starts = np.asarray(offsets[:-1])
    seg_of = np.searchsorted(starts, hits, side="right") - 1
    scores, out_slots = [torch.empty(0)], [torch.empty(0, dtype=torch.long)]
    for s_idx in np.unique(seg_of):
        global_rows = hits[seg_of == s_idx]
        local = torch.from_numpy(global_rows - offsets[s_idx])
        scores.append(segments[int(s_idx)].score(query, budget, local)[0])
        out_slots.append(torch.from_numpy(global_rows))
    return torch.cat(scores), torch.cat(out_slots)


def rerank(
    queries: torch.Tensor,
    budget: Budget,
    k: int,
    segments: Sequence[Segment],
    offsets: Sequence[int],
    shortlists: Sequence[np.ndarray],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's top ``k`` among its own shortlist of slots, scored exactly: ``(scores, slots)``, unsorted.

    Rows are as wide as the shortest answer (a query whose shortlist is shorter than ``k`` narrows them all).
    """
    per_query_scores, per_query_slots = [], []
    for i, hits in enumerate(shortlists):
        q_scores, q_slots = score_slots(queries[i : i + 1], budget, segments, offsets, hits)
        top, idx = q_scores.topk(min(k, q_scores.numel()))
        per_query_scores.append(top)
        per_query_slots.append(q_slots[idx])
    width = min(t.numel() for t in per_query_scores)
    return torch.stack([t[:width] for t in per_query_scores]), torch.stack([t[:width] for t in per_query_slots])


def resolve(
    scores: torch.Tensor, slots: torch.Tensor, offsets: Sequence[int], k: int, segments: Sequence[Segment]
) -> SearchResults:
    """Sort (scores, global slots) best first and resolve slots to ids and metadata."""
    take = min(k, scores.shape[1])
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    scores, slots = scores[:, :take].contiguous(), slots.gather(1, order)[:, :take]
    starts = torch.tensor(list(offsets[: len(segments)]), dtype=torch.long)
    ids, meta = [], []
    for row in slots.tolist():
        row_ids, row_meta = [], []
        for slot in row:
            s_idx = int(torch.searchsorted(starts, slot, right=True)) - 1
            segment = segments[s_idx]
            r = slot - offsets[s_idx]
            row_ids.append(segment.ids[r])
            row_meta.append(segment.metadata[r] or {})
        ids.append(row_ids)
        meta.append(row_meta)
    return SearchResults(ids=ids, scores=scores.float(), metadata=meta)


def empty_results(nq: int) -> SearchResults:
    return SearchResults(ids=[[] for _ in range(nq)], scores=torch.empty(nq, 0), metadata=[[] for _ in range(nq)])
