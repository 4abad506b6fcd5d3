"""Two-stage search: coarse candidates from the (1,1) vectors with faiss HNSW, exact rerank at the budget.

Stage 1 scores every item by one inner product — query vector 0 against candidate vector 0, i.e. MaxSim at
budget (1,1) — through an HNSW graph (``faiss.IndexHNSWFlat``, inner product), so it touches a few thousand
items instead of N. Stage 2 reads only the candidates' rows of the groups the budget needs and scores them
exactly with ``maxsim_grouped``. With ``candidates >= len(index)`` and ``ef_search >= N`` it returns the same
items as exhaustive search; smaller ``candidates`` trade recall for speed (benchmarks/two_stage.py).

The graph is built on the first two-stage search (cost reported by the benchmark), extended incrementally when
segments are appended, and saved beside the index by the writer (``ann.json`` → ``ann-*.faiss``, faiss' own
format) whenever it has grown by more than 10 %, so other processes load it instead of rebuilding; a
compaction invalidates it (it no longer covers a prefix of the segments) and it is rebuilt.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
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
ANN_POINTER = "ann.json"
ANN_FORMAT = "metaembed-ann-hnsw"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("two-stage search needs faiss-cpu: pip install 'metaembed[ann]'") from None
    return faiss


def default_candidates(k: int) -> int:
    return max(10 * k, 100)


class CoarseIndex:
    """faiss HNSW over vector 0 of every stored row (live or tombstoned), numbered like the store's slots."""

    def __init__(self, dim: int, m: int | None = None, ef_construction: int | None = None) -> None:
        faiss = _faiss()

        m = m or HNSW_M
        ef_construction = ef_construction or HNSW_EF_CONSTRUCTION
        self.dim, self.m, self.ef_construction = dim, m, ef_construction
        self.index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.covered: list[tuple[str, int]] = []
        self.saved_rows = 0

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

    def save(self, root: Path) -> None:
        """Persist the graph beside the index (writer only): a faiss file under a fresh name, then ``ann.json``
        (which names it and the segments it covers) replaced by atomic rename. Never pickle: faiss' own format."""
        faiss = _faiss()

        name = f"ann-{secrets.token_hex(6)}.faiss"
        tmp = root / f"{name}.tmp"
        faiss.write_index(self.index, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, root / name)
        pointer = {
            "format": ANN_FORMAT,
            "file": name,
            "covered": self.covered,
            "dim": self.dim,
            "m": self.m,
            "ef_construction": self.ef_construction,
        }
        with open(root / f"{ANN_POINTER}.tmp", "w") as f:
            json.dump(pointer, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(root / f"{ANN_POINTER}.tmp", root / ANN_POINTER)
        for old in root.glob("ann-*.faiss"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.saved_rows = self.index.ntotal

    @classmethod
    def load(cls, root: Path, segments: list[Segment]) -> CoarseIndex | None:
        """The saved graph if it covers a prefix of ``segments`` (else None: it is rebuilt)."""
        faiss = _faiss()

        try:
            pointer = json.loads((root / ANN_POINTER).read_text())
            covered = [(str(name), int(count)) for name, count in pointer["covered"]]
            if pointer.get("format") != ANN_FORMAT:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if [(s.name, s.count) for s in segments][: len(covered)] != covered:
            return None
        try:
            index = faiss.read_index(str(root / pointer["file"]))
        except (RuntimeError, OSError):
            return None
        if index.d != pointer["dim"] or index.ntotal != sum(count for _, count in covered):
            return None
        obj = cls.__new__(cls)
        obj.dim, obj.m, obj.ef_construction = pointer["dim"], pointer["m"], pointer["ef_construction"]
        obj.index, obj.covered, obj.saved_rows = index, covered, index.ntotal
        return obj

    def search(self, first_query_vectors: torch.Tensor, n: int) -> np.ndarray:
        """Global row numbers ``(nq, n)`` of the best (1,1) matches (-1 where the graph found fewer)."""
        self.index.hnsw.efSearch = max(n, MIN_EF_SEARCH)
        q = np.ascontiguousarray(first_query_vectors.float().numpy(), dtype=np.float32)
        _, rows = self.index.search(q, n)
        return rows


def two_stage_search(
    store: EmbeddedIndex, queries: torch.Tensor, budget: Budget, k: int, candidates: int | None
) -> SearchResults:
    ranked = shortlist_ranked(store, queries, budget, k, candidates)
    if ranked is None:
        nq = queries.shape[0]
        return SearchResults(ids=[[] for _ in range(nq)], scores=torch.empty(nq, 0), metadata=[[] for _ in range(nq)])
    scores, slots, offsets, segments, _ = ranked
    return store._results(scores, slots, offsets[:-1], k, segments)


def shortlist_ranked(
    store: EmbeddedIndex, queries: torch.Tensor, budget: Budget, k: int, candidates: int | None
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[Segment], list[int]] | None:
    """The two-stage top ``k`` per query: ``(scores, global slots, segment offsets, segments, shortlist sizes)``.

    Scores and slots are ``(nq, k')``, unsorted; offsets has one entry per segment plus the total; the sizes
    are each query's number of coarse candidates scored exactly. None when the index holds no live item.
    """
    if candidates is None:
        candidates = default_candidates(k)
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise InputError(f"candidates must be a positive int, got {candidates!r}")
    candidates = max(candidates, k)
    nq = queries.shape[0]
    # The snapshot, the graph's sync and its search happen under the store's lock: another search may extend
    # the shared graph past an older snapshot (rows this search could not resolve), and faiss HNSW must not be
    # searched while another thread adds to it. Scoring the rerank below runs outside the lock.
    with store._lock:
        segments = store.segments
        offsets = np.cumsum([0] + [s.count for s in segments]).tolist()
        total = offsets[-1]
        live = torch.cat([s.live for s in segments]).numpy() if segments else np.zeros(0, dtype=bool)
        live_count = int(live.sum())
        if live_count == 0:
            return None
        coarse = store._coarse
        if coarse is None:
            coarse = CoarseIndex.load(store.path, segments) or CoarseIndex(store.dim)
        store._coarse = coarse = coarse.sync(segments)
        if not store.read_only and coarse.index.ntotal > 1.1 * coarse.saved_rows:
            coarse.save(store.path)  # so the next process (e.g. a restarted server) need not rebuild it
        dead = total - live_count
        rows = coarse.search(queries[:, 0], min(total, candidates + dead))

    per_query_scores, per_query_slots, sizes = [], [], []
    for i in range(nq):
        hits = rows[i][rows[i] >= 0]
        hits = hits[live[hits]][:candidates]
        q_scores, q_slots = score_slots(store, queries[i : i + 1], budget, segments, offsets, hits)
        top, idx = q_scores.topk(min(k, q_scores.numel()))
        per_query_scores.append(top)
        per_query_slots.append(q_slots[idx])
        sizes.append(len(hits))
    width = min(t.numel() for t in per_query_scores)
    scores = torch.stack([t[:width] for t in per_query_scores])
    slots = torch.stack([t[:width] for t in per_query_slots])
    return scores, slots, offsets, segments, sizes


def score_slots(
    store: EmbeddedIndex,
    query: torch.Tensor,
    budget: Budget,
    segments: list[Segment],
    offsets: list[int],
    slots: np.ndarray | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact MaxSim of one query ``(1, R_q, D)`` against the rows at global ``slots`` of a snapshot.

    Returns ``(scores, slots)`` with the slots sorted (rows are read in storage order, one kernel call per
    segment), the scores aligned with them.
    """
    hits = np.sort(np.asarray(slots, dtype=np.int64))
    starts = np.asarray(offsets[:-1])
    seg_of = np.searchsorted(starts, hits, side="right") - 1
    scores, out_slots = [torch.empty(0)], [torch.empty(0, dtype=torch.long)]
    for s_idx in np.unique(seg_of):
        global_rows = hits[seg_of == s_idx]
        local = torch.from_numpy(global_rows - offsets[s_idx])
        scores.append(store.score_rows(query, budget, segments[int(s_idx)], local)[0])
        out_slots.append(torch.from_numpy(global_rows))
    return torch.cat(scores), torch.cat(out_slots)
