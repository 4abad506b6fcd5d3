"""The embedded store's files on disk: written once and fsynced, mapped with their size checked and a SIGBUS guard,
checksummed, and every ``OSError`` turned into an index error a user can act on.

A mapped file that something outside metaembed truncates (or replaces by a shorter one) must never end the process:
:class:`MappedFile` checks the size before mapping, :meth:`MappedFile.check` re-checks it (and the guard's fault
count) around every read, and the guard (:mod:`metaembed.index.mapguard`) answers a read past the new end with
zeros that the next check reports as :class:`IndexFormatError`.

A file may be longer than the manifest says: a merge extends its first input in place (appends rows, then
publishes a manifest with the larger count; see :mod:`metaembed.index.merge`). Only the manifest's bytes are
mapped, checksummed and read; bytes past them belong to no committed row (an extension in flight, or one a
crash interrupted, which the writer truncates when it next opens the index). Only a file shorter than the
manifest says is damaged.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import weakref
import zlib
from pathlib import Path

import torch

from metaembed.errors import MetaEmbedError
from metaembed.index.base import IndexFormatError, IndexStorageError, ReadOnlyIndexError
from metaembed.index.mapguard import Guard

CRC_CHUNK = 8 * 2**20  # bytes checksummed per step: bounds the memory a check of a large file pins
_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_A_FILE = (errno.EISDIR, errno.ENOTDIR)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> int:
    """Write and fsync a new file; returns its CRC-32. A failed write (disk full) removes what it wrote."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        raise
    return zlib.crc32(data)


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def crc32_file(path: Path, size: int | None = None) -> int:
    """CRC-32 of a file's first ``size`` bytes (default: all), read in chunks with ``read`` (never mapped: a file
    shrinking meanwhile cannot fault)."""
    crc, left = 0, size
    with open(path, "rb") as f:
        while chunk := f.read(CRC_CHUNK if left is None else min(CRC_CHUNK, left)):
            crc = zlib.crc32(chunk, crc)
            if left is not None:
                left -= len(chunk)
    return crc


class MappedFile:
    """One segment file mapped privately and read-only in practice (pages are read lazily from the page cache).

    The size is checked on the open descriptor before mapping: the file holds at least the manifest's ``size``
    bytes, and exactly those are mapped (bytes an in-place merge appends later, or appended and never committed,
    lie past the mapping). The guard covers the whole mapping until the last tensor viewing it is gone.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        fd = os.open(path, os.O_RDONLY)  # FileNotFoundError: the caller retries with a newer manifest
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IndexFormatError(f"{path} is not a regular file: the index is damaged")
            if st.st_size < size:
                raise IndexFormatError(
                    f"{path} is {st.st_size} bytes, the manifest says {size}: the file is truncated or foreign"
                )
            # MAP_PRIVATE with write permission: torch.frombuffer wants a writable buffer; nothing writes to it,
            # and a stray write would only change this process's copy, never the file.
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=prot) if size else None
        finally:
            os.close(fd)
        if self._map is None:
            self._bytes = torch.empty(0, dtype=torch.uint8)
            self._guard = None
            return
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._guard = Guard(self._bytes.data_ptr(), size)
        # release the guard's slot only when the mapping itself goes (tensors of old snapshots may outlive us)
        weakref.finalize(self._map, self._guard.release)

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._bytes.view(dtype).view(shape)

    def check(self) -> None:
        """Raise IndexFormatError if the file shrank below the mapping or a read ran past its end since it was
        mapped (growing is an in-place merge appending rows past the mapping: not a change to what it maps)."""
        if self._map is None:
            return
        faulted = self._guard is not None and self._guard.faults() > 0
        try:
            now = self._map.size()  # fstat of the mapped file itself, wherever its name now points
        except OSError:
            now = -1
        if faulted or now < self.size:
            raise IndexFormatError(
                f"{self.path} changed while the index was open (it is {now} bytes, the manifest says {self.size}"
                f"{'; a read ran past its end' if faulted else ''}): restore the file and reopen the index"
            )

    def crc32(self) -> int:
        """CRC-32 of the mapped bytes, in chunks (guarded: a file truncated meanwhile is reported by ``check``)."""
        if self._map is None:
            return zlib.crc32(b"")
        crc = 0
        view = memoryview(self._map)
        try:
            for lo in range(0, self.size, CRC_CHUNK):
                crc = zlib.crc32(view[lo : lo + CRC_CHUNK], crc)
        finally:
            view.release()
        self.check()
        return crc


def storage_error(error: OSError, action: str) -> MetaEmbedError:
    """The index error for an ``OSError`` raised while ``action`` (e.g. "add to the index at /x")."""
    if isinstance(error, MetaEmbedError):
        return error
    where = f" ({error.filename})" if error.filename else ""
    reason = error.strerror or str(error)
    if error.errno == errno.EROFS:
        return ReadOnlyIndexError(
            f"cannot {action}: the filesystem is read-only{where}; open the index read-only "
            "(open_index(path, read_only=True), metaembed serve --read-only)"
        )
    if error.errno in _NOT_A_FILE:
        return IndexFormatError(f"cannot {action}: {reason}{where}; the index is damaged (a directory, not a file)")
    if error.errno == errno.ENOENT:
        return IndexFormatError(f"cannot {action}: a file the manifest names is missing{where}; the index is damaged")
    if error.errno in _FULL:
        message = f"cannot {action}: the disk is full{where}; free space and retry"
    else:
        message = f"cannot {action}: {reason}{where}"
    wrapped = IndexStorageError(message)
    wrapped.errno = error.errno
    return wrapped


def is_gone(error: BaseException) -> bool:
    """True for the errors a file removed under a reader raises (a compaction deleted it: reread the manifest)."""
    return isinstance(error, FileNotFoundError) or (isinstance(error, OSError) and error.errno == errno.ESTALE)


def open_new(path: Path):
    """Open a new file for writing (the segment writer's files; one place to watch a disk fill up)."""
    return open(path, "wb")


def open_existing(path: Path):
    """Open an existing file for writing without truncating it (an in-place merge appends to its base's files)."""
    return open(path, "r+b")
