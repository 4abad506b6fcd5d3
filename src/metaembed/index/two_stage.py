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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from metaembed.errors import InputError
from metaembed.index.layout import default_candidates
from metaembed.index.segment import Segment

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

    def sync(self, segments: Sequence[Segment]) -> CoarseIndex:
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
    def load(cls, root: Path, segments: Sequence[Segment]) -> CoarseIndex | None:
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


def check_candidates(candidates: int | None, k: int) -> int:
    """The shortlist length per query: ``candidates`` (default ``max(10·k, 100)``), at least ``k``."""
    if candidates is None:
        candidates = default_candidates(k)
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise InputError(f"candidates must be a positive int, got {candidates!r}")
    return max(candidates, k)


def synced(graph: CoarseIndex | None, root: Path, segments: Sequence[Segment], *, writer: bool) -> CoarseIndex:
    """The graph covering ``segments``: ``graph`` extended, else the one saved beside the index, else a new one.

    A writer saves it whenever it has grown by more than 10 %, so the next process (a restarted server) loads it
    instead of rebuilding. Not thread-safe: faiss HNSW must not be searched while another thread adds to it, so
    the caller holds its lock around this and :func:`shortlists`.
    """
    if graph is None:
        graph = CoarseIndex.load(root, segments) or CoarseIndex(segments[0].groups[0].shape[2])
    graph = graph.sync(segments)
    if writer and graph.index.ntotal > 1.1 * graph.saved_rows:
        graph.save(root)
    return graph


def shortlists(
    graph: CoarseIndex, first_query_vectors: torch.Tensor, segments: Sequence[Segment], candidates: int
) -> list[np.ndarray]:
    """Per query, the global slots of up to ``candidates`` live rows with the best (1,1) scores, best first."""
    live = torch.cat([s.live for s in segments]).numpy()
    total, dead = live.size, live.size - int(live.sum())
    rows = graph.search(first_query_vectors, min(total, candidates + dead))  # dead rows are in the graph too
    out = []
    for found in rows:
        hits = found[found >= 0]
        out.append(hits[live[hits]][:candidates])
    return out
