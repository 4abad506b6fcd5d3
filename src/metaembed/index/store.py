"""The embedded default index: an on-disk, memory-mapped, prefix-grouped multi-vector store.

Layout (one directory; see docs/index.md for the full format and the crash-safety argument)::

    MANIFEST                    JSON, the single source of truth; replaced only by atomic rename (+ fsync);
                                names every segment file with its size and CRC-32
    seg-<gen>-<tag>.g<i>.bin    group i of a segment: (n, n_g, D) raw little-endian fp32 | bf16 | int8
    seg-<gen>-<tag>.s<i>.bin    int8 only: per-vector fp32 scales (n, n_g)
    seg-<gen>-<tag>.items.json  {"ids": [...], "metadata": [... | null]}

Vector positions are split into groups [0,1), [1,4), [4,8), [8,16), [16,64) (cut at ``num_vectors``), each a
contiguous array, so a search at budget ``r_c`` maps and reads only the groups holding its first ``r_c``
vectors. Segment files are written once, fsynced, and never modified; a write becomes visible (and
acknowledged) only when the new MANIFEST that names it has been renamed into place and the directory
fsynced. Deletes are tombstones in the manifest; ``compact()`` rewrites live rows into one segment.
One writer process at a time holds flock(2) on the directory itself (readers never lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import os
import secrets
import stat
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metaembed.auto_budget import is_auto
from metaembed.budget import Budget
from metaembed.errors import InputError, MetaEmbedError
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
    check_search,
)
from metaembed.index.storage import (
    MappedFile,
    crc32_file,
    fsync_dir,
    is_gone,
    storage_error,
    tensor_bytes,
    write_file,
)
from metaembed.index.validate import check_ids, check_metadata, check_unique
from metaembed.scoring import check_embeddings

log = logging.getLogger(__name__)

FORMAT = "metaembed-index"
VERSION = 1
MANIFEST = "MANIFEST"
DEFAULT_BOUNDS = (1, 4, 8, 16, 64)
_TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
_ITEMSIZE = {"fp32": 4, "bf16": 2, "int8": 1}
_SEARCH_BLOCK_ROWS = 262_144  # rows scored per kernel call: bounds the (nq, rows) score buffer
# Vector files up to this size are checksummed whenever a process maps them (about 10 ms each); larger ones
# by ``metaembed index verify`` and before a compaction rewrites them.
VERIFY_ON_OPEN_BYTES = 16 * 2**20
_OPEN_ATTEMPTS = 20  # a compaction may delete files between reading the manifest and mapping them


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


def _checksum(body: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _locked(method):
    """Run a method under the index's in-process lock (writes and snapshot swaps never interleave)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


def _storage(action: str):
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


def _guarded_read(method):
    """Check the snapshot's mapped files before and after a read that touches vector data.

    Before: a file whose size changed is reported instead of being read. After: a read that ran past the end of
    a file truncated meanwhile got zeros from the SIGBUS guard; its results are refused, never returned.
    """

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._auto_refresh()
        segments = self._segments
        self._check_mapped(segments)
        result = method(self, *args, **kwargs)
        self._check_mapped(segments)
        return result

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
    live: torch.Tensor  # (count,) bool; False = tombstoned; never changed in place (a new Segment per snapshot)
    files: list[MappedFile] = field(default_factory=list)  # the mappings behind groups and scales


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
        try:
            return cls._create(root, dim, num_vectors, dtype)
        except OSError as error:
            if isinstance(error, MetaEmbedError):
                raise
            raise storage_error(error, f"create an index at {root}") from error

    @classmethod
    def _create(cls, root: Path, dim: int, num_vectors: int, dtype: str) -> EmbeddedIndex:
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
        try:
            cls._publish(root, manifest)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(root, manifest, read_only=False, lock_fd=lock_fd)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, read_only: bool = False, **opts: Any) -> EmbeddedIndex:
        if opts:
            raise InputError(f"unknown option(s) for the embedded index: {', '.join(sorted(opts))}")
        if path is None:
            raise InputError("the embedded index needs a directory path")
        root = Path(path)
        try:
            return cls._open(root, read_only)
        except OSError as error:
            if isinstance(error, MetaEmbedError):
                raise
            raise storage_error(error, f"open the index at {root}") from error

    @classmethod
    def _open(cls, root: Path, read_only: bool) -> EmbeddedIndex:
        if not root.exists():
            raise IndexNotFoundError(f"no index at {root}: the path does not exist (create it with create_index)")
        if not root.is_dir():
            raise IndexFormatError(f"{root} is a file, not a metaembed index directory")
        if not (root / MANIFEST).exists():
            raise IndexNotFoundError(f"{root} holds no metaembed index (no {MANIFEST} file)")
        if not read_only:
            cls._check_can_write(root)
        for attempt in range(_OPEN_ATTEMPTS):
            manifest = cls._read_manifest(root)
            lock_fd = None
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
            except OSError as error:
                if lock_fd is not None:
                    os.close(lock_fd)
                if not is_gone(error) or attempt == _OPEN_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _check_can_write(root: Path) -> None:
        """A writer needs a writable directory; say so at open, not at the first add."""
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            raise ReadOnlyIndexError(
                f"{root} is on a read-only filesystem; open it read-only (open_index(path, read_only=True), "
                "metaembed serve --read-only)"
            )
        if not os.access(root, os.W_OK | os.X_OK):
            raise ReadOnlyIndexError(
                f"{root} is not writable by this user; open it read-only (open_index(path, read_only=True), "
                "metaembed serve --read-only) or fix its permissions"
            )

    @staticmethod
    def _lock(root: Path) -> int:
        """flock(2) the index directory itself: unlike a lock file, nobody can delete it from under the writer."""
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise IndexLockedError(
                f"{root} is open for writing by another process; open it with read_only=True to search"
            ) from None
        return fd

    def _check_lock(self) -> None:
        """Before a commit: the directory at ``path`` must still be the one this writer locked.

        If it was moved away or replaced, another writer may hold the new one; committing there would race it.
        """
        held = os.fstat(self._lock_fd)
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            raise IndexLockedError(
                f"{self.path} is no longer the directory this writer locked (it was moved or replaced while open); "
                "nothing was committed: reopen the index"
            )

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
                actual = (root / name).stat().st_size  # a file gone is retried by open() and refresh()
                if actual != size:
                    raise IndexFormatError(
                        f"{root / name} is {actual} bytes, the manifest says {size}: the file is truncated or foreign"
                    )

    @staticmethod
    def _publish(root: Path, manifest: dict[str, Any]) -> bool:
        """Commit point: write MANIFEST.tmp, fsync, rename over MANIFEST, fsync the directory.

        A failure before the rename raises and leaves no ``MANIFEST.tmp``: nothing was committed. After the rename
        the new manifest is in place and visible to every reader, so a failing directory fsync is logged, not
        raised (returns False): reporting the write as failed would make its retry collide with it, and the next
        commit's fsync makes it durable.
        """
        body = dict(manifest)
        body["checksum"] = _checksum(manifest)
        tmp = root / (MANIFEST + ".tmp")
        write_file(tmp, json.dumps(body, sort_keys=True).encode())
        try:
            os.replace(tmp, root / MANIFEST)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        try:
            fsync_dir(root)
        except OSError as error:
            log.error("index %s: committed, but fsync of the directory failed (%s)", root, error)
            return False
        return True

    # ------------------------------------------------------------------ in-memory snapshot

    def _vector_files(self, seg: dict[str, Any]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(file suffix, shape, dtype) of each vector file of a segment: group i, then its int8 scales."""
        n, out = seg["count"], []
        for i in range(len(self.bounds) - 1):
            width = self.bounds[i + 1] - self.bounds[i]
            out.append((f"g{i}.bin", (n, width, self.dim), _TORCH_DTYPE[self.dtype]))
            if self.dtype == "int8":
                out.append((f"s{i}.bin", (n, width), torch.float32))
        return out

    def _open_segment(self, seg: dict[str, Any], deleted: Sequence[int]) -> Segment:
        raw = (self.path / f"{seg['name']}.items.json").read_bytes()
        if zlib.crc32(raw) != seg["items_crc32"]:
            raise IndexFormatError(f"{self.path / seg['name']}.items.json fails its checksum: the file is corrupt")
        items = json.loads(raw.decode("utf-8"))
        n = seg["count"]
        groups, scales, files = [], [], []
        crcs = seg.get("crc32", {})  # absent in segments written before per-file checksums
        for suffix, shape, dtype in self._vector_files(seg):
            # mapped privately: pages are read lazily from the page cache, so indexes larger than RAM work
            mapped = MappedFile(self.path / f"{seg['name']}.{suffix}", math.prod(shape) * dtype.itemsize)
            if suffix in crcs and mapped.size <= VERIFY_ON_OPEN_BYTES and mapped.crc32() != crcs[suffix]:
                raise IndexFormatError(
                    f"{mapped.path} fails its checksum: the file is corrupt (metaembed index verify lists every "
                    "damaged file)"
                )
            files.append(mapped)
            (groups if suffix.startswith("g") else scales).append(mapped.tensor(shape, dtype))
        if self.dtype != "int8":
            scales = [None] * len(groups)
        live = torch.ones(n, dtype=torch.bool)
        if deleted:
            live[torch.tensor(list(deleted), dtype=torch.long)] = False
        return Segment(seg["name"], n, items["ids"], items["metadata"], groups, scales, live, files)

    def _check_mapped(self, segments: Sequence[Segment]) -> None:
        """IndexFormatError if a mapped file of ``segments`` changed size or was read past its end (see MappedFile)."""
        for segment in segments:
            for mapped in segment.files:
                mapped.check()

    def _load(self, manifest: dict[str, Any]) -> None:
        old = {s.name: s for s in self._segments}
        segments = []
        for seg in manifest["segments"]:
            deleted = manifest["deleted"].get(seg["name"], [])
            if seg["name"] in old:
                # a new Segment with its own mask (copy-on-write): a search still holding the old snapshot keeps
                # reading the old mask, so a delete never lands halfway through it
                live = torch.ones(old[seg["name"]].count, dtype=torch.bool)
                if deleted:
                    live[torch.tensor(deleted, dtype=torch.long)] = False
                segment = dataclasses.replace(old[seg["name"]], live=live)
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
    @_storage("refresh")
    def refresh(self) -> bool:
        """Reload if another process committed since this snapshot; returns True if the snapshot changed."""
        self._check_open()
        st = os.stat(self.path / MANIFEST)
        if self._manifest_stat == (st.st_ino, st.st_mtime_ns):
            return False
        for attempt in range(_OPEN_ATTEMPTS):
            manifest = self._read_manifest(self.path)
            try:
                self._check_files(self.path, manifest)
                self._load(manifest)
                return True
            except OSError as error:
                if not is_gone(error) or attempt == _OPEN_ATTEMPTS - 1:
                    raise
        return False

    def _remove_orphans(self) -> None:
        """Delete files of segments no manifest names (left by a crash or a compaction). Writer only."""
        keep = {MANIFEST}
        for seg in self._manifest["segments"]:
            keep.update(name for name, _ in self._segment_files(self._manifest, seg))
        for entry in self.path.iterdir():
            if entry.name not in keep and (entry.name.startswith("seg-") or entry.name.endswith(".tmp")):
                entry.unlink(missing_ok=True)

    def _remove_segment(self, name: str) -> None:
        """Remove the files of a segment no manifest names (cleanup after a failed write; errors ignored)."""
        for entry in self.path.glob(f"{name}.*"):
            with contextlib.suppress(OSError):
                entry.unlink()

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
        check_unique(ids)
        embeddings = embeddings.detach().to("cpu", torch.float32)
        if not torch.isfinite(embeddings).all():
            raise InputError("embeddings contain NaN or infinite values")
        return ids, embeddings, check_metadata(metadata, len(ids))

    def _write_segment(
        self, ids: list[str], embeddings: torch.Tensor, metadata: list[dict[str, Any] | None]
    ) -> dict[str, Any]:
        gen = self._manifest["generation"] + 1
        name = f"seg-{gen:08d}-{secrets.token_hex(4)}"
        if self.dtype == "int8":
            codes, scale = quantize_int8(embeddings)
        else:
            codes, scale = embeddings.to(_TORCH_DTYPE[self.dtype]), None
        crcs = {}
        try:
            for i in range(len(self.bounds) - 1):
                a, b = self.bounds[i], self.bounds[i + 1]
                crcs[f"g{i}.bin"] = write_file(self.path / f"{name}.g{i}.bin", tensor_bytes(codes[:, a:b]))
                if scale is not None:
                    crcs[f"s{i}.bin"] = write_file(self.path / f"{name}.s{i}.bin", tensor_bytes(scale[:, a:b]))
            return self._write_items(name, ids, metadata, crcs)
        except BaseException:
            self._remove_segment(name)
            raise

    def _write_items(
        self, name: str, ids: list[str], metadata: list[dict[str, Any] | None], crcs: dict[str, int]
    ) -> dict[str, Any]:
        """Write a segment's items file; returns its manifest entry (vector files already written, ``crcs``)."""
        raw = json.dumps({"ids": ids, "metadata": metadata}, ensure_ascii=False).encode("utf-8")
        items_crc = write_file(self.path / f"{name}.items.json", raw)
        return {"name": name, "count": len(ids), "items_bytes": len(raw), "items_crc32": items_crc, "crc32": crcs}

    def _commit(self, manifest: dict[str, Any], written: str | None = None) -> None:
        """Publish ``manifest``. If that fails before the commit point, the segment ``written`` for it is removed."""
        try:
            self._check_lock()
            fsync_dir(self.path)  # the new segment files' directory entries are durable before they are named
            self._publish(self.path, manifest)
        except BaseException:
            if written is not None and not self._committed(manifest):
                self._remove_segment(written)
            raise
        self._load(manifest)

    def _committed(self, manifest: dict[str, Any]) -> bool:
        """Whether ``manifest`` is the one on disk; True when that cannot be read (its files are then kept)."""
        try:
            return self._read_manifest(self.path)["generation"] == manifest["generation"]
        except (OSError, MetaEmbedError):
            return True

    def _compact_after_commit(self) -> None:
        """Merge segments if due, after a write has committed.

        A failure here (a full disk, a damaged old segment) is logged and the merge is tried again after the next
        write; it never turns the committed write into a reported failure (a retry would then collide with it).
        """
        try:
            self._maybe_compact()
        except (OSError, MetaEmbedError) as error:
            log.warning("index %s: merging segments failed, retried after the next write: %s", self.path, error)

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
    @_storage("write to")
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
        segment = self._write_segment(ids, embeddings, meta)
        manifest["segments"].append(segment)
        self._tombstone(manifest, existing)
        self._commit(manifest, written=segment["name"])
        self._compact_after_commit()

    def _tombstone(self, manifest: dict[str, Any], ids: Sequence[str]) -> None:
        for item_id in ids:
            s_idx, row = self._where[item_id]
            rows = manifest["deleted"].setdefault(self._segments[s_idx].name, [])
            rows.append(row)
        for rows in manifest["deleted"].values():
            rows.sort()

    @_locked
    @_storage("delete from")
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
        self._compact_after_commit()

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
    @_storage("compact")
    def compact(self, segments: Sequence[str] | None = None) -> None:
        """Rewrite the live rows of ``segments`` (default: all) into one new segment, dropping their tombstones.

        Atomic like every write: the merged segment is written and fsynced, then one manifest swap replaces
        the old segments by it; their files are removed only after that. Readers holding the old snapshot
        keep their (unlinked) mappings. The old segments' checksums are verified first, so a damaged file is
        reported (IndexFormatError) instead of being rewritten under a fresh checksum; a failed compaction
        removes what it wrote and leaves the index as it was.
        """
        self._check_writable()
        chosen = set(segments) if segments is not None else {s.name for s in self._segments}
        if len(chosen) <= 1 and not any(name in self._manifest["deleted"] for name in chosen):
            return
        merged = [s for s in self._segments if s.name in chosen]
        entries = {seg["name"]: seg for seg in self._manifest["segments"]}
        for segment in merged:
            self._verify_mapped(segment, entries[segment.name])
        manifest = self._next_manifest()
        manifest["segments"] = [seg for seg in manifest["segments"] if seg["name"] not in chosen]
        manifest["deleted"] = {k: v for k, v in manifest["deleted"].items() if k not in chosen}
        written = None
        if any(bool(s.live.any()) for s in merged):
            written = f"seg-{manifest['generation']:08d}-{secrets.token_hex(4)}"
            manifest["segments"].append(self._write_merged(written, merged))
        self._commit(manifest, written=written)
        self._remove_orphans()

    def _verify_mapped(self, segment: Segment, entry: dict[str, Any]) -> None:
        crcs = entry.get("crc32", {})
        for (suffix, _, _), mapped in zip(self._vector_files(entry), segment.files, strict=True):
            if suffix in crcs and mapped.crc32() != crcs[suffix]:
                raise IndexFormatError(
                    f"{mapped.path} fails its checksum: the file is corrupt; compaction refused to rewrite it "
                    "(metaembed index verify lists every damaged file)"
                )

    def _write_merged(self, name: str, merged: Sequence[Segment]) -> dict[str, Any]:
        """Write the live rows of ``merged`` as segment ``name``; its manifest entry. Removes its files on failure."""
        ids: list[str] = []
        meta: list[dict[str, Any] | None] = []
        suffixes = [suffix for suffix, _, _ in self._vector_files({"count": 0})]
        crcs = dict.fromkeys(suffixes, 0)
        handles = []
        try:
            for suffix in suffixes:
                handles.append(open(self.path / f"{name}.{suffix}", "wb"))  # noqa: SIM115
            for segment in merged:
                rows = torch.nonzero(segment.live).flatten()
                if rows.numel() == 0:
                    continue
                ids.extend(segment.ids[r] for r in rows.tolist())
                meta.extend(segment.metadata[r] for r in rows.tolist())
                parts = [t for pair in zip(segment.groups, segment.scales, strict=True) for t in pair if t is not None]
                for suffix, handle, part in zip(suffixes, handles, parts, strict=True):
                    data = tensor_bytes(part.index_select(0, rows))
                    handle.write(data)
                    crcs[suffix] = zlib.crc32(data, crcs[suffix])
            for handle in handles:
                handle.flush()
                os.fsync(handle.fileno())
            for handle in handles:
                handle.close()
            return self._write_items(name, ids, meta, crcs)
        except BaseException:
            for handle in handles:
                with contextlib.suppress(OSError):
                    handle.close()
            self._remove_segment(name)
            raise

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

    @_guarded_read
    @_storage("read")
    def get(self, ids: Sequence[str]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
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
        if not torch.isfinite(out).all():
            raise IndexFormatError(f"{self.path} holds non-finite values for {ids[:5]}: a vector file is corrupt")
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
        scores = maxsim_grouped(queries, groups, budget, scales if self.dtype == "int8" else None)
        # stored vectors and queries are finite (both checked on the way in), so a non-finite score means
        # bytes changed on disk: report it, never rank by it
        if not torch.isfinite(scores).all():
            raise IndexFormatError(
                f"{self.path / segment.name}.* holds non-finite values (scores are NaN or infinite): a vector file is "
                "corrupt, or its values overflow float32; metaembed index verify lists damaged files"
            )
        return scores

    @_guarded_read
    @_storage("search")
    def search(
        self,
        queries: torch.Tensor,
        budget: BudgetLike,
        k: int = 10,
        *,
        two_stage: bool = False,
        candidates: int | None = None,
    ) -> SearchResults:
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

    @classmethod
    def verify(cls, path: str | os.PathLike[str]) -> tuple[list[str], int]:
        """Read every file an index's manifest names and check its size and CRC-32; ``(problems, files checked)``.

        Works on a damaged index (it never maps or opens it for search), so every problem is listed, not just
        the first. Segments written before per-file checksums have their sizes checked only.
        """
        root = Path(path)
        try:
            if not (root / MANIFEST).exists():
                raise IndexNotFoundError(f"{root} holds no metaembed index (no {MANIFEST} file)")
            manifest = cls._read_manifest(root)
            problems, checked = [], 0
            for seg in manifest["segments"]:
                crcs = {**seg.get("crc32", {}), "items.json": seg["items_crc32"]}
                for name, size in cls._segment_files(manifest, seg):
                    checked += 1
                    problem = cls._verify_file(root / name, size, crcs.get(name.split(".", 1)[1]))
                    if problem:
                        problems.append(f"{name}: {problem}")
            return problems, checked
        except OSError as error:
            if isinstance(error, MetaEmbedError):
                raise
            raise storage_error(error, f"verify the index at {root}") from error

    @staticmethod
    def _verify_file(path: Path, size: int, crc: int | None) -> str | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return "missing"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size != size:
            return f"{st.st_size} bytes, the manifest says {size} (truncated or foreign)"
        if crc is not None and crc32_file(path) != crc:
            return "fails its checksum (corrupt)"
        return None

    @property
    def segments(self) -> list[Segment]:
        return self._segments

    @_storage("read")
    def stats(self) -> dict[str, Any]:
        self._auto_refresh()
        on_disk = 0
        for entry in self.path.iterdir():
            with contextlib.suppress(FileNotFoundError):  # a compaction in another process may remove it meanwhile
                st = entry.stat()
                on_disk += st.st_size if stat.S_ISREG(st.st_mode) else 0
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
