"""Pieces every source shares: the source item, text cleaning, image rendering, split, negatives, distractors."""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import random
import re
import shutil
import unicodedata
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Instruction-style texts in the MMEB manner; ``<|image_1|>\n`` marks where the image goes (the model's processor
# strips it: the image enters through its template).
IMAGE_PLACEHOLDER = "<|image_1|>\n"
T2I_QUERY = "Find an image that matches the given text: {caption}"
IMAGE_CANDIDATE = IMAGE_PLACEHOLDER + "Represent the given image."
I2T_QUERY = IMAGE_PLACEHOLDER + "Find a caption that describes the given image."

MAX_KEYWORDS = 6
MAX_DESCRIPTION_CHARS = 160
# Source images above this many pixels are skipped rather than decoded (a 21k x 30k poster needs GBs).
MAX_SOURCE_PIXELS = 25_000_000
MARGIN = 0.04  # white border kept around the trimmed drawing, as a share of the side

_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "for",
        "from",
        "in",
        "into",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "the",
        "to",
        "with",
        "without",
    ]
)


@dataclass(frozen=True)
class SourceItem:
    """One image of a raw source with its cleaned texts (not a model input: that is
    :class:`metaembed.model.items.Item`). ``key`` is the stable identity the split hashes."""

    key: str
    id: str
    title: str
    image: Path
    keywords: tuple[str, ...] = ()
    description: str = ""
    category: str = ""
    caption: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "caption", make_caption(self.title, self.description, self.keywords))

    def tokens(self) -> frozenset[str]:
        """Lower-case words of the title and keywords (the hard-negative similarity)."""
        return _words(" ".join((self.title, *self.keywords)))

    def title_tokens(self) -> frozenset[str]:
        return _words(self.title)


def _words(text: str) -> frozenset[str]:
    words = re.findall(r"[^\W_]+", text.lower())
    return frozenset(w for w in words if len(w) > 1 and w not in _STOPWORDS)


def normalise_space(text: str) -> str:
    """Unescape XML/HTML entities, NFC-normalise, drop control characters and collapse whitespace."""
    text = unicodedata.normalize("NFC", html.unescape(text))
    text = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text)
    return " ".join(text.split())


def letters(text: str) -> int:
    return sum(ch.isalpha() for ch in text)


def has_word(text: str, min_letters: int = 3) -> bool:
    """True when the text holds a run of at least ``min_letters`` letters (so not just codes or digits)."""
    return re.search(rf"[^\W\d_]{{{min_letters},}}", text) is not None


def make_caption(title: str, description: str, keywords: Sequence[str]) -> str:
    """``Title. Description. Keywords: a, b, c.`` — the text side of a pair."""
    parts = [_sentence(title)]
    if description:
        parts.append(_sentence(description))
    if keywords:
        parts.append(f"Keywords: {', '.join(keywords)}.")
    return " ".join(parts)


def _sentence(text: str) -> str:
    return text if text[-1:] in ".!?" else text + "."


def shorten(text: str, limit: int) -> str:
    """The first sentence of ``text``, cut at a word boundary to at most ``limit`` characters."""
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    text = match.group(1) if match else text
    if len(text) <= limit:
        return text
    cut = text[: limit + 1].rsplit(" ", 1)[0].rstrip(",;:-")
    return cut + "…"


def clean_keywords(raw: Iterable[str], drop: frozenset[str], exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """Lower-case, de-underscored, de-duplicated keywords in their original order (at most MAX_KEYWORDS).

    Drops empty ones, ones without a real word, hex ids, ones in ``drop``, long phrases (author names and
    sentences end up here) and ones equal to a text in ``exclude`` (the title).
    """
    seen = {normalise_space(e).lower() for e in exclude}
    out: list[str] = []
    for word in raw:
        word = normalise_space(word.replace("_", " ")).lower().strip(" ,;.")
        if not word or word in seen or word in drop or not has_word(word, 2) or re.fullmatch(r"0x[0-9a-f]+", word):
            continue
        if len(word) > 30 or len(word.split()) > 3 or "@" in word or "://" in word:
            continue
        seen.add(word)
        out.append(word)
        if len(out) == MAX_KEYWORDS:
            break
    return tuple(out)


def safe_id(key: str) -> str:
    """A file-name-safe id from an item key (``animals/birds/owl`` → ``animals__birds__owl``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key.replace("/", "__")).strip("._") or "item"


# ----------------------------------------------------------------------------------------------- images
class ImageProblem(Exception):
    """Internal: a source image that cannot be used (the reason goes into the manifest)."""


def render_image(path: Path, size: int) -> bytes:
    """Decode ``path``, composite on white, trim the white margin, fit it centred in ``size``×``size`` → PNG.

    Raises :class:`ImageProblem` for unreadable, truncated or oversized files.
    """
    from PIL import Image, ImageChops

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # size is checked just below
            opened = Image.open(path)
        with opened:
            width, height = opened.size
            if width * height > MAX_SOURCE_PIXELS:
                raise ImageProblem(f"too large ({width}x{height} px > {MAX_SOURCE_PIXELS} px)")
            if width < 1 or height < 1:
                raise ImageProblem("empty image")
            opened.load()
            image = opened.convert("RGBA")
    except ImageProblem:
        raise
    except Image.DecompressionBombError as error:
        raise ImageProblem(f"too large ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageProblem(f"cannot decode: {type(error).__name__}: {error}") from None
    # Composite on white, then trim the white margin so every drawing fills the frame the same way.
    flat = Image.new("RGBA", image.size, (255, 255, 255, 255))
    flat.alpha_composite(image)
    flat = flat.convert("RGB")
    ink = ImageChops.difference(flat, Image.new("RGB", flat.size, (255, 255, 255))).convert("L")
    box = ink.point(lambda v: 255 if v > 8 else 0).getbbox()
    if box is None:
        raise ImageProblem("blank image (nothing but white or transparency)")
    flat = flat.crop(box)
    width, height = flat.size
    scale = size * (1 - 2 * MARGIN) / max(width, height)
    fitted = (max(1, round(width * scale)), max(1, round(height * scale)))
    flat = flat.resize(fitted, Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(flat, ((size - fitted[0]) // 2, (size - fitted[1]) // 2))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------ split and sampling
def hash_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_test(source: str, key: str, test_percent: int) -> bool:
    """The split rule: an item is in test when sha256("<source>:<key>") mod 100 < test_percent."""
    return hash_int(f"{source}:{key}") % 100 < test_percent


def split_rule(source: str, test_percent: int) -> str:
    return (
        f"test if int.from_bytes(sha256(('{source}:' + key).encode())[:8], 'big') % 100 < {test_percent}, "
        "else train; independent of the other items"
    )


def seeded_rng(*parts: str) -> random.Random:
    return random.Random(hash_int(":".join(parts)))


def hard_negatives(items: Sequence[SourceItem], source: str, skip_contained_titles: bool = False) -> list[int]:
    """For each item, the index of the most similar *other* item by keyword/title-word Jaccard overlap.

    With ``skip_contained_titles``, items whose title words contain the other's ("biohazard" / "Biohazard
    symbol", "muffin" / "muffin (B and W)") are taken for the same thing drawn twice, not a negative, and passed
    over (right for free-form clip-art titles, wrong for emoji, whose labels are distinct by design). Ties go
    to the smaller key; an item with no candidate left gets a seeded random one.
    """
    tokens = [item.tokens() for item in items]
    titles = [item.title_tokens() for item in items]
    postings: dict[str, list[int]] = defaultdict(list)
    for index, words in enumerate(tokens):
        for word in words:
            postings[word].append(index)
    chosen = []
    for index, words in enumerate(tokens):
        shared: dict[int, int] = defaultdict(int)
        for word in words:
            for other in postings[word]:
                if other != index:
                    shared[other] += 1
        best, best_score = -1, 0.0
        for other, count in shared.items():
            if skip_contained_titles and (titles[index] <= titles[other] or titles[other] <= titles[index]):
                continue
            score = count / len(words | tokens[other])
            if score > best_score or (score == best_score and best >= 0 and items[other].key < items[best].key):
                best, best_score = other, score
        if best < 0:
            best = seeded_rng(source, "negative", items[index].key).randrange(len(items) - 1)
            best += best >= index
        chosen.append(best)
    return chosen


def distractors(n_items: int, gold: int, count: int, seed: Sequence[str]) -> list[int]:
    """``count`` distinct indices other than ``gold``, drawn by an RNG seeded from ``seed``."""
    pool = [i for i in range(n_items) if i != gold]
    return seeded_rng(*seed).sample(pool, count)


# ------------------------------------------------------------------------------------------------ output
def jsonl_bytes(records: Iterable[dict]) -> bytes:
    """One JSON object per line, UTF-8, keys in insertion order (byte-stable output)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write_atomically(target: Path, files: dict[str, bytes]) -> None:
    """Write every file into a sibling temp folder, then swap it in; the old build survives any failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.building-{os.getpid()}"
    retired = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for name, data in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if target.exists():
            target.rename(retired)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired.exists() and not target.exists():
            retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
