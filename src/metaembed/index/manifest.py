"""The embedded store's MANIFEST: the single source of truth, read with its checksum, published by atomic rename.

``MANIFEST`` is JSON naming every segment (its row count, file sizes and CRC-32s), the tombstoned rows and a
generation counter. A write becomes visible only when :func:`publish` has renamed a new manifest into place and
fsynced the directory; readers take whatever manifest is in place and map the files it names.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from metaembed.index.base import IndexFormatError
from metaembed.index.layout import ITEMSIZE, group_bounds
from metaembed.index.storage import fsync_dir, is_gone, write_file

log = logging.getLogger(__name__)

FORMAT = "metaembed-index"
VERSION = 1
MANIFEST = "MANIFEST"
# A compaction in another process may delete files between reading the manifest and mapping them: reread
# and retry this many times before reporting the error.
READ_ATTEMPTS = 20

T = TypeVar("T")


def new(dim: int, num_vectors: int, dtype: str) -> dict[str, Any]:
    """The manifest of an empty index."""
    return {
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


def next_generation(manifest: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``manifest`` with the generation advanced: the draft of the next commit."""
    draft = copy.deepcopy(manifest)
    draft["generation"] += 1
    return draft


def _checksum(body: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def read(root: Path) -> dict[str, Any]:
    """The manifest at ``root``; IndexFormatError if it is not ours, of another version, or fails its checksum."""
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


def publish(root: Path, manifest: dict[str, Any]) -> bool:
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


def segment_files(manifest: dict[str, Any], seg: dict[str, Any]) -> list[tuple[str, int]]:
    """(file name, expected size) of every file of a segment: its group files, int8 scales, then items.json."""
    bounds, dim, dtype, n = manifest["bounds"], manifest["dim"], manifest["dtype"], seg["count"]
    files = []
    for i in range(len(bounds) - 1):
        width = bounds[i + 1] - bounds[i]
        files.append((f"{seg['name']}.g{i}.bin", n * width * dim * ITEMSIZE[dtype]))
        if dtype == "int8":
            files.append((f"{seg['name']}.s{i}.bin", n * width * 4))
    files.append((f"{seg['name']}.items.json", seg["items_bytes"]))
    return files


def check_files(root: Path, manifest: dict[str, Any]) -> None:
    """IndexFormatError if a file the manifest names is shorter than it says (a missing one raises
    FileNotFoundError). Longer is not damage: bytes past the manifest's rows are an in-place merge's appends that
    no manifest has committed yet (see :mod:`metaembed.index.merge`); nothing reads them."""
    for seg in manifest["segments"]:
        for name, size in segment_files(manifest, seg):
            actual = (root / name).stat().st_size
            if actual < size or (actual != size and name.endswith(".items.json")):  # items files never grow
                raise IndexFormatError(
                    f"{root / name} is {actual} bytes, the manifest says {size}: the file is truncated or foreign"
                )


def read_checked(root: Path) -> dict[str, Any]:
    """The manifest, after checking that every file it names exists with its size."""
    manifest = read(root)
    check_files(root, manifest)
    return manifest


def retry_when_gone(attempt: Callable[[], T]) -> T:
    """Run ``attempt`` (which reads the manifest and maps what it names) until no file vanishes under it.

    A file removed meanwhile (a compaction committed and cleaned up) means the manifest read is stale: read it
    again. Any other error, or the last attempt's, is raised.
    """
    for tries_left in range(READ_ATTEMPTS - 1, -1, -1):
        try:
            return attempt()
        except OSError as error:
            if not is_gone(error) or tries_left == 0:
                raise
    raise AssertionError("unreachable")
