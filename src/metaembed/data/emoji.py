"""Emoji: Noto images from npm ``emoji-datasource-google`` with CLDR labels and tags from ``emojibase-data``.

Raw layout (each npm tarball unpacked into its own folder)::

    emoji-datasource-google/package/emoji.json            one entry per emoji (unified, non_qualified, image, ...)
    emoji-datasource-google/package/img/google/64/<image> the 64 px Noto PNGs
    emoji-datasource-google/package/package.json          the version
    emojibase-data/package/en/data.json                   label and tags per hexcode
    emojibase-data/package/package.json                   the version

Cleaning: the base emoji of ``emoji.json`` (skin-tone variants are not separate items); the join is
``unified`` → emojibase ``hexcode``, falling back to ``non_qualified``; entries without a Google image, without
a label, or in the "Component" category (skin-tone swatches, hair parts) are dropped; one item per label;
tags are cleaned like keywords (lower case, de-duplicated, the label itself removed, at most 6).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from metaembed.data.common import SourceItem, clean_keywords, normalise_space
from metaembed.data.errors import FETCH_HINT, MissingRawDataError
from metaembed.errors import DataError

NAME = "emoji"
DATASOURCE = Path("emoji-datasource-google/package")
EMOJIBASE = Path("emojibase-data/package")
IMAGES = DATASOURCE / "img/google/64"
# Hard negatives: does "Biohazard symbol" containing "biohazard" mean the same thing twice?
CONTAINED_TITLES_ARE_DUPLICATES = False
LICENSES = {
    "emoji-datasource-google": "MIT (package); the Google / Noto emoji images are Apache-2.0 (package README)",
    "emojibase-data": "MIT (package; labels and tags derived from Unicode CLDR, Unicode licence)",
}
DROPPED_CATEGORIES = frozenset({"Component"})


def _load_json(path: Path) -> object:
    if not path.is_file():
        raise MissingRawDataError(f"emoji raw file {path} is missing; {FETCH_HINT}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error}); delete data/raw and {FETCH_HINT}") from None


def source_versions(raw: Path) -> dict[str, str]:
    versions = {}
    for name, folder in (("emoji-datasource-google", DATASOURCE), ("emojibase-data", EMOJIBASE)):
        path = raw / folder / "package.json"
        versions[name] = str(_load_json(path).get("version", "unknown")) if path.is_file() else "unknown"
    return versions


def read_items(raw: Path) -> tuple[list[SourceItem], int, Counter]:
    """Cleaned items sorted by key, the number of raw entries, and how many each rule dropped."""
    entries = _load_json(raw / DATASOURCE / "emoji.json")
    labels = _load_json(raw / EMOJIBASE / "en" / "data.json")
    if not isinstance(entries, list) or not isinstance(labels, list):
        raise DataError("emoji.json and en/data.json must each hold a JSON list; delete data/raw and " + FETCH_HINT)
    if not (raw / IMAGES).is_dir():
        raise MissingRawDataError(f"emoji image folder {raw / IMAGES} is missing; {FETCH_HINT}")
    by_hex = {str(e.get("hexcode", "")).upper(): e for e in labels if isinstance(e, dict)}
    dropped: Counter = Counter()
    candidates = []
    for entry in entries:
        unified = str(entry.get("unified") or "").upper()
        if not unified:
            dropped["no_code"] += 1
            continue
        if entry.get("category") in DROPPED_CATEGORIES:
            dropped["component"] += 1
            continue
        image = raw / IMAGES / str(entry.get("image") or "")
        if not entry.get("has_img_google", True) or not entry.get("image") or not image.is_file():
            dropped["no_image"] += 1
            continue
        base = by_hex.get(unified) or by_hex.get(str(entry.get("non_qualified") or "").upper())
        label = normalise_space(str(base.get("label") or "")) if base else ""
        if not label:
            dropped["no_label"] += 1
            continue
        category = "/".join(str(entry.get(k) or "") for k in ("category", "subcategory")).strip("/")
        candidates.append((unified.lower(), label, base.get("tags") or [], image, category))
    taken: set[str] = set()
    items = []
    for key, label, tags, image, category in sorted(candidates, key=lambda c: c[0]):
        if label.lower() in taken:
            dropped["duplicate_label"] += 1
            continue
        taken.add(label.lower())
        keywords = clean_keywords([str(t) for t in tags], frozenset(), exclude=(label,))
        items.append(SourceItem(key=key, id=key, title=label, image=image, keywords=keywords, category=category))
    return items, len(entries), dropped
