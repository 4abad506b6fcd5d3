"""Reading the embedded store: one immutable snapshot of its segments, refreshed from the manifest, searched.

:class:`SnapshotReader` is everything a read-only process does; the writer
(:class:`metaembed.index.store.EmbeddedIndex`) adds writes and merges on top. A snapshot is a list of
segments swapped whole under the lock, so a search that took it keeps reading the same rows and masks even
while a write commits.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from metaembed.budget import Budget
from metaembed.errors import InputError, MetaEmbedError
from metaembed.index import manifest as manifests
from metaembed.index import two_stage
from metaembed.index.base import IndexBase, IndexFormatError, SearchResults, UnknownIdError, budget_bytes
from metaembed.index.manifest import MANIFEST
from metaembed.index.scan import empty_results, offsets_of, rerank, resolve, scan
from metaembed.index.segment import Segment, open_segment
from metaembed.index.storage import storage_error
from metaembed.index.validate import check_ids


def locked(method):
    """Run a method under the index's in-process lock (writes and snapshot swaps never interleave)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


def reports_storage_errors(action: str):
    """Report an ``OSError`` from the filesystem as the matching index error (see ``storage_error``)."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except OSError as error:
                if isinstance(error, MetaEmbedError):
                    raise
                raise storage_error(error, f"{action} the index at {self.path}") from error

        return wrapper

    return decorate


def guarded_read(method):
    """Check the snapshot's mapped files before and after a read that touches vector data.

    Before: a file whose size changed is reported instead of being read. After: a read that ran past the end of
    a file truncated meanwhile got zeros from the SIGBUS guard; its results are refused, never returned.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._auto_refresh()
        segments = self._segments
        for segment in segments:
            segment.check()
        result = method(self, *args, **kwargs)
        for segment in segments:
            segment.check()
        return result

    return wrapper


class SnapshotReader(IndexBase):
    """Exact MaxSim over memory-mapped prefix groups of one committed snapshot (see the module docstring)."""

    backend = "embedded"
    runs_auto = True

    def __init__(self, path: Path, manifest: dict[str, Any], *, read_only: bool, lock_fd: int | None) -> None:
        self.path = path
        self.read_only = read_only
        self._lock_fd = lock_fd
        self.dim: int = manifest["dim"]
        self.num_vectors: int = manifest["num_vectors"]
        self.dtype: str = manifest["dtype"]
        self.bounds: list[int] = manifest["bounds"]
        self._manifest: dict[str, Any] = manifest
        self._manifest_stat: tuple[int, int] | None = None
        self._segments: list[Segment] = []
        self._where: dict[str, tuple[int, int]] = {}
        self._coarse: two_stage.CoarseIndex | None = None
        self._closed = False
        self._lock = threading.RLock()  # one in-process writer at a time; searches read immutable snapshots
        self._load(manifest)

    # ------------------------------------------------------------------ the snapshot

    def _load(self, manifest: dict[str, Any]) -> None:
        old = {s.name: s for s in self._segments}
        segments = []
        for entry in manifest["segments"]:
            deleted = manifest["deleted"].get(entry["name"], [])
            if entry["name"] in old:
                segments.append(old[entry["name"]].with_deleted(deleted))  # copy-on-write mask
            else:
                segments.append(open_segment(self.path, manifest, entry, deleted))
        where: dict[str, tuple[int, int]] = {}
        for s_idx, segment in enumerate(segments):
            for row in torch.nonzero(segment.live).flatten().tolist():
                where[segment.ids[row]] = (s_idx, row)
        self._segments, self._where, self._manifest = segments, where, manifest
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path / MANIFEST)
            self._manifest_stat = (st.st_ino, st.st_mtime_ns)

    @locked
    @reports_storage_errors("refresh")
    def refresh(self) -> bool:
        """Reload if another process committed since this snapshot; returns True if the snapshot changed."""
        self._check_open()
        st = os.stat(self.path / MANIFEST)
        if self._manifest_stat == (st.st_ino, st.st_mtime_ns):
            return False
        manifests.retry_when_gone(lambda: self._load(manifests.read_checked(self.path)))
        return True

    @property
    def segments(self) -> list[Segment]:
        return self._segments

    def _check_open(self) -> None:
        if self._closed:
            raise InputError(f"index {self.path} is closed")

    # ------------------------------------------------------------------ reads

    def __len__(self) -> int:
        self._auto_refresh()
        return len(self._where)

    def __contains__(self, item_id: object) -> bool:
        self._auto_refresh()
        return item_id in self._where

    def ids(self) -> list[str]:
        """Live ids in storage order."""
        self._auto_refresh()
        return list(self._where)

    def _auto_refresh(self) -> None:
        self._check_open()
        if self.read_only:
            self.refresh()

    @guarded_read
    @reports_storage_errors("read")
    def get(self, ids: Sequence[str]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        ids = check_ids(ids)
        unknown = [i for i in ids if i not in self._where]
        if unknown:
            raise UnknownIdError(f"{len(unknown)} id(s) not in the index, e.g. {unknown[:5]}")
        out = torch.empty(len(ids), self.num_vectors, self.dim)
        meta = []
        for j, item_id in enumerate(ids):
            s_idx, row = self._where[item_id]
            out[j] = self._segments[s_idx].vectors(row)
            meta.append(self._segments[s_idx].metadata[row] or {})
        if not torch.isfinite(out).all():
            raise IndexFormatError(f"{self.path} holds non-finite values for {ids[:5]}: a vector file is corrupt")
        return out, meta

    @guarded_read
    @reports_storage_errors("search")
    def _search(self, queries, budget: Budget, k: int, *, two_stage: bool, candidates: int | None) -> SearchResults:
        if two_stage:
            ranked = self.shortlist_ranked(queries, budget, k, candidates)
            if ranked is None:
                return empty_results(queries.shape[0])
            scores, slots, offsets, segments, _ = ranked
            return resolve(scores, slots, offsets, k, segments)
        segments = self._segments  # one snapshot for the whole search, even if a write lands meanwhile
        scores, slots, offsets = scan(queries, budget, k, segments)
        return resolve(scores, slots, offsets, k, segments)

    @guarded_read
    @reports_storage_errors("search")
    def _search_auto(self, queries, budget, k: int, *, two_stage: bool, candidates: int | None):
        from metaembed.index.adaptive import auto_search

        return auto_search(self, queries, budget, k, two_stage=two_stage, candidates=candidates)

    def shortlist_ranked(
        self, queries: torch.Tensor, budget: Budget, k: int, candidates: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[Segment], list[int]] | None:
        """Two-stage top ``k`` per query: ``(scores, global slots, segment offsets, segments, shortlist sizes)``.

        Scores and slots are ``(nq, k')``, unsorted; offsets has one entry per segment plus the total; the sizes
        are each query's number of coarse candidates scored exactly. None when the index holds no live item.
        """
        candidates = two_stage.check_candidates(candidates, k)
        # The snapshot, the graph's sync and its search happen under the lock: another search may extend the
        # shared graph past an older snapshot (rows this search could not resolve), and faiss HNSW must not be
        # searched while another thread adds to it. The exact rerank runs outside the lock.
        with self._lock:
            segments = self._segments
            if not any(bool(s.live.any()) for s in segments):
                return None
            self._coarse = two_stage.synced(self._coarse, self.path, segments, writer=not self.read_only)
            shortlists = two_stage.shortlists(self._coarse, queries[:, 0], segments, candidates)
        offsets = offsets_of(segments)
        scores, slots = rerank(queries, budget, k, segments, offsets, shortlists)
        return scores, slots, offsets, segments, [len(s) for s in shortlists]

    @reports_storage_errors("read")
    def stats(self) -> dict[str, Any]:
        self._auto_refresh()
        on_disk, seen = 0, set()
        for entry in self.path.iterdir():
            with contextlib.suppress(FileNotFoundError):  # a merge in another process may remove it meanwhile
                st = entry.stat()
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:  # an in-place merge links files
                    seen.add((st.st_dev, st.st_ino))
                    on_disk += st.st_size
        return {
            "backend": self.backend,
            "path": str(self.path),
            "count": len(self._where),
            "dim": self.dim,
            "num_vectors": self.num_vectors,
            "dtype": self.dtype,
            "segments": len(self._segments),
            "deleted_rows": sum(s.count - int(s.live.sum()) for s in self._segments),
            "generation": self._manifest["generation"],
            "bytes_on_disk": on_disk,
            "bytes_per_budget": budget_bytes(len(self._where), self.dim, self.dtype, Budget.LADDER, self.num_vectors),
        }

    def save(self) -> None:
        """Every write is already durable when it returns (fsync + atomic manifest rename); nothing to do."""
        self._check_open()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._segments, self._where, self._coarse = [], {}, None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __del__(self) -> None:
        try:  # noqa: SIM105 (at interpreter shutdown contextlib may already be gone)
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "writer"
        return (
            f"{type(self).__name__}({str(self.path)!r}, count={len(self._where)}, dim={self.dim}, "
            f"num_vectors={self.num_vectors}, dtype={self.dtype!r}, {mode})"
        )
