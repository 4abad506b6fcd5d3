"""OpenClipArt from the Debian packages ``openclipart-png`` + ``openclipart-svg`` (public domain).

Raw layout (``dpkg-deb -x`` of both packages into ``<raw>/openclipart``)::

    usr/share/openclipart/png/<category>/.../<name>.png   the images
    usr/share/openclipart/svg/<category>/.../<name>.svg   the same art; its RDF <cc:Work> holds the texts
    usr/share/doc/openclipart-png/changelog.Debian.gz     the package version (first line)

Cleaning (the reference's rules, made exact):

1. an item is a regular PNG file with an SVG at the same relative path; symlinked PNGs are the same art filed
   under a second category and are skipped;
2. the theme / generated folders ``computer/icons`` and ``shapes/stars`` are left out (collection titles such
   as "gramastar" and "Lemon SVG theme" instead of real ones);
3. titles: entities unescaped, whitespace collapsed, underscores to spaces, a "Clipart by <author> - " prefix
   removed; empty titles, titles without a 3-letter word, file names and placeholders ("untitled") dropped;
4. titles used more than 3 times (case-insensitive, over the whole package) are collection names, dropped;
5. one item per title: the first by path keeps it (so no two items share a caption);
6. keywords: lower case, de-duplicated, generic ones ("hash", "magick", "clip art", "unsorted")
   ids, e-mail addresses, the creator's name and long phrases dropped, at most 6; description: URLs and
   e-mail addresses removed, first sentence, ≤ 160 characters, dropped when it only repeats the title or is
   boilerplate shared by more than 3 files.
"""

from __future__ import annotations

import gzip
import re
from collections import Counter
from pathlib import Path

from metaembed.data.common import (
    MAX_DESCRIPTION_CHARS,
    SourceItem,
    clean_keywords,
    has_word,
    normalise_space,
    safe_id,
    shorten,
)
from metaembed.data.errors import FETCH_HINT, MissingRawDataError

NAME = "openclipart"
ROOT = Path("openclipart/usr/share/openclipart")
CHANGELOG = Path("openclipart/usr/share/doc/openclipart-png/changelog.Debian.gz")
# Hard negatives: does "Biohazard symbol" containing "biohazard" mean the same thing twice?
CONTAINED_TITLES_ARE_DUPLICATES = True
LICENSES = {
    "openclipart-png": "public domain (Creative Commons Public Domain Dedication; Debian copyright file)",
    "openclipart-svg": "public domain (Creative Commons Public Domain Dedication; Debian copyright file)",
}
EXCLUDED_FOLDERS = ("computer/icons/", "shapes/stars/")
MAX_TITLE_USES = 3
PLACEHOLDER_TITLES = frozenset(
    {"untitled", "unnamed", "drawing", "image", "svg", "new document", "layer 1", "clipart", "clip art", "title"}
)
GENERIC_KEYWORDS = frozenset(
    {
        "hash",
        "magick",
        "clip art",
        "clipart",
        "image",
        "images",
        "svg",
        "png",
        "media",
        "icon theme",
        "theme",
        "unsorted",
        "signs and symbols",
        "public domain",
        "remix",
        "openclipart",
        "inkscape",
        "drawing",
    }
)

_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_TITLE = re.compile(r"<dc:title>([^<]*)</dc:title>")
_DESCRIPTION = re.compile(r"<dc:description>([^<]*)</dc:description>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>([^<]*)</rdf:li>")
_AUTHOR_PREFIX = re.compile(r"^clip ?art by [^-]{1,60}-\s*", re.I)
_CREATOR = re.compile(r"<dc:creator>.*?<dc:title>([^<]*)</dc:title>.*?</dc:creator>", re.S)
_URL = re.compile(r"https?://\S+|www\.\S+|\S+@\S+\.\w+")


def read_metadata(svg_text: str) -> tuple[str, str, list[str], str]:
    """(title, description, keywords, creator) from an SVG's RDF ``<cc:Work>``; empty values where absent."""
    match = _WORK.search(svg_text)
    if not match:
        return "", "", [], ""
    work = match.group(0)
    title = _TITLE.search(work)
    description = _DESCRIPTION.search(work)
    subject = _SUBJECT.search(work)
    keywords = _LI.findall(subject.group(1)) if subject else []
    creator = _CREATOR.search(work)
    return (
        title.group(1) if title else "",
        description.group(1) if description else "",
        keywords,
        normalise_space(creator.group(1)) if creator else "",
    )


def clean_title(raw: str) -> str:
    title = normalise_space(raw.replace("_", " "))
    return _AUTHOR_PREFIX.sub("", title).strip(" -")


def title_problem(title: str) -> str | None:
    """Why a cleaned title is unusable, or None."""
    if not title:
        return "empty_title"
    lowered = title.lower()
    if (
        not has_word(title)
        or lowered in PLACEHOLDER_TITLES
        or re.fullmatch(r"(untitled|drawing|image|layer)[\s\d-]*", lowered)
        or re.search(r"\.(svg|png|jpe?g)$", lowered)
    ):
        return "garbage_title"
    return None


def clean_description(raw: str, title: str) -> str:
    text = normalise_space(_URL.sub(" ", raw))
    if not has_word(text) or text.lower().strip(" .") == title.lower().strip(" ."):
        return ""
    return shorten(text, MAX_DESCRIPTION_CHARS)


def source_versions(raw: Path) -> dict[str, str]:
    """The Debian version of the unpacked packages, from the png package's changelog (first line)."""
    path = raw / CHANGELOG
    version = "unknown"
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
            match = re.match(r"\S+ \(([^)]+)\)", handle.readline())
        version = match.group(1) if match else version
    return {"openclipart-png": version, "openclipart-svg": version}


def read_items(raw: Path) -> tuple[list[SourceItem], int, Counter]:
    """Cleaned items sorted by key, the number of raw entries, and how many each rule dropped."""
    png_root, svg_root = raw / ROOT / "png", raw / ROOT / "svg"
    for folder in (png_root, svg_root):
        if not folder.is_dir():
            raise MissingRawDataError(f"OpenClipArt raw folder {folder} is missing; {FETCH_HINT}")
    dropped: Counter = Counter()
    entries = []
    for png in sorted(png_root.rglob("*.png")):
        relative = png.relative_to(png_root).with_suffix("").as_posix()
        if png.is_symlink():
            dropped["symlinked_duplicate"] += 1
            continue
        if not png.is_file():
            continue
        svg = svg_root / (relative + ".svg")
        if not svg.is_file():
            dropped["no_svg"] += 1
            continue
        title, description, keywords, creator = read_metadata(svg.read_text(encoding="utf-8", errors="replace"))
        title = clean_title(title)
        entries.append((relative, png, title, clean_description(description, title), keywords, creator))
    if not entries:
        raise MissingRawDataError(f"no OpenClipArt PNG/SVG pairs under {raw / ROOT}; {FETCH_HINT}")
    uses = Counter(entry[2].lower() for entry in entries if entry[2])
    description_uses = Counter(entry[3] for entry in entries if entry[3])
    items: list[SourceItem] = []
    taken: set[str] = set()
    for relative, png, title, description, keywords, creator in entries:
        category = relative.rsplit("/", 1)[0] if "/" in relative else ""
        problem = title_problem(title)
        if problem is None and (relative + "/").startswith(EXCLUDED_FOLDERS):
            problem = "excluded_folder"
        if problem is None and uses[title.lower()] > MAX_TITLE_USES:
            problem = "frequent_title"
        if problem is None and title.lower() in taken:
            problem = "duplicate_title"
        if problem:
            dropped[problem] += 1
            continue
        taken.add(title.lower())
        items.append(
            SourceItem(
                key=relative,
                id=safe_id(relative),
                title=title,
                image=png,
                keywords=clean_keywords(keywords, GENERIC_KEYWORDS, exclude=(title, creator)),
                description=description if description_uses[description] <= MAX_TITLE_USES else "",
                category=category,
            )
        )
    return items, len(entries) + dropped["symlinked_duplicate"] + dropped["no_svg"], dropped
