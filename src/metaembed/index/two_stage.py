"""Two-stage search: coarse candidates from the (1,1) vectors with faiss HNSW, exact rerank at the budget.

Stage 1 scores every item by one inner product — query vector 0 against candidate vector 0, i.e. MaxSim at
budget (1,1) — through an HNSW graph (``faiss.IndexHNSWFlat``, inner product), so it touches a few thousand
items instead of N. Stage 2 reads only the candidates' rows of the groups the budget needs and scores them
exactly with ``maxsim_grouped``. With ``candidates >= len(index)`` and ``ef_search >= N`` it returns the same
items as exhaustive search; smaller ``candidates`` trade recall for speed (benchmarks/two_stage.py).

The graph lives in memory, is built on the first two-stage search of a snapshot (cost reported by the
benchmark) and extended incrementally when segments are appended; a compaction rebuilds it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from metaembed.budget import Budget
from metaembed.errors import InputError
from metaembed.index.base import SearchResults

if TYPE_CHECKING:
    from metaembed.index.store import EmbeddedIndex, Segment

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
MIN_EF_SEARCH = 64


def default_candidates(k: int) -> int:
    return max(10 * k, 100)


class CoarseIndex:
    """faiss HNSW over vector 0 of every stored row (live or tombstoned), numbered like the store's slots."""

    def __init__(self, dim: int, m: int | None = None, ef_construction: int | None = None) -> None:
        import faiss

        m = m or HNSW_M
        ef_construction = ef_construction or HNSW_EF_CONSTRUCTION
        self.dim, self.m, self.ef_construction = dim, m, ef_construction
        self.index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.covered: list[tuple[str, int]] = []

    def sync(self, segments: list[Segment]) -> CoarseIndex:
        """Add the rows of segments appended since the last sync; rebuild if segments were rewritten."""
        names = [(s.name, s.count) for s in segments]
        if names[: len(self.covered)] != self.covered:
            fresh = CoarseIndex(self.dim, self.m, self.ef_construction)
            return fresh.sync(segments)
        for segment in segments[len(self.covered) :]:
            for lo in range(0, segment.count, 65536):
                first = segment.groups[0][lo : lo + 65536, 0].float()
                if segment.scales[0] is not None:
                    first = first * segment.scales[0][lo : lo + 65536, 0, None]
                self.index.add(np.ascontiguousarray(first.numpy(), dtype=np.float32))
            self.covered.append((segment.name, segment.count))
        return self

    def search(self, first_query_vectors: torch.Tensor, n: int) -> np.ndarray:
        """Global row numbers ``(nq, n)`` of the best (1,1) matches (-1 where the graph found fewer)."""
        self.index.hnsw.efSearch = max(n, MIN_EF_SEARCH)
        q = np.ascontiguousarray(first_query_vectors.float().numpy(), dtype=np.float32)
        _, rows = self.index.search(q, n)
        return rows


def two_stage_search(
    store: EmbeddedIndex, queries: torch.Tensor, budget: Budget, k: int, candidates: int | None
) -> SearchResults:
    if candidates is None:
        candidates = default_candidates(k)
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise InputError(f"candidates must be a positive int, got {candidates!r}")
    candidates = max(candidates, k)
    nq = queries.shape[0]
    segments = store.segments  # one snapshot for the whole search
    offsets = np.cumsum([0] + [s.count for s in segments]).tolist()
    total = offsets[-1]
    live = torch.cat([s.live for s in segments]).numpy() if segments else np.zeros(0, dtype=bool)
    live_count = int(live.sum())
    if live_count == 0:
        return SearchResults(ids=[[] for _ in range(nq)], scores=torch.empty(nq, 0), metadata=[[] for _ in range(nq)])

    with store._lock:  # one graph per index, extended by whichever search sees new segments first
        coarse = store._coarse if store._coarse is not None else CoarseIndex(store.dim)
        store._coarse = coarse = coarse.sync(segments)
    dead = total - live_count
    rows = coarse.search(queries[:, 0], min(total, candidates + dead))

    starts = np.asarray(offsets[:-1])
    per_query_scores, per_query_slots = [], []
    for i in range(nq):
        hits = rows[i][rows[i] >= 0]
        hits = hits[live[hits]][:candidates]
        hits.sort()
        seg_of = np.searchsorted(starts, hits, side="right") - 1
        scores, slots = [torch.empty(0)], [torch.empty(0, dtype=torch.long)]
        for s_idx in np.unique(seg_of):
            global_rows = hits[seg_of == s_idx]
            local = torch.from_numpy(global_rows - offsets[s_idx])
            scores.append(store.score_rows(queries[i : i + 1], budget, segments[int(s_idx)], local)[0])
            slots.append(torch.from_numpy(global_rows))
        q_scores, q_slots = torch.cat(scores), torch.cat(slots)
        top, idx = q_scores.topk(min(k, q_scores.numel()))
        per_query_scores.append(top)
        per_query_slots.append(q_slots[idx])
    width = min(t.numel() for t in per_query_scores)
    scores = torch.stack([t[:width] for t in per_query_scores])
    slots = torch.stack([t[:width] for t in per_query_slots])
    return store._results(scores, slots, offsets[:-1], k, segments)
