"""The embedded default index: an on-disk, memory-mapped, prefix-grouped multi-vector store.

Layout (one directory; see docs/index.md for the full format and the crash-safety argument)::

    MANIFEST                    JSON, the single source of truth; replaced only by atomic rename (+ fsync)
    LOCK                        flock(2) target: one writer process at a time; readers never lock
    seg-<gen>-<tag>.g<i>.bin    group i of a segment: (n, n_g, D) raw little-endian fp32 | bf16 | int8
    seg-<gen>-<tag>.s<i>.bin    int8 only: per-vector fp32 scales (n, n_g)
    seg-<gen>-<tag>.items.json  {"ids": [...], "metadata": [... | null]}

Vector positions are split into groups [0,1), [1,4), [4,8), [8,16), [16,64) (cut at ``num_vectors``), each a
contiguous array, so a search at budget ``r_c`` maps and reads only the groups holding its first ``r_c``
vectors. Segment files are written once, fsynced, and never modified; a write becomes visible (and
acknowledged) only when the new MANIFEST that names it has been renamed into place and the directory
fsynced. Deletes are tombstones in the manifest; ``compact()`` rewrites live rows into one segment.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import secrets
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metaembed.auto_budget import is_auto
from metaembed.budget import Budget
from metaembed.errors import InputError
from metaembed.index.base import (
    BudgetLike,
    DuplicateIdError,
    IndexExistsError,
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    ReadOnlyIndexError,
    SearchResults,
    UnknownIdError,
    budget_bytes,
    check_dtype,
    check_ids,
    check_search,
)
from metaembed.scoring import check_embeddings

FORMAT = "metaembed-index"
VERSION = 1
MANIFEST = "MANIFEST"
LOCK = "LOCK"
DEFAULT_BOUNDS = (1, 4, 8, 16, 64)
_TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
_ITEMSIZE = {"fp32": 4, "bf16": 2, "int8": 1}
_SEARCH_BLOCK_ROWS = 262_144  # rows scored per kernel call: bounds the (nq, rows) score buffer


def group_bounds(num_vectors: int) -> list[int]:
    """Group boundaries [0, 1, 4, 8, 16, 64, ...] cut at ``num_vectors`` (which is always the last bound)."""
    return [0, *[b for b in DEFAULT_BOUNDS if b < num_vectors], num_vectors]


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-vector int8: ``x ≈ codes * scale[..., None]``, ``scale = max|x| / 127`` (1 for zero vectors)."""
    x = x.float()
    absmax = x.abs().amax(dim=-1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    codes = torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """Write and fsync a new file (the caller fsyncs the directory before publishing it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _checksum(body: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _dump_metadata(metadata: Sequence[dict[str, Any]] | None, n: int) -> list[dict[str, Any] | None]:
    if metadata is None:
        return [None] * n
    if isinstance(metadata, dict | str | bytes):
        raise InputError("metadata must be a sequence of dicts, one per item (or None)")
    metadata = list(metadata)
    if len(metadata) != n:
        raise InputError(f"got {len(metadata)} metadata entries for {n} items; pass one dict per item or None")
    out: list[dict[str, Any] | None] = []
    for i, entry in enumerate(metadata):
        if entry is None:
            out.append(None)
            continue
        if not isinstance(entry, dict):
            raise InputError(f"metadata[{i}] must be a dict or None, got {type(entry).__name__}")
        try:
            text = json.dumps(entry, allow_nan=False, ensure_ascii=False)
            text.encode("utf-8")
        except (TypeError, ValueError) as error:
            raise InputError(
                f"metadata[{i}] is not JSON-serialisable ({error}); use str/int/float/bool/list/dict"
            ) from None
        out.append(json.loads(text))
    return out


def _locked(method):
    """Run a method under the index's in-process lock (writes and snapshot swaps never interleave)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class Segment:
    """One immutable batch of rows: its group arrays (memory-mapped) and its ids and metadata."""

    name: str
    count: int
    ids: list[str]
    metadata: list[dict[str, Any] | None]
    groups: list[torch.Tensor]
    scales: list[torch.Tensor | None]
    live: torch.Tensor  # (count,) bool; False = tombstoned


class EmbeddedIndex:
    """The default :class:`metaembed.index.base.Index`: exact MaxSim over memory-mapped prefix groups.

    Open with ``metaembed.index.create_index(path, dim, num_vectors, dtype)`` or ``open_index(path)``.
    A writer holds an exclusive lock on the directory; ``open_index(path, read_only=True)`` gives readers
    that search a consistent snapshot while the writer appends, refreshing to the latest commit on each
    search.
    """

    backend = "embedded"

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
        self._coarse = None
        self._closed = False
        self._lock = threading.RLock()  # one in-process writer at a time; searches read immutable snapshots
        self._load(manifest)

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], *, dim: int, num_vectors: int, dtype: str = "bf16", **opts: Any
    ) -> EmbeddedIndex:
        if opts:
            raise InputError(f"unknown option(s) for the embedded index: {', '.join(sorted(opts))}")
        if path is None:
            raise InputError("the embedded index needs a directory path")
        check_dtype(dtype)
        for name, value in (("dim", dim), ("num_vectors", num_vectors)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise IndexExistsError(f"{root} exists and is not a directory; pick a new path for the index")
        if (root / MANIFEST).exists():
            raise IndexExistsError(f"{root} already holds an index; open it with open_index({str(root)!r})")
        if root.exists() and any(root.iterdir()):
            raise IndexExistsError(f"{root} is a non-empty directory; create the index in a new or empty directory")
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = cls._lock(root)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dim": dim,
            "num_vectors": num_vectors,
            "dtype": dtype,
            "bounds": group_bounds(num_vectors),
            "generation": 0,
            "segments": [],
            "deleted": {},
        }
        cls._publish(root, manifest)
        return cls(root, manifest, read_only=False, lock_fd=lock_fd)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, read_only: bool = False, **opts: Any) -> EmbeddedIndex:
        if opts:
            raise InputError(f"unknown option(s) for the embedded index: {', '.join(sorted(opts))}")
        if path is None:
            raise InputError("the embedded index needs a directory path")
        root = Path(path)
        if not root.exists():
            raise IndexNotFoundError(f"no index at {root}: the path does not exist (create it with create_index)")
        if not root.is_dir():
            raise IndexFormatError(f"{root} is a file, not a metaembed index directory")
        if not (root / MANIFEST).exists():
            raise IndexNotFoundError(f"{root} holds no metaembed index (no {MANIFEST} file)")
        for attempt in range(20):  # a compaction may delete files between reading the manifest and mapping them
            manifest = cls._read_manifest(root)
            try:
                cls._check_files(root, manifest)
                if read_only:
                    return cls(root, manifest, read_only=True, lock_fd=None)
                lock_fd = cls._lock(root)
                manifest = cls._read_manifest(root)  # the writer may have committed before we got the lock
                cls._check_files(root, manifest)
                index = cls(root, manifest, read_only=False, lock_fd=lock_fd)
                index._remove_orphans()
                return index
            except FileNotFoundError:
                if attempt == 19:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _lock(root: Path) -> int:
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexLockedError(
                f"{root} is open for writing by another process; open it with read_only=True to search"
            ) from None
        return fd

    @staticmethod
    def _read_manifest(root: Path) -> dict[str, Any]:
        raw = (root / MANIFEST).read_bytes()
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise IndexFormatError(
                f"{root / MANIFEST} is not a metaembed manifest (truncated or foreign): {error}"
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IndexFormatError(f"{root / MANIFEST} is not a metaembed index manifest (format != {FORMAT!r})")
        if manifest.get("version") != VERSION:
            raise IndexFormatError(
                f"{root} is index format version {manifest.get('version')!r}; this metaembed reads version {VERSION}"
            )
        checksum = manifest.pop("checksum", None)
        if checksum != _checksum(manifest):
            raise IndexFormatError(f"{root / MANIFEST} fails its checksum: the file is corrupt")
        return manifest

    @staticmethod
    def _segment_files(manifest: dict[str, Any], seg: dict[str, Any]) -> list[tuple[str, int]]:
        """(file name, expected size) of every file of a segment."""
        bounds, dim, dtype, n = manifest["bounds"], manifest["dim"], manifest["dtype"], seg["count"]
        files = []
        for i in range(len(bounds) - 1):
            width = bounds[i + 1] - bounds[i]
            files.append((f"{seg['name']}.g{i}.bin", n * width * dim * _ITEMSIZE[dtype]))
            if dtype == "int8":
                files.append((f"{seg['name']}.s{i}.bin", n * width * 4))
        files.append((f"{seg['name']}.items.json", seg["items_bytes"]))
        return files

    @classmethod
    def _check_files(cls, root: Path, manifest: dict[str, Any]) -> None:
        for seg in manifest["segments"]:
            for name, size in cls._segment_files(manifest, seg):
                actual = (root / name).stat().st_size  # FileNotFoundError is retried by open()
                if actual != size:
                    raise IndexFormatError(
                        f"{root / name} is {actual} bytes, the manifest says {size}: the file is truncated or foreign"
                    )

    @staticmethod
    def _publish(root: Path, manifest: dict[str, Any]) -> None:
        """Commit point: write MANIFEST.tmp, fsync, rename over MANIFEST, fsync the directory."""
        body = dict(manifest)
        body["checksum"] = _checksum(manifest)
        tmp = root / (MANIFEST + ".tmp")
        _write_file(tmp, json.dumps(body, sort_keys=True).encode())
        os.replace(tmp, root / MANIFEST)
        _fsync_dir(root)

    # ------------------------------------------------------------------ in-memory snapshot

    def _map(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        # MAP_PRIVATE mapping: pages are read lazily from the page cache, so indexes larger than RAM work.
        return torch.from_file(str(self.path / name), shared=False, size=numel, dtype=dtype).view(shape)

    def _open_segment(self, seg: dict[str, Any], deleted: Sequence[int]) -> Segment:
        raw = (self.path / f"{seg['name']}.items.json").read_bytes()
        if zlib.crc32(raw) != seg["items_crc32"]:
            raise IndexFormatError(f"{self.path / seg['name']}.items.json fails its checksum: the file is corrupt")
        items = json.loads(raw.decode("utf-8"))
        n = seg["count"]
        groups, scales = [], []
        for i in range(len(self.bounds) - 1):
            width = self.bounds[i + 1] - self.bounds[i]
            groups.append(self._map(f"{seg['name']}.g{i}.bin", (n, width, self.dim), _TORCH_DTYPE[self.dtype]))
            scales.append(
                self._map(f"{seg['name']}.s{i}.bin", (n, width), torch.float32) if self.dtype == "int8" else None
            )
        live = torch.ones(n, dtype=torch.bool)
        if deleted:
            live[torch.tensor(list(deleted), dtype=torch.long)] = False
        return Segment(seg["name"], n, items["ids"], items["metadata"], groups, scales, live)

    def _load(self, manifest: dict[str, Any]) -> None:
        old = {s.name: s for s in self._segments}
        segments = []
        for seg in manifest["segments"]:
            deleted = manifest["deleted"].get(seg["name"], [])
            if seg["name"] in old:
                segment = old[seg["name"]]
                live = torch.ones(segment.count, dtype=torch.bool)
                if deleted:
                    live[torch.tensor(deleted, dtype=torch.long)] = False
                segment.live = live
            else:
                segment = self._open_segment(seg, deleted)
            segments.append(segment)
        where: dict[str, tuple[int, int]] = {}
        for s_idx, segment in enumerate(segments):
            for row in torch.nonzero(segment.live).flatten().tolist():
                where[segment.ids[row]] = (s_idx, row)
        self._segments, self._where, self._manifest = segments, where, manifest
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path / MANIFEST)
            self._manifest_stat = (st.st_ino, st.st_mtime_ns)

    @_locked
    def refresh(self) -> bool:
        """Reload if another process committed since this snapshot; returns True if the snapshot changed."""
        self._check_open()
        st = os.stat(self.path / MANIFEST)
        if self._manifest_stat == (st.st_ino, st.st_mtime_ns):
            return False
        for attempt in range(20):
            manifest = self._read_manifest(self.path)
            try:
                self._check_files(self.path, manifest)
                self._load(manifest)
                return True
            except FileNotFoundError:
                if attempt == 19:
                    raise
        return False

    def _remove_orphans(self) -> None:
        """Delete files of segments no manifest names (left by a crash or a compaction). Writer only."""
        keep = {MANIFEST, LOCK}
        for seg in self._manifest["segments"]:
            keep.update(name for name, _ in self._segment_files(self._manifest, seg))
        for entry in self.path.iterdir():
            if entry.name not in keep and (entry.name.startswith("seg-") or entry.name.endswith(".tmp")):
                entry.unlink(missing_ok=True)

    # ------------------------------------------------------------------ writes

    def _check_open(self) -> None:
        if self._closed:
            raise InputError(f"index {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnlyIndexError(f"index {self.path} was opened read_only; open it without read_only to write")

    def _prepare(
        self, ids: Sequence[str], embeddings: torch.Tensor, metadata: Sequence[dict[str, Any]] | None
    ) -> tuple[list[str], torch.Tensor, list[dict[str, Any] | None]]:
        ids = check_ids(ids)
        check_embeddings(embeddings, "embeddings", num_vectors=self.num_vectors, dim=self.dim)
        if len(ids) != embeddings.shape[0]:
            raise InputError(f"got {len(ids)} ids for {embeddings.shape[0]} embeddings; pass one id per item")
        seen: set[str] = set()
        repeated = sorted({i for i in ids if i in seen or seen.add(i)})
        if repeated:
            raise DuplicateIdError(f"ids repeat within one call: {repeated[:5]}; each id may appear once")
        embeddings = embeddings.detach().to("cpu", torch.float32)
        if not torch.isfinite(embeddings).all():
            raise InputError("embeddings contain NaN or infinite values")
        return ids, embeddings, _dump_metadata(metadata, len(ids))

    def _write_segment(
        self, ids: list[str], embeddings: torch.Tensor, metadata: list[dict[str, Any] | None]
    ) -> dict[str, Any]:
        gen = self._manifest["generation"] + 1
        name = f"seg-{gen:08d}-{secrets.token_hex(4)}"
        n = len(ids)
        if self.dtype == "int8":
            codes, scale = quantize_int8(embeddings)
        else:
            codes, scale = embeddings.to(_TORCH_DTYPE[self.dtype]), None
        for i in range(len(self.bounds) - 1):
            a, b = self.bounds[i], self.bounds[i + 1]
            _write_file(self.path / f"{name}.g{i}.bin", _tensor_bytes(codes[:, a:b]))
            if scale is not None:
                _write_file(self.path / f"{name}.s{i}.bin", _tensor_bytes(scale[:, a:b]))
        raw = json.dumps({"ids": ids, "metadata": metadata}, ensure_ascii=False).encode("utf-8")
        _write_file(self.path / f"{name}.items.json", raw)
        return {"name": name, "count": n, "items_bytes": len(raw), "items_crc32": zlib.crc32(raw)}

    def _commit(self, manifest: dict[str, Any]) -> None:
        _fsync_dir(self.path)  # the new segment files' directory entries are durable before they are named
        self._publish(self.path, manifest)
        self._load(manifest)

    def _next_manifest(self) -> dict[str, Any]:
        manifest = json.loads(json.dumps(self._manifest))
        manifest["generation"] += 1
        return manifest

    def add(
        self, ids: Sequence[str], embeddings: torch.Tensor, metadata: Sequence[dict[str, Any]] | None = None
    ) -> None:
        self._write(ids, embeddings, metadata, replace=False)

    def upsert(
        self, ids: Sequence[str], embeddings: torch.Tensor, metadata: Sequence[dict[str, Any]] | None = None
    ) -> None:
        self._write(ids, embeddings, metadata, replace=True)

    @_locked
    def _write(
        self,
        ids: Sequence[str],
        embeddings: torch.Tensor,
        metadata: Sequence[dict[str, Any]] | None,
        *,
        replace: bool,
    ) -> None:
        self._check_writable()
        ids, embeddings, meta = self._prepare(ids, embeddings, metadata)
        existing = [i for i in ids if i in self._where]
        if existing and not replace:
            raise DuplicateIdError(
                f"{len(existing)} id(s) already in the index, e.g. {existing[:5]}; use upsert to replace them"
            )
        manifest = self._next_manifest()
        manifest["segments"].append(self._write_segment(ids, embeddings, meta))
        self._tombstone(manifest, existing)
        self._commit(manifest)
        self._maybe_compact()

    def _tombstone(self, manifest: dict[str, Any], ids: Sequence[str]) -> None:
        for item_id in ids:
            s_idx, row = self._where[item_id]
            rows = manifest["deleted"].setdefault(self._segments[s_idx].name, [])
            rows.append(row)
        for rows in manifest["deleted"].values():
            rows.sort()

    @_locked
    def delete(self, ids: Sequence[str]) -> None:
        self._check_writable()
        ids = check_ids(ids)
        unknown = [i for i in dict.fromkeys(ids) if i not in self._where]
        if unknown:
            raise UnknownIdError(f"{len(unknown)} id(s) not in the index, e.g. {unknown[:5]}; nothing was deleted")
        if not ids:
            return
        manifest = self._next_manifest()
        self._tombstone(manifest, list(dict.fromkeys(ids)))
        self._commit(manifest)
        self._maybe_compact()

    def _maybe_compact(self, max_segments: int = 32) -> None:
        """Size-tiered merging: many segments → merge the small ones; mostly-dead index → full compaction."""
        dead = sum(s.count - int(s.live.sum()) for s in self._segments)
        total = sum(s.count for s in self._segments)
        if dead > 1024 and dead > total // 2:
            self.compact()
        elif len(self._segments) > max_segments:
            small = [s.name for s in self._segments if s.count <= max(1, total // max_segments)]
            self.compact(None if len(small) < 2 else small)

    @_locked
    def compact(self, segments: Sequence[str] | None = None) -> None:
        """Rewrite the live rows of ``segments`` (default: all) into one new segment, dropping their tombstones.

        Atomic like every write: the merged segment is written and fsynced, then one manifest swap replaces
        the old segments by it; their files are removed only after that. Readers holding the old snapshot
        keep their (unlinked) mappings.
        """
        self._check_writable()
        chosen = set(segments) if segments is not None else {s.name for s in self._segments}
        if len(chosen) <= 1 and not any(name in self._manifest["deleted"] for name in chosen):
            return
        merged = [s for s in self._segments if s.name in chosen]
        manifest = self._next_manifest()
        manifest["segments"] = [seg for seg in manifest["segments"] if seg["name"] not in chosen]
        manifest["deleted"] = {k: v for k, v in manifest["deleted"].items() if k not in chosen}
        if any(bool(s.live.any()) for s in merged):
            gen = manifest["generation"]
            name = f"seg-{gen:08d}-{secrets.token_hex(4)}"
            ids: list[str] = []
            meta: list[dict[str, Any] | None] = []
            handles = []
            for i in range(len(self.bounds) - 1):
                handles.append(open(self.path / f"{name}.g{i}.bin", "wb"))  # noqa: SIM115
                if self.dtype == "int8":
                    handles.append(open(self.path / f"{name}.s{i}.bin", "wb"))  # noqa: SIM115
            try:
                for segment in merged:
                    rows = torch.nonzero(segment.live).flatten()
                    if rows.numel() == 0:
                        continue
                    ids.extend(segment.ids[r] for r in rows.tolist())
                    meta.extend(segment.metadata[r] for r in rows.tolist())
                    h = iter(handles)
                    for group, scale in zip(segment.groups, segment.scales, strict=True):
                        next(h).write(_tensor_bytes(group.index_select(0, rows)))
                        if scale is not None:
                            next(h).write(_tensor_bytes(scale.index_select(0, rows)))
                for handle in handles:
                    handle.flush()
                    os.fsync(handle.fileno())
            finally:
                for handle in handles:
                    handle.close()
            raw = json.dumps({"ids": ids, "metadata": meta}, ensure_ascii=False).encode("utf-8")
            _write_file(self.path / f"{name}.items.json", raw)
            manifest["segments"].append(
                {"name": name, "count": len(ids), "items_bytes": len(raw), "items_crc32": zlib.crc32(raw)}
            )
        self._commit(manifest)
        self._remove_orphans()

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

    def get(self, ids: Sequence[str]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        self._auto_refresh()
        ids = check_ids(ids)
        unknown = [i for i in ids if i not in self._where]
        if unknown:
            raise UnknownIdError(f"{len(unknown)} id(s) not in the index, e.g. {unknown[:5]}")
        out = torch.empty(len(ids), self.num_vectors, self.dim)
        meta = []
        for j, item_id in enumerate(ids):
            s_idx, row = self._where[item_id]
            segment = self._segments[s_idx]
            for i, (group, scale) in enumerate(zip(segment.groups, segment.scales, strict=True)):
                values = group[row].float()
                if scale is not None:
                    values = values * scale[row, :, None]
                out[j, self.bounds[i] : self.bounds[i + 1]] = values
            meta.append(segment.metadata[row] or {})
        return out, meta

    def _groups_for(self, segment: Segment, budget: Budget, rows: slice | torch.Tensor):
        """The groups (and scales) a budget reads, restricted to ``rows``; later groups are never touched."""
        groups, scales = [], []
        for i, (group, scale) in enumerate(zip(segment.groups, segment.scales, strict=True)):
            if self.bounds[i] >= budget.r_c:
                break
            if isinstance(rows, slice):
                groups.append(group[rows])
                scales.append(None if scale is None else scale[rows])
            else:
                groups.append(group.index_select(0, rows))
                scales.append(None if scale is None else scale.index_select(0, rows))
        return groups, scales

    def score_rows(
        self, queries: torch.Tensor, budget: Budget, segment: Segment, rows: slice | torch.Tensor
    ) -> torch.Tensor:
        """Exact MaxSim ``(nq, n_rows)`` of queries against some rows of one segment (used by two-stage rerank)."""
        from metaembed.index.kernels import maxsim_grouped

        groups, scales = self._groups_for(segment, budget, rows)
        return maxsim_grouped(queries, groups, budget, scales if self.dtype == "int8" else None)

    def search(
        self,
        queries: torch.Tensor,
        budget: BudgetLike,
        k: int = 10,
        *,
        two_stage: bool = False,
        candidates: int | None = None,
    ) -> SearchResults:
        self._auto_refresh()
        if is_auto(budget):  # "auto" or an AutoBudget: a cheap budget, escalated per query when unsure
            from metaembed.index.adaptive import auto_search

            return auto_search(self, queries, budget, k, two_stage=two_stage, candidates=candidates)
        budget = check_search(
            queries, budget, k, dim=self.dim, num_vectors=self.num_vectors, two_stage=two_stage, candidates=candidates
        )
        queries = queries.detach().cpu()
        if two_stage:
            from metaembed.index.two_stage import two_stage_search

            return two_stage_search(self, queries, budget, k, candidates)
        segments = self._segments  # one snapshot for the whole search, even if a write lands meanwhile
        return self._results(*self.scan(queries, budget, k, segments), k, segments)

    def scan(
        self, queries: torch.Tensor, budget: Budget, k: int, segments: list[Segment]
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Exhaustive exact top ``k`` over a snapshot: ``(scores, global slots, segment offsets)``, unsorted."""
        nq = queries.shape[0]
        best_scores = torch.full((nq, 0), float("-inf"))
        best_slots = torch.empty((nq, 0), dtype=torch.long)
        offset = 0
        offsets = []
        for segment in segments:
            offsets.append(offset)
            for lo in range(0, segment.count, _SEARCH_BLOCK_ROWS):
                hi = min(segment.count, lo + _SEARCH_BLOCK_ROWS)
                live = segment.live[lo:hi]
                if not live.any():
                    continue
                scores = self.score_rows(queries, budget, segment, slice(lo, hi))
                scores[:, ~live] = float("-inf")
                take = min(k, int(live.sum()))
                top, idx = scores.topk(take, dim=1)
                best_scores = torch.cat([best_scores, top], dim=1)
                best_slots = torch.cat([best_slots, idx + offset + lo], dim=1)
                if best_scores.shape[1] > k:
                    best_scores, keep = best_scores.topk(k, dim=1)
                    best_slots = best_slots.gather(1, keep)
            offset += segment.count
        return best_scores, best_slots, offsets

    def _results(
        self, scores: torch.Tensor, slots: torch.Tensor, offsets: list[int], k: int, segments: list[Segment]
    ) -> SearchResults:
        """Sort (scores, global slots) best first and resolve slots to ids and metadata."""
        take = min(k, scores.shape[1])
        scores, order = scores.sort(dim=1, descending=True, stable=True)
        scores, slots = scores[:, :take].contiguous(), slots.gather(1, order)[:, :take]
        starts = torch.tensor(offsets, dtype=torch.long)
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

    # ------------------------------------------------------------------ housekeeping

    @property
    def segments(self) -> list[Segment]:
        return self._segments

    def stats(self) -> dict[str, Any]:
        self._auto_refresh()
        on_disk = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
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

    def __enter__(self) -> EmbeddedIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:  # noqa: SIM105 (at interpreter shutdown contextlib may already be gone)
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "writer"
        return (
            f"EmbeddedIndex({str(self.path)!r}, count={len(self._where)}, dim={self.dim}, "
            f"num_vectors={self.num_vectors}, dtype={self.dtype!r}, {mode})"
        )
