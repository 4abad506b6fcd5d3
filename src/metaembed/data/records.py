"""Reading records and their images: the one reader behind training, evaluation and the dataset builders.

Records are JSON objects, one a line in ``.jsonl`` files, or rows of ``.parquet`` files. One policy for a
record that cannot be read (invalid JSON, not an object) wherever it is read: a :class:`RecordError` whose
message starts with ``file:line``, or — when the caller passes ``on_bad_record="skip"`` — the record is left
out and a warning names it. Training passes its own ``on_bad_record``; evaluation and the builders fail.

Images in records are paths relative to an image root: a folder, or a ``.zip`` archive extracted once into
the cache (keyed by the archive's path, size and mtime; an interrupted extraction leaves nothing behind).
A path is looked up as written, else inside one top-level folder of the root (archives often wrap their
images in one, e.g. ``eval_images/``).
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from metaembed.cache import cache_dir
from metaembed.errors import DataError, RecordError

log = logging.getLogger("metaembed.data")

ON_BAD_RECORD = ("fail", "skip")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_on_bad_record(value: str) -> str:
    if value not in ON_BAD_RECORD:
        raise DataError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {value!r}")
    return value


def is_hub_id(source: str | os.PathLike) -> bool:
    """True for ``owner/name`` that is not an existing local path."""
    text = str(source)
    return not Path(text).exists() and bool(HUB_ID_PATTERN.match(text)) and not text.startswith((".", "/", "~"))


# ------------------------------------------------------------------------------------------------ JSONL
def parse_line(line: str | bytes, where: str) -> dict:
    """One JSONL line as a dict; :class:`RecordError` starting with ``where`` (``file:line``) if it is not one."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise RecordError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
    except UnicodeDecodeError as error:  # bytes that are not UTF-8 (json.loads decodes them first)
        raise RecordError(f"{where}: not UTF-8 (byte {error.start} of the line: {error.reason})") from None
    if not isinstance(row, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    return row


class JsonlRows(Sequence[dict]):
    """Random access to the records of JSONL files by remembered byte offsets (nothing else held in memory).

    Blank lines are not records. ``rows[i]`` parses record ``i`` (a :class:`RecordError` if it is bad);
    ``rows.where(i)`` is its ``file:line``. File handles are reopened after a fork (data-loader workers).
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = [Path(f) for f in files]
        self.index: list[tuple[int, int, int]] = []  # (file, byte offset, line number)
        for f, path in enumerate(self.files):
            with open(path, "rb") as handle:
                offset = 0
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        self.index.append((f, offset, number))
                    offset += len(line)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def where(self, i: int) -> str:
        f, _, number = self.index[i]
        return f"{self.files[f]}:{number}"

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._pid != os.getpid():  # file handles do not survive a fork
            self._handles, self._pid = {}, os.getpid()
        f, offset, _ = self.index[i]
        handle = self._handles.get(f)
        if handle is None:
            handle = self._handles[f] = open(self.files[f], "rb")  # noqa: SIM115 - kept open for random access
        handle.seek(offset)
        return parse_line(handle.readline(), self.where(i))


# ---------------------------------------------------------------------------------------------- parquet
class ParquetRows(Sequence[dict]):
    """Random access to the rows of parquet files, decoded one row group at a time (the last one kept).

    The one parquet reader: evaluation and the builders iterate it, training indexes it. Only the files'
    footers are read up front; a row is a plain dict (a hub image stays its ``{bytes, path}`` struct, decoded
    when it is used). ``rows.where(i)`` is ``file row N`` (N from 0 within that file). A file or row group
    pyarrow cannot read is a :class:`DataError` naming the file (and the rows of the group).
    """

    def __init__(self, files: Sequence[str | Path]) -> None:
        self.files = [Path(f) for f in files]
        self.groups: list[tuple[int, int, int, int]] = []  # (file, row group, first row in the file, rows)
        self.starts: list[int] = []  # the index of each group's first row among all rows
        total = 0
        for f, path in enumerate(self.files):
            meta = self._open(path).metadata
            first = 0
            for group in range(meta.num_row_groups):
                count = meta.row_group(group).num_rows
                if count:
                    self.groups.append((f, group, first, count))
                    self.starts.append(total)
                first += count
                total += count
        self.total = total
        self._cached: tuple[int, list[dict]] = (-1, [])

    @staticmethod
    def _open(path: Path) -> Any:
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises several types for missing, truncated or foreign files
            raise DataError(f"cannot read parquet file {path}: {error}") from error

    def __len__(self) -> int:
        return self.total

    def _locate(self, i: int) -> tuple[int, int]:
        """(row group, row within it) of row ``i``."""
        if not -self.total <= i < self.total:
            raise IndexError(f"row {i} of {self.total}")
        i %= self.total
        group = bisect.bisect_right(self.starts, i) - 1
        return group, i - self.starts[group]

    def where(self, i: int) -> str:
        group, offset = self._locate(i)
        f, _, first, _ = self.groups[group]
        return f"{self.files[f]} row {first + offset}"

    def _rows(self, group: int) -> list[dict]:
        if self._cached[0] != group:
            f, number, first, count = self.groups[group]
            try:
                rows = self._open(self.files[f]).read_row_group(number).to_pylist()
            except DataError:
                raise
            except Exception as error:  # a corrupt page: pyarrow's types vary
                span = f"rows {first}–{first + count - 1}"
                raise DataError(f"cannot read parquet file {self.files[f]} {span}: {error}") from error
            self._cached = (group, rows)
        return self._cached[1]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        group, offset = self._locate(i)
        return self._rows(group)[offset]

    def __iter__(self) -> Iterator[dict]:
        for group in range(len(self.groups)):
            yield from self._rows(group)


def parquet_files(folder: Path) -> list[Path]:
    """A folder's parquet files, sorted (searched recursively): its ``test*`` ones when it has any (the hub's
    split files), else all of them."""
    files = sorted(folder.rglob("*.parquet"))
    return [f for f in files if f.name.startswith("test")] or files


def iter_records(path: str | Path, on_bad_record: str = "fail") -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of a ``.jsonl`` file, a ``.parquet`` file, or a folder's parquet files (sorted).

    A folder's ``test*`` parquet files are read when it has any (the hub's split files), else all of them.
    ``where`` is ``file:line`` for JSONL and ``file row N`` (from 0) for parquet.
    """
    path = Path(path)
    check_on_bad_record(on_bad_record)
    if path.is_dir() or path.suffix == ".parquet":
        files = parquet_files(path) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{path} holds no .parquet files")
        rows = ParquetRows(files)
        for i, row in enumerate(rows):
            yield rows.where(i), row
    elif path.suffix == ".jsonl":
        rows = JsonlRows([path])
        skipped = 0
        for i in range(len(rows)):
            try:
                row = rows[i]
            except RecordError as error:
                if on_bad_record == "fail":
                    raise
                skipped += 1
                log.warning("skipping %s [%d bad so far]", error, skipped)
                continue
            yield rows.where(i), row
    else:
        raise DataError(f"cannot read {path}: expected a .jsonl or .parquet file or a folder of parquet files")


# ----------------------------------------------------------------------------------------------- images
def extract_zip(archive: Path) -> Path:
    """Extract an image archive once into the cache (keyed by path, size and mtime) and return the folder.

    Extraction goes to a temporary folder that is renamed into place, so an interrupted run leaves no
    half-extracted cache behind.
    """
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "images" / f"{archive.stem}-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(staging)
        staging.rename(target)
    except zipfile.BadZipFile as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{archive} is not a readable zip archive: {error}") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


class ImageRoot:
    """Where the relative image paths of records point: a folder, a ``.zip`` archive, or nothing (as written)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = None if root is None else Path(root).expanduser()
        if self.root is None:
            self.folder = None
        elif self.root.is_file() and self.root.suffix.lower() == ".zip":
            self.folder = extract_zip(self.root)
        elif self.root.is_dir():
            self.folder = self.root
        else:
            raise DataError(f"image root {str(self.root)!r} is not a folder or a .zip archive")
        self._bases: list[Path] | None = None

    def _candidates(self) -> list[Path]:
        """The root folder, then its top-level folders (sorted): where a relative path may live."""
        if self._bases is None:
            assert self.folder is not None
            self._bases = [self.folder, *sorted(p for p in self.folder.iterdir() if p.is_dir())]
        return self._bases

    def find(self, name: str | os.PathLike) -> Path | None:
        """The file a record's image path names, or None when it is nowhere under the root."""
        path = Path(name)
        if path.is_absolute() or self.folder is None:
            return path if path.is_file() else None
        bases = self._candidates()
        for n, base in enumerate(bases):
            if (base / path).is_file():
                if n:  # most paths of one root share their wrapping folder: try it first next time
                    bases.insert(0, bases.pop(n))
                return base / path
        return None

    def folder_for(self, names: Sequence[str]) -> Path:
        """The folder (the root or one of its top-level folders) the first findable of ``names`` lies in:
        where a dataset's images are, when they all share it (the caller checks that they do)."""
        for name in names[:20]:
            found = self.find(name)
            if found is not None and not Path(name).is_absolute():
                return found.parents[len(Path(name).parts) - 1]
        return self.folder if self.folder is not None else Path(".")

    def locate(self, name: str | os.PathLike, where: str) -> Path:
        """:meth:`find`, or a :class:`RecordError` naming ``where`` and the root."""
        found = self.find(name)
        if found is None:
            under = f" under {self.root}" if self.root is not None else ""
            raise RecordError(f"{where}: image {str(name)!r} does not exist{under}")
        return found

    def open(self, reference: Any, where: str) -> Any:
        """A decoded PIL image from a record's image: a PIL image, ``{"bytes", "path"}`` (datasets' Image
        feature without decoding) or a path under the root. :class:`RecordError` naming ``where`` if unreadable."""
        from PIL import Image

        if isinstance(reference, Image.Image):
            return reference
        if isinstance(reference, Mapping):
            if reference.get("bytes"):
                return decode_image(reference["bytes"], where)
            reference = reference.get("path")
        if not isinstance(reference, str | os.PathLike) or not str(reference):
            raise RecordError(f"{where}: cannot read an image from {type(reference).__name__} {reference!r}")
        path = self.locate(reference, where)
        return decode_image(path.read_bytes(), f"{where}: {path}")


def decode_image(data: bytes, where: str) -> Any:
    """A loaded PIL image from encoded bytes; :class:`RecordError` naming ``where`` if they are not one."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return opened.copy()
    except (OSError, Image.DecompressionBombError) as error:
        raise RecordError(f"{where}: cannot read image: {error}") from error
