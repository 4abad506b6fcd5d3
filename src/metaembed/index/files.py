"""A user's files → items to index: discovery (folders, JSONL, CSV) and loading with per-item checks.

``discover(paths)`` lists items without reading them, so it is cheap and deterministic (sorted walk):

* a **folder** is walked recursively (hidden entries skipped, directory symlinks not followed). An image
  (``.png .jpg .jpeg .webp .gif .bmp .tif .tiff``) is an item; a ``.txt`` with the same stem next to it is its
  text (a sidecar caption). Any other ``.txt`` / ``.md`` file is a text item. Other files are counted as ignored.
  The id is the path relative to the folder (``animals/owl.png``).
* a **JSONL** file holds one object per line, a **CSV** file one row per line under a header; the fields
  ``id``, ``text`` and ``image`` (a path relative to the manifest's folder, or absolute) are the item, every
  other field is kept as metadata. Without ``id`` the id is the image path as written, else ``NAME:LINE``.

``load(item)`` reads one item for the encoder and returns its metadata (``path``, ``size``, ``caption``,
``width``/``height`` and the manifest's own fields). Everything a file can get wrong — unreadable or truncated
image, too many pixels, empty or non-UTF-8 text, a file over the size limit — raises :class:`BadItemError`
with the reason, so ingest can count it, list it and go on.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaembed.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
TEXT_SUFFIXES = (".txt", ".md")
MANIFEST_SUFFIXES = (".jsonl", ".csv")
CAPTION_CHARS = 500  # the caption kept in metadata for display; the encoder gets the whole text


class BadItemError(InputError):
    """One item that cannot be indexed (the message says why); ingest lists it and goes on unless strict."""


@dataclass(frozen=True)
class Limits:
    """What one item may be: larger files are refused before they are read (a bad item, not a crash)."""

    max_image_bytes: int = 64 * 2**20
    max_image_pixels: int = 64_000_000
    max_text_bytes: int = 2**20


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class FileItem:
    """One item found on disk or in a manifest, not read yet."""

    id: str
    origin: str  # where it was found, for messages: a path, or "items.jsonl line 7"
    image: Path | None = None
    text: str | None = None  # inline text from a manifest
    text_path: Path | None = None  # a text file (a .txt/.md item, or an image's sidecar), read by load()
    fields: dict[str, Any] = field(default_factory=dict)  # a manifest row's other fields


@dataclass(frozen=True)
class BadItem:
    """An item that was not indexed, and why."""

    id: str
    origin: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "origin": self.origin, "reason": self.reason}


@dataclass
class Discovery:
    items: list[FileItem]
    bad: list[BadItem]
    ignored: dict[str, int]  # suffix → files of other types in the folders (not items, not errors)


def discover(
    paths: Sequence[str | os.PathLike[str]], *, where: Mapping[str, str] | None = None, limit: int | None = None
) -> Discovery:
    """The items under ``paths`` (folders, .jsonl and .csv files), in a deterministic order.

    ``where`` keeps only items whose metadata field equals the given string (``{"split": "test"}``);
    ``limit`` keeps the first N. Ids repeated across paths are bad items (the first one wins).
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not paths:
        raise InputError("no items given: pass a folder, a .jsonl or a .csv file (or several)")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive int, got {limit!r}")
    found = Discovery([], [], {})
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            _walk(path, found)
        elif path.is_file() and path.suffix.lower() == ".jsonl":
            _read_jsonl(path, found)
        elif path.is_file() and path.suffix.lower() == ".csv":
            _read_csv(path, found)
        elif path.exists():
            raise InputError(f"{path}: items come from a folder, a .jsonl or a .csv file, not a {path.suffix} file")
        else:
            raise InputError(f"{path} does not exist; pass a folder, a .jsonl or a .csv file")
    seen: dict[str, str] = {}
    unique = []
    for item in found.items:
        if item.id in seen:
            found.bad.append(BadItem(item.id, item.origin, f"duplicate id (first from {seen[item.id]})"))
            continue
        seen[item.id] = item.origin
        if where and any(str(item.fields.get(key)) != value for key, value in where.items()):
            continue
        unique.append(item)
    found.items = unique[:limit] if limit is not None else unique
    return found


def _walk(root: Path, found: Discovery) -> None:
    items: list[FileItem] = []
    for folder, dirs, files in os.walk(root):  # os.walk does not follow directory symlinks
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = sorted(f for f in files if not f.startswith("."))
        here = Path(folder)
        image_stems = {Path(name).stem for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES}
        for name in names:
            path = here / name
            suffix = path.suffix.lower()
            item_id = path.relative_to(root).as_posix()
            if suffix in IMAGE_SUFFIXES:
                sidecar = path.with_suffix(".txt")
                items.append(
                    FileItem(item_id, str(path), image=path, text_path=sidecar if sidecar.name in names else None)
                )
            elif suffix in TEXT_SUFFIXES:
                if suffix == ".txt" and path.stem in image_stems:
                    continue  # a sidecar: read with its image
                items.append(FileItem(item_id, str(path), text_path=path))
            else:
                found.ignored[suffix or "(no suffix)"] = found.ignored.get(suffix or "(no suffix)", 0) + 1
    found.items += sorted(items, key=lambda item: item.id)  # ids in order, wherever the walk met them


def _manifest_item(manifest: Path, line: int, row: Mapping[str, Any], found: Discovery) -> None:
    origin = f"{manifest} line {line}"
    fields = {k: v for k, v in row.items() if k not in ("id", "text", "image") and v not in (None, "")}
    item_id, text, image = row.get("id"), row.get("text"), row.get("image")
    text = None if text == "" else text
    image = None if image == "" else image
    label = item_id if isinstance(item_id, str) and item_id else f"{manifest.name}:{line}"
    problem = None
    if item_id is not None and (not isinstance(item_id, str) or not item_id):
        problem = f"'id' must be a non-empty string, got {item_id!r}"
    elif text is not None and not isinstance(text, str):
        problem = f"'text' must be a string, got {type(text).__name__}"
    elif image is not None and not isinstance(image, str):
        problem = f"'image' must be a path string, got {type(image).__name__}"
    elif text is None and image is None:
        problem = "has neither 'text' nor 'image'"
    if problem:
        found.bad.append(BadItem(label, origin, problem))
        return
    if item_id is None:
        item_id = image if image is not None else label
    image_path = None if image is None else (Path(image) if Path(image).is_absolute() else manifest.parent / image)
    found.items.append(FileItem(item_id, origin, image=image_path, text=text, fields=fields))


def _read_jsonl(path: Path, found: Discovery) -> None:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            found.bad.append(BadItem(f"{path.name}:{number}", f"{path} line {number}", f"not JSON: {error}"))
            continue
        if not isinstance(row, dict):
            reason = f"a line must be a JSON object, got {type(row).__name__}"
            found.bad.append(BadItem(f"{path.name}:{number}", f"{path} line {number}", reason))
            continue
        _manifest_item(path, number, row, found)


def _read_csv(path: Path, found: Discovery) -> None:
    lines = [line for _, line in _lines(path)]
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or not {"text", "image"} & set(reader.fieldnames):
        raise InputError(f"{path}: the first row must be a header naming 'text' and/or 'image' (and 'id')")
    for row in reader:
        number = reader.line_num
        if None in row:  # more cells than header names
            found.bad.append(BadItem(f"{path.name}:{number}", f"{path} line {number}", "more cells than the header"))
            continue
        _manifest_item(path, number, row, found)


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text: {error}") from None
    return enumerate(text.splitlines(), 1)


# ------------------------------------------------------------------------------------------------ loading


def load(item: FileItem, limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(encoder input {"text", "image"}, metadata)`` for one item; BadItemError says what is wrong with it."""
    metadata: dict[str, Any] = {}
    text = item.text
    if item.text_path is not None:
        text = _read_text(item.text_path, limits)
        if item.image is None:
            metadata.update(path=str(item.text_path.resolve()), size=item.text_path.stat().st_size)
        elif not text.strip():
            text = None  # an empty sidecar caption: the image alone
    image = None
    if item.image is not None:
        image = _read_image(item.image, limits)
        metadata.update(
            path=str(item.image.resolve()), size=item.image.stat().st_size, width=image.width, height=image.height
        )
    if text is not None:
        if not text.strip():
            raise BadItemError("empty text")
        if len(text.encode("utf-8", "surrogatepass")) > limits.max_text_bytes:
            raise BadItemError(f"text is over {limits.max_text_bytes:,} bytes")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadItemError("text is not valid Unicode (lone surrogates)") from None
        metadata["caption"] = text.strip()[:CAPTION_CHARS]
    metadata["kind"] = "image+text" if image is not None and text is not None else "image" if image else "text"
    metadata.update(item.fields)  # a manifest's own fields (e.g. its caption) win over the derived ones
    return {"text": text, "image": image}, metadata


def _read_text(path: Path, limits: Limits) -> str:
    try:
        size = path.stat().st_size
        if size > limits.max_text_bytes:
            raise BadItemError(f"text file is {size:,} bytes; at most {limits.max_text_bytes:,}")
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise BadItemError(f"text file is not UTF-8: {error.reason} at byte {error.start}") from None
    except OSError as error:
        raise BadItemError(f"cannot read text file: {error.strerror or error}") from None


def _read_image(path: Path, limits: Limits):
    from PIL import Image, UnidentifiedImageError

    from metaembed.model.items import load_image

    try:
        size = path.stat().st_size
    except OSError as error:
        raise BadItemError(f"cannot read image: {error.strerror or error}") from None
    if size > limits.max_image_bytes:
        raise BadItemError(f"image file is {size:,} bytes; at most {limits.max_image_bytes:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > limits.max_image_pixels:
                    raise BadItemError(
                        f"image is {width}×{height} = {width * height:,} pixels; at most {limits.max_image_pixels:,}"
                    )
                opened.load()
                image = opened.copy()
    except BadItemError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadItemError("not a readable image (unknown format or corrupt header)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise BadItemError(f"image data is truncated or corrupt: {error}") from None
    try:
        return load_image(image, str(path))
    except InputError as error:
        raise BadItemError(str(error).removeprefix(f"{path}: ")) from None
