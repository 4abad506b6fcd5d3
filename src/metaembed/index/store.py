"""The embedded default index: an on-disk, memory-mapped, prefix-grouped multi-vector store.

One directory (see docs/index.md for the format and the crash-safety argument): a ``MANIFEST``
(:mod:`metaembed.index.manifest`) naming immutable segments (:mod:`metaembed.index.segment`). Vector
positions are split into groups [0,1), [1,4), [4,8), [8,16), [16,64) (cut at ``num_vectors``), each a
contiguous array, so a search at budget ``r_c`` maps and reads only the groups holding its first ``r_c``
vectors. A write becomes visible (and acknowledged) only when the new MANIFEST that names it has been
renamed into place and the directory fsynced. Deletes are tombstones in the manifest; merges rewrite live
rows into fewer segments (:mod:`metaembed.index.merge`). One writer process at a time holds flock(2) on the
directory itself (readers never lock); within a process the lock orders writes, snapshot swaps and the
two-stage graph. Reading and searching: :mod:`metaembed.index.reader`.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from metaembed.errors import InputError, MetaEmbedError
from metaembed.index import manifest as manifests
from metaembed.index.base import (
    DuplicateIdError,
    IndexExistsError,
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    ReadOnlyIndexError,
    UnknownIdError,
    check_dtype,
)
from metaembed.index.extend import trim_tails
from metaembed.index.layout import row_bytes
from metaembed.index.manifest import MANIFEST
from metaembed.index.merge import MergePolicy, merge_segments
from metaembed.index.reader import SnapshotReader, locked, reports_storage_errors
from metaembed.index.segment import SegmentWriter, segment_name, verify_all
from metaembed.index.storage import fsync_dir, storage_error
from metaembed.index.validate import check_ids, check_write

log = logging.getLogger(__name__)


def _check_positive(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")


class EmbeddedIndex(SnapshotReader):
    """The default :class:`metaembed.index.base.Index`: exact MaxSim over memory-mapped prefix groups.

    Open with ``metaembed.index.create_index(path, dim, num_vectors, dtype)`` or ``open_index(path)``.
    A writer holds an exclusive lock on the directory; ``open_index(path, read_only=True)`` gives readers
    that search a consistent snapshot while the writer appends, refreshing to the latest commit on each
    search. ``merge_policy`` decides when a write merges segments (see :mod:`metaembed.index.merge`).
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        *,
        read_only: bool,
        lock_fd: int | None,
        merge_policy: MergePolicy | None = None,
    ) -> None:
        self.merge_policy = merge_policy or MergePolicy()
        super().__init__(path, manifest, read_only=read_only, lock_fd=lock_fd)

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls, path: str | os.PathLike[str], *, dim: int, num_vectors: int, dtype: str = "bf16", **opts: Any
    ) -> EmbeddedIndex:
        policy = cls._policy(opts)
        if path is None:
            raise InputError("the embedded index needs a directory path")
        check_dtype(dtype)
        _check_positive(dim=dim, num_vectors=num_vectors)
        root = Path(path)
        try:
            if root.exists() and not root.is_dir():
                raise IndexExistsError(f"{root} exists and is not a directory; pick a new path for the index")
            if (root / MANIFEST).exists():
                raise IndexExistsError(f"{root} already holds an index; open it with open_index({str(root)!r})")
            if root.exists() and any(root.iterdir()):
                raise IndexExistsError(f"{root} is a non-empty directory; create the index in a new or empty directory")
            root.mkdir(parents=True, exist_ok=True)
            lock_fd = cls._flock(root)
            manifest = manifests.new(dim, num_vectors, dtype)
            try:
                manifests.publish(root, manifest)
            except BaseException:
                os.close(lock_fd)
                raise
        except OSError as error:
            if isinstance(error, MetaEmbedError):
                raise
            raise storage_error(error, f"create an index at {root}") from error
        return cls(root, manifest, read_only=False, lock_fd=lock_fd, merge_policy=policy)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, read_only: bool = False, **opts: Any) -> EmbeddedIndex:
        policy = cls._policy(opts)
        if path is None:
            raise InputError("the embedded index needs a directory path")
        root = Path(path)
        try:
            if not root.exists():
                raise IndexNotFoundError(f"no index at {root}: the path does not exist (create it with create_index)")
            if not root.is_dir():
                raise IndexFormatError(f"{root} is a file, not a metaembed index directory")
            if not (root / MANIFEST).exists():
                raise IndexNotFoundError(f"{root} holds no metaembed index (no {MANIFEST} file)")
            if read_only:
                return manifests.retry_when_gone(
                    lambda: cls(root, manifests.read_checked(root), read_only=True, lock_fd=None)
                )
            cls._check_can_write(root)
            manifests.retry_when_gone(
                lambda: manifests.read_checked(root)
            )  # a damaged index is reported before locking
            lock_fd = cls._flock(root)
            try:
                # read after the lock: the previous writer may have committed meanwhile
                index = cls(root, manifests.read_checked(root), read_only=False, lock_fd=lock_fd, merge_policy=policy)
            except BaseException:
                os.close(lock_fd)
                raise
            index._remove_orphans(trim=True)
            return index
        except OSError as error:
            if isinstance(error, MetaEmbedError):
                raise
            raise storage_error(error, f"open the index at {root}") from error

    @staticmethod
    def _policy(opts: dict[str, Any]) -> MergePolicy | None:
        policy = opts.pop("merge_policy", None)
        if opts:
            raise InputError(f"unknown option(s) for the embedded index: {', '.join(sorted(opts))}")
        if policy is not None and not isinstance(policy, MergePolicy):
            raise InputError(f"merge_policy must be a metaembed.index.merge.MergePolicy, got {type(policy).__name__}")
        return policy

    @staticmethod
    def _check_can_write(root: Path) -> None:
        """A writer needs a writable directory; say so at open, not at the first add."""
        how = "open it read-only (open_index(path, read_only=True), metaembed serve --read-only)"
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            raise ReadOnlyIndexError(f"{root} is on a read-only filesystem; {how}")
        if not os.access(root, os.W_OK | os.X_OK):
            raise ReadOnlyIndexError(f"{root} is not writable by this user; {how} or fix its permissions")

    @staticmethod
    def _flock(root: Path) -> int:
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

    def _remove_orphans(self, *, trim: bool = False) -> None:
        """Delete files of segments no manifest names (left by a crash or a merge). Writer only.

        ``trim`` (at open): also truncate bytes past the manifest's rows that an in-place merge killed before its
        commit appended to a segment's files (see :func:`metaembed.index.extend.trim_tails`)."""
        keep = {MANIFEST}
        for entry in self._manifest["segments"]:
            keep.update(name for name, _ in manifests.segment_files(self._manifest, entry))
        for entry in self.path.iterdir():
            if entry.name not in keep and (entry.name.startswith("seg-") or entry.name.endswith(".tmp")):
                entry.unlink(missing_ok=True)
        if trim and (trimmed := trim_tails(self.path, self._manifest)):
            log.info("index %s: truncated %d file(s) to the manifest's rows (an interrupted merge)", self.path, trimmed)

    # ------------------------------------------------------------------ writes

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnlyIndexError(f"index {self.path} was opened read_only; open it without read_only to write")

    def add(
        self, ids: Sequence[str], embeddings: torch.Tensor, metadata: Sequence[dict[str, Any]] | None = None
    ) -> None:
        self._write(ids, embeddings, metadata, replace=False)

    def upsert(
        self, ids: Sequence[str], embeddings: torch.Tensor, metadata: Sequence[dict[str, Any]] | None = None
    ) -> None:
        self._write(ids, embeddings, metadata, replace=True)

    @locked
    @reports_storage_errors("write to")
    def _write(self, ids, embeddings, metadata, *, replace: bool) -> None:
        self._check_writable()
        ids, embeddings, meta = check_write(ids, embeddings, metadata, dim=self.dim, num_vectors=self.num_vectors)
        existing = [i for i in ids if i in self._where]
        if existing and not replace:
            raise DuplicateIdError(
                f"{len(existing)} id(s) already in the index, e.g. {existing[:5]}; use upsert to replace them"
            )
        draft = manifests.next_generation(self._manifest)
        with SegmentWriter(self.path, draft, segment_name(draft["generation"])) as writer:
            writer.append_embeddings(ids, embeddings, meta)
            draft["segments"].append(writer.finish())
        self._tombstone(draft, existing)
        self._commit(draft, written=writer)
        self._merge_after_commit()

    def _tombstone(self, draft: dict[str, Any], ids: Sequence[str]) -> None:
        for item_id in ids:
            s_idx, row = self._where[item_id]
            draft["deleted"].setdefault(self._segments[s_idx].name, []).append(row)
        for rows in draft["deleted"].values():
            rows.sort()

    @locked
    @reports_storage_errors("delete from")
    def delete(self, ids: Sequence[str]) -> None:
        self._check_writable()
        ids = list(dict.fromkeys(check_ids(ids)))
        unknown = [i for i in ids if i not in self._where]
        if unknown:
            raise UnknownIdError(f"{len(unknown)} id(s) not in the index, e.g. {unknown[:5]}; nothing was deleted")
        if not ids:
            return
        draft = manifests.next_generation(self._manifest)
        self._tombstone(draft, ids)
        self._commit(draft)
        self._merge_after_commit()

    def _commit(self, draft: dict[str, Any], written: SegmentWriter | None = None) -> None:
        """Publish ``draft``. If that fails before the commit point, the segment ``written`` for it is undone
        (removed; an in-place merge also truncates its base's files back to the base's rows)."""
        try:
            self._check_lock()
            fsync_dir(self.path)  # the new segment files' directory entries are durable before they are named
            manifests.publish(self.path, draft)
        except BaseException:
            if written is not None and not self._committed(draft):
                written._abandon()
            raise
        self._load(draft)

    def _committed(self, draft: dict[str, Any]) -> bool:
        """Whether ``draft`` is the manifest on disk; True when that cannot be read (its files are then kept)."""
        try:
            return manifests.read(self.path)["generation"] == draft["generation"]
        except (OSError, MetaEmbedError):
            return True

    def _merge_after_commit(self) -> None:
        """Merge segments if the policy says so, after a write has committed.

        A failure here (a full disk, a damaged old segment) is logged and the merge is tried again after the next
        write; it never turns the committed write into a reported failure (a retry would then collide with it).
        """
        try:
            self._maybe_compact()
        except (OSError, MetaEmbedError) as error:
            log.warning("index %s: merging segments failed, retried after the next write: %s", self.path, error)

    def _maybe_compact(self) -> None:
        if self.merge_policy.on_write:
            self.merge()

    @locked
    @reports_storage_errors("merge segments of")
    def merge(self) -> int:
        """Run the merges the policy asks for until it asks for none; returns how many ran.

        With ``MergePolicy(on_write=False)`` this is the only time segments merge, so call it between batches
        of adds. Each merge is atomic like every write; a full disk is reported before anything is written.
        """
        self._check_writable()
        done = 0
        while chosen := self.merge_policy.pick(self._segments, row_bytes(self._manifest)):
            self.compact(chosen)
            done += 1
        return done

    @locked
    @reports_storage_errors("compact")
    def compact(self, segments: Sequence[str] | None = None) -> None:
        """Rewrite the live rows of ``segments`` (default: all) into one new segment, dropping their tombstones.

        Atomic like every write (see :func:`metaembed.index.merge.merge_segments`): readers holding the old
        snapshot keep their (unlinked) mappings; a damaged old segment is reported, never rewritten; a failed
        merge (a full disk) removes what it wrote and leaves the index as it was.
        """
        self._check_writable()
        chosen = set(segments) if segments is not None else {s.name for s in self._segments}
        if len(chosen) <= 1 and not any(name in self._manifest["deleted"] for name in chosen):
            return
        draft, written = merge_segments(self.path, self._manifest, self._segments, chosen)
        self._commit(draft, written=written)
        self._remove_orphans()

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
            return verify_all(root, manifests.read(root))
        except OSError as error:
            if isinstance(error, MetaEmbedError):
                raise
            raise storage_error(error, f"verify the index at {root}") from error
