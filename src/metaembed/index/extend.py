"""A merge that keeps its first input's rows where they are: :class:`SegmentExtender`, and the cleanup after one.

The new segment's vector files are hard links to that input's files, and the other inputs' rows are appended past
its rows — no byte a manifest names is ever changed (docs/index.md, "Merges extend in place").
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
from pathlib import Path
from typing import Any

from metaembed.index.base import IndexFormatError
from metaembed.index.manifest import segment_files
from metaembed.index.segment import Segment, SegmentWriter, vector_files
from metaembed.index.storage import fsync_dir, open_existing

# os.link errors of a filesystem without hard links (or with a link limit): the merge rewrites instead
NO_LINKS = (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS)


class CannotExtendError(OSError):
    """A merge cannot extend its base in place (no hard links here, or a base file that another directory also
    names, e.g. a ``cp -al`` backup, whose copy must not grow); nothing was written: merge by rewriting."""


def extendable(segment: Segment, entry: dict[str, Any], layout: dict[str, Any]) -> bool:
    """Whether a merge may keep ``segment``'s rows in place and append to its files (see :class:`SegmentExtender`).

    Every row live (a tombstoned row would stay in the files), and a CRC-32 for every vector file in its entry, so
    the merged files' checksums continue from them. The layout (dim, dtype, groups) is the index's, the same for
    every segment."""
    crcs = entry.get("crc32", {})
    return (
        segment.count > 0
        and bool(segment.live.all())
        and all(suffix in crcs for suffix, _, _ in vector_files(layout, 0))
    )


class SegmentExtender(SegmentWriter):
    """Writes a merge's result by extending its first input, ``base``, in place instead of copying its rows.

    Each new vector file is a hard link to the base's file (the same bytes on disk), opened for writing at the
    base's row count; the other inputs' rows are appended past it, so the merge writes only their bytes and a
    new items file. The bytes the base's manifest entry counts are never changed: a reader that mapped them keeps
    its rows, and every manifest still names files holding at least the bytes it counts. Bytes appended and not
    committed (a failure here, or a crash before the manifest is published) lie past the base's count: readers
    never map them, ``_abandon`` (or, after a crash, the next writer open: ``trim_tails``) truncates them.
    The new files' CRC-32s continue from the base's (``zlib.crc32`` of the appended bytes from the old value);
    the caller verifies the base's checksums first, so they describe the bytes that are there.
    Only a base file that no other directory entry names is extended (CannotExtendError otherwise): a hard-link
    backup of the index must not see its files grow, nor truncate ours when it is opened.
    """

    def __init__(self, root: Path, layout: dict[str, Any], name: str, base: Segment, entry: dict[str, Any]) -> None:
        super().__init__(root, layout, name)
        self.base = base
        self.sizes = {
            suffix: math.prod(shape) * dtype.itemsize for suffix, shape, dtype in vector_files(layout, base.count)
        }
        self.crcs = {suffix: entry["crc32"][suffix] for suffix in self.suffixes}
        self.ids = list(base.ids)
        self.metadata = list(base.metadata)
        self._inodes: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> SegmentExtender:
        try:
            for suffix in self.suffixes:
                self._link(suffix)
        except BaseException:
            self._abandon()
            raise
        return self

    def _link(self, suffix: str) -> None:
        source, target = self.root / f"{self.base.name}.{suffix}", self.root / f"{self.name}.{suffix}"
        st = os.lstat(source)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise CannotExtendError(errno.EMLINK, f"{source} is not a file only this index names; not extended")
        try:
            os.link(source, target, follow_symlinks=False)
        except OSError as error:
            if error.errno in NO_LINKS:
                raise CannotExtendError(error.errno, f"cannot hard-link {source}: {error.strerror}") from error
            raise
        handle = open_existing(target)
        self._handles.append(handle)
        st = os.fstat(handle.fileno())
        if st.st_nlink != 2:
            raise CannotExtendError(errno.EMLINK, f"{source} gained a link meanwhile; not extended")
        if st.st_size < self.sizes[suffix]:
            raise IndexFormatError(
                f"{source} is {st.st_size} bytes, the manifest says {self.sizes[suffix]}: the file is truncated; "
                "the merge refused to extend it"
            )
        self._inodes[suffix] = (st.st_dev, st.st_ino)
        handle.truncate(self.sizes[suffix])  # bytes an interrupted extension left past the base's rows
        handle.seek(self.sizes[suffix])

    def finish(self) -> dict[str, Any]:
        entry = super().finish()
        fsync_dir(self.root)  # the links' directory entries are durable before the manifest names them
        return entry

    def _abandon(self) -> None:
        super()._abandon()  # closes the files and unlinks the new names
        for suffix, inode in self._inodes.items():  # then takes the base's files back to its rows
            with contextlib.suppress(OSError):
                fd = os.open(self.root / f"{self.base.name}.{suffix}", os.O_WRONLY | os.O_NOFOLLOW)
                try:
                    st = os.fstat(fd)
                    if (st.st_dev, st.st_ino) == inode and st.st_nlink == 1 and st.st_size > self.sizes[suffix]:
                        os.ftruncate(fd, self.sizes[suffix])
                        os.fsync(fd)
                finally:
                    os.close(fd)


def trim_tails(root: Path, manifest: dict[str, Any]) -> int:
    """Truncate vector files the manifest names to its sizes; returns how many were longer (writer only).

    Bytes past a file's size belong to no committed row: an in-place merge killed before its manifest was
    published appended them. No reader maps them: every reader maps what its manifest counts, and no manifest
    counts more of a file than the one in place (a name's count never changes; an extension publishes a new
    name). A file another directory entry also names (a hard-link backup) is left alone.
    """
    trimmed = 0
    for entry in manifest["segments"]:
        for name, size in segment_files(manifest, entry):
            if name.endswith(".items.json"):
                continue
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(root / name)
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size > size:
                    os.truncate(root / name, size)
                    trimmed += 1
    return trimmed
