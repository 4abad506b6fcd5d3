"""Small synthetic raw trees in the real packages' formats (Debian openclipart, npm emoji sets)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
from PIL import Image

WORDS = [
    "apple",
    "banana",
    "cherry",
    "dog",
    "cat",
    "bird",
    "tree",
    "flower",
    "house",
    "car",
    "boat",
    "train",
    "star",
    "moon",
    "sun",
    "cloud",
    "rain",
    "snow",
    "fish",
    "frog",
    "guitar",
    "drum",
    "piano",
    "book",
    "pen",
    "lamp",
    "chair",
    "table",
    "clock",
    "key",
    "door",
    "window",
    "hat",
    "shoe",
    "ball",
    "kite",
    "bell",
    "cake",
    "bread",
]

SVG = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
  xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <metadata>
    <rdf:RDF>
      <cc:Work rdf:about="">
        <dc:title>{title}</dc:title>
        <dc:description>{description}</dc:description>
        <dc:subject>
          <rdf:Bag>
{keywords}
          </rdf:Bag>
        </dc:subject>
        <dc:creator>
          <cc:Agent>
            <dc:title>Some Artist</dc:title>
          </cc:Agent>
        </dc:creator>
        <cc:license rdf:resource="http://web.resource.org/cc/PublicDomain"/>
      </cc:Work>
    </rdf:RDF>
  </metadata>
</svg>
"""

MODES = ("RGBA", "P", "LA", "RGB", "L")


def make_png(path: Path, seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGBA") -> None:
    """A distinct small drawing: coloured blocks on a transparent (or white) background."""
    rng = random.Random(seed)
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    for _ in range(6):
        x, y = rng.randrange(size[0] - 4), rng.randrange(size[1] - 4)
        colour = (rng.randrange(256), rng.randrange(200), rng.randrange(256), 255)
        image.paste(colour, (x, y, x + rng.randrange(2, 10), y + rng.randrange(2, 10)))
    if mode == "P":
        image = image.convert("RGB").quantize(64)
    elif mode in ("RGB", "L"):
        background = Image.new("RGBA", size, (255, 255, 255, 255))
        background.alpha_composite(image)
        image = background.convert(mode)
    elif mode == "LA":
        image = image.convert("LA")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _svg(title: str, description: str = "", keywords: tuple[str, ...] = ()) -> str:
    lines = "\n".join(f"            <rdf:li>{k}</rdf:li>" for k in keywords)
    return SVG.format(title=title, description=description, keywords=lines)


def add_clipart(raw: Path, relative: str, title: str, seed: int, description: str = "", keywords=()) -> None:
    root = raw / "openclipart/usr/share/openclipart"
    make_png(root / "png" / f"{relative}.png", seed, mode=MODES[seed % len(MODES)])
    svg = root / "svg" / f"{relative}.svg"
    svg.parent.mkdir(parents=True, exist_ok=True)
    svg.write_text(_svg(title, description, keywords), encoding="utf-8")


def make_openclipart_raw(raw: Path, n: int = 60, seed: int = 0) -> Path:
    """``n`` good items plus one of each kind the cleaning drops, and one corrupt PNG."""
    rng = random.Random(seed)
    categories = ("animals/birds", "food/fruit", "transportation", "people", "recreation/music")
    for i in range(n):
        words = rng.sample(WORDS, 4)
        title = f"{words[0].title()} {words[1]} number {i}"
        add_clipart(
            raw,
            f"{categories[i % len(categories)]}/item_{i:03d}",
            title,
            seed=1000 + i,
            description=f"A {words[0]} drawn next to a {words[1]}." if i % 3 == 0 else "",
            keywords=(words[2], words[3], "clip_art", "hash", "Some Artist", words[2].upper()),
        )
    add_clipart(raw, "computer/icons/theme/icon_a", "Real Looking Icon", seed=1)
    add_clipart(raw, "shapes/stars/star_01", "gramastar", seed=2)
    for j in range(4):
        add_clipart(raw, f"unsorted/collection_{j}", "Various Cliparts", seed=10 + j)
    add_clipart(raw, "animals/zz_duplicate_title", "Apple tree with birds", seed=20)
    add_clipart(raw, "animals/aa_duplicate_title", "apple tree with birds", seed=21)
    add_clipart(raw, "unsorted/empty_title", "", seed=22)
    add_clipart(raw, "unsorted/untitled", "untitled", seed=23)
    add_clipart(raw, "unsorted/only_code", "0x8963570", seed=24)
    add_clipart(raw, "unsorted/corrupt", "Broken Picture", seed=25)
    root = raw / "openclipart/usr/share/openclipart"
    (root / "png/unsorted/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (root / "png/food/linked.png").symlink_to("fruit/item_001.png")
    doc = raw / "openclipart/usr/share/doc/openclipart-png"
    doc.mkdir(parents=True, exist_ok=True)
    with gzip.open(doc / "changelog.Debian.gz", "wt") as handle:
        handle.write("openclipart (1:0.18+dfsg-19) unstable; urgency=medium\n\n  * test\n")
    return raw


def make_emoji_raw(raw: Path, n: int = 60, seed: int = 0) -> Path:
    """emoji-datasource-google + emojibase-data trees with ``n`` good emoji and a few the cleaning drops."""
    rng = random.Random(seed)
    package = raw / "emoji-datasource-google/package"
    images = package / "img/google/64"
    images.mkdir(parents=True, exist_ok=True)
    entries, labels = [], []
    for i in range(n):
        code = f"1F{300 + i:03X}"
        qualified = i % 7 == 0  # these join through non_qualified
        unified = f"{code}-FE0F" if qualified else code
        entries.append(
            {
                "name": f"EMOJI {i}",
                "unified": unified,
                "non_qualified": code if qualified else None,
                "image": f"{unified.lower()}.png",
                "category": "Smileys & Emotion",
                "subcategory": "face",
                "has_img_google": True,
            }
        )
        make_png(images / f"{unified.lower()}.png", 5000 + i, size=(64, 64))
        words = rng.sample(WORDS, 3)
        labels.append(
            {
                "label": f"{words[0]} {words[1]} {i}",
                "hexcode": code,
                "tags": sorted({words[1], words[2], "face"}),
                "emoji": "?",
                "group": 0,
            }
        )
    extra = [
        ("1F4A0", "Component", "skin tone", True),
        ("1F4A1", "Objects", "no image file", False),
        ("1F4A2", "Objects", None, True),  # no emojibase label
        ("1F4A3", "Objects", "broken picture", True),
    ]
    for code, category, label, with_image in extra:
        entries.append(
            {
                "name": code,
                "unified": code,
                "non_qualified": None,
                "image": f"{code.lower()}.png",
                "category": category,
                "subcategory": "x",
                "has_img_google": True,
            }
        )
        if with_image:
            make_png(images / f"{code.lower()}.png", int(code, 16), size=(64, 64))
        if label:
            labels.append({"label": label, "hexcode": code, "tags": ["thing"], "emoji": "?", "group": 7})
    (images / "1f4a3.png").write_bytes(b"garbage, not an image")
    (package / "emoji.json").write_text(json.dumps(entries), encoding="utf-8")
    (package / "package.json").write_text('{\n  "name": "emoji-datasource-google",\n  "version": "16.0.0"\n}\n')
    base = raw / "emojibase-data/package"
    (base / "en").mkdir(parents=True, exist_ok=True)
    (base / "en/data.json").write_text(json.dumps(labels), encoding="utf-8")
    (base / "package.json").write_text('{\n  "name": "emojibase-data",\n  "version": "17.0.0"\n}\n')
    return raw


@pytest.fixture
def clipart_raw(tmp_path):
    return make_openclipart_raw(tmp_path / "raw")


@pytest.fixture
def emoji_raw(tmp_path):
    return make_emoji_raw(tmp_path / "raw")


@pytest.fixture
def rawkit():
    """The builders above, for tests that shape their own raw trees (test modules cannot import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        add_clipart=add_clipart, make_openclipart_raw=make_openclipart_raw, make_emoji_raw=make_emoji_raw
    )
