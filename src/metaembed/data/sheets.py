"""``sheets``: pages composed of several real pictures — a ViDoRe-like task where one vector per page is not enough.

A page is a g×g grid of OpenClipArt / emoji images (the builds of ``metaembed data build openclipart`` and
``emoji``), all from the same split, so a test page holds only test pictures. A query names **one** tile:

* ``sheets_t2i_<g>x<g>``: the tile's caption → the page that holds it;
* ``sheets_i2i_<g>x<g>``: the tile's picture, re-drawn at another size and position → the page.

Splits: a tile keeps its source dataset's split, except that training tiles with
``sha256('sheets-dev:<source>:<key>') mod 100 < 10`` form a **dev** split (its pages are never trained on;
``dev/<task>.jsonl`` is for choosing between models). Per grid size, each split's tiles are ordered by
``sha256('sheets:<g>:<key>')`` and cut into pages of g² tiles; the remainder (fewer than g² tiles) is left out
and named in the manifest. The training hard negative of a tile is the page holding its nearest other tile by
title/keyword overlap (the source builders' rule), or a seeded random page when that is its own page.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from metaembed.data.common import IMAGE_PLACEHOLDER, SourceItem, hard_negatives, hash_int, seeded_rng, write_atomically
from metaembed.data.errors import MissingRawDataError
from metaembed.data.records import iter_records
from metaembed.data.tasks import Entry, Task, task_files
from metaembed.errors import DataError, RecordError

NAME = "sheets"
SPLITS = ("train", "dev", "test")
DEV_PERCENT = 10  # of the source datasets' training tiles
TILE_SOURCES = ("openclipart", "emoji")
FORMAT_VERSION = 1
T2I_QUERY = "Find a page with a picture that matches the given text: {caption}"
I2I_QUERY = IMAGE_PLACEHOLDER + "Find the page that contains the given picture."
PAGE_CANDIDATE = IMAGE_PLACEHOLDER + "Represent the given page."
GUTTER = 2  # white px around each tile inside its cell
QUERY_SCALE = (0.55, 0.85)  # an i2i query redraws its tile at this share of the query canvas


@dataclass(frozen=True)
class SheetOptions:
    page_size: int = 256  # pages are page_size × page_size; a g×g page's tile gets page_size / g px
    grids: tuple[int, ...] = (2, 3)
    query_size: int = 128  # i2i query canvas
    num_distractors: int = 100

    def validate(self) -> None:
        if not self.grids or any(not 1 <= g <= 8 for g in self.grids) or len(set(self.grids)) != len(self.grids):
            raise DataError(f"grids must be distinct sizes between 1 and 8, got {list(self.grids)}")
        if not 64 <= self.page_size <= 2048:
            raise DataError(f"page size must be between 64 and 2048 px, got {self.page_size}")
        if self.page_size // max(self.grids) - 2 * GUTTER < 8:
            raise DataError(f"a {max(self.grids)}x{max(self.grids)} page of {self.page_size} px leaves no room")
        if not 32 <= self.query_size <= 1024:
            raise DataError(f"query size must be between 32 and 1024 px, got {self.query_size}")
        if self.num_distractors < 1:
            raise DataError(f"the number of distractors must be at least 1, got {self.num_distractors}")


@dataclass(frozen=True)
class Tile:
    """A built source item: ``uid`` = ``<source>__<id>``; its rendered image lives in the source build."""

    uid: str
    key: str
    caption: str
    split: str
    image: Path
    item: SourceItem


def read_tiles(data: Path) -> tuple[list[Tile], dict[str, str]]:
    """Every item of the built source datasets under ``data`` (sorted by uid), and their manifests' digests."""
    tiles, digests = [], {}
    for source in TILE_SOURCES:
        folder = data / source
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            raise MissingRawDataError(
                f"sheets are composed from the built {source} dataset, and {manifest} is missing: "
                f"run `metaembed data build {source}` (or `make data`) first"
            )
        digests[source] = hashlib.sha256(manifest.read_bytes()).hexdigest()
        for where, row in iter_records(folder / "items.jsonl"):
            try:
                image = folder / row["image"]
                tile = Tile(
                    uid=f"{source}__{row['id']}",
                    key=f"{source}:{row['key']}",
                    caption=row["caption"],
                    split=_split(row["split"], f"{source}:{row['key']}"),
                    image=image,
                    item=SourceItem(key=row["key"], id=row["id"], title=row["title"], image=image,
                                    keywords=tuple(row["keywords"])),
                )  # fmt: skip
            except (KeyError, TypeError) as error:
                raise RecordError(f"{where}: {error!r}; rebuild {source}") from None
            if not image.is_file():
                raise DataError(f"{image} is missing; rebuild {source} (`metaembed data verify {folder}`)")
            tiles.append(tile)
    tiles.sort(key=lambda tile: tile.uid)
    return tiles, digests


def _split(source_split: str, key: str) -> str:
    if source_split == "train" and hash_int(f"{NAME}-dev:{key}") % 100 < DEV_PERCENT:
        return "dev"
    return source_split


def layout_pages(tiles: Sequence[Tile], grid: int) -> tuple[list[list[Tile]], list[Tile]]:
    """Pages of ``grid²`` tiles in hash order, and the tiles left over (fewer than a page)."""
    ordered = sorted(tiles, key=lambda tile: (hash_int(f"{NAME}:{grid}:{tile.key}"), tile.uid))
    per_page = grid * grid
    full = len(ordered) // per_page * per_page
    return [list(ordered[i : i + per_page]) for i in range(0, full, per_page)], list(ordered[full:])


def render_page(tiles: Sequence[Tile], grid: int, size: int) -> bytes:
    """The page PNG: tile ``k`` in row ``k // grid``, column ``k % grid``, each fitted into its cell."""
    from PIL import Image

    page = Image.new("RGB", (size, size), (255, 255, 255))
    cell = size // grid
    inner = cell - 2 * GUTTER
    offset = (size - cell * grid) // 2
    for k, tile in enumerate(tiles):
        with Image.open(tile.image) as image:
            picture = image.convert("RGB").resize((inner, inner), Image.Resampling.LANCZOS)
        row, column = divmod(k, grid)
        page.paste(picture, (offset + column * cell + GUTTER, offset + row * cell + GUTTER))
    return _png(page)


def render_query(tile: Tile, size: int) -> bytes:
    """The tile redrawn at a seeded scale and position on a white ``size`` canvas (an i2i query)."""
    from PIL import Image

    rng = seeded_rng(NAME, "query", tile.key)
    side = max(8, round(size * rng.uniform(*QUERY_SCALE)))
    x, y = rng.randrange(size - side + 1), rng.randrange(size - side + 1)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    with Image.open(tile.image) as image:
        canvas.paste(image.convert("RGB").resize((side, side), Image.Resampling.LANCZOS), (x, y))
    return _png(canvas)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def page_id(grid: int, split: str, number: int) -> str:
    return f"{grid}x{grid}-{split}-{number:04d}"


def build_sheets(
    data: str | Path = "data",
    out: str | Path = "data",
    options: SheetOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Compose ``<out>/sheets/`` from ``<data>/openclipart`` and ``<data>/emoji``; return the manifest."""
    options = options or SheetOptions()
    options.validate()
    say = progress or (lambda message: None)
    data, out = Path(data), Path(out)
    tiles, digests = read_tiles(data)
    by_split = {split: [t for t in tiles if t.split == split] for split in SPLITS}
    files: dict[str, bytes] = {}
    say(f"{NAME}: " + " / ".join(f"{len(by_split[s])} {s}" for s in SPLITS) + " tiles; drawing i2i queries")
    for tile in tiles:
        files[f"images/queries/{tile.uid}.png"] = render_query(tile, options.query_size)
    negatives = {split: _negative_tiles(split_tiles) for split, split_tiles in by_split.items()}
    counts: dict[str, dict] = {}
    leftovers: dict[str, list[str]] = {}
    distractor_counts: dict[str, int] = {}
    for grid in options.grids:
        say(f"{NAME}: composing {grid}x{grid} pages at {options.page_size} px")
        tasks = {
            (split, kind): Task(f"{NAME}_{kind}_{grid}x{grid}", [], [], [], [], [])
            for split in ("dev", "test")
            for kind in ("t2i", "i2i")
        }
        tasks.update({("train", kind): tasks["test", kind] for kind in ("t2i", "i2i")})  # test files hold train
        for split, split_tiles in by_split.items():
            pages, rest = layout_pages(split_tiles, grid)
            leftovers[f"{grid}x{grid}/{split}"] = [t.uid for t in rest]
            page_of = {tile.uid: n for n, page in enumerate(pages) for tile in page}
            entries = []
            for number, page in enumerate(pages):
                path = f"images/pages/{page_id(grid, split, number)}.png"
                files[path] = render_page(page, grid, options.page_size)
                entries.append(Entry(PAGE_CANDIDATE, path, tuple(tile.uid for tile in page)))
            counts[f"{grid}x{grid}/{split}"] = {"pages": len(pages), "tiles": len(page_of), "left_over": len(rest)}
            for kind in ("t2i", "i2i"):
                task = tasks[split, kind]
                for number, page in enumerate(pages):
                    for tile in page:
                        query = _query(kind, tile)
                        if split != "train":
                            task.query_ids.append(tile.uid)
                            task.queries.append(query)
                            task.gold.append(number)
                        else:
                            negative = _negative_page(tile, negatives[split], page_of, len(pages), grid)
                            task.train.append((query, entries[number], entries[negative]))
                if split != "train":
                    task.corpus_ids.extend(page_id(grid, split, n) for n in range(len(pages)))
                    task.corpus.extend(entries)
        for split in ("dev", "test"):
            for kind in ("t2i", "i2i"):
                task = tasks[split, kind]
                task_output, count = task_files(task, options.num_distractors, NAME, split)
                distractor_counts[f"{split}/{task.name}"] = count
                files.update(task_output)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": NAME,
        "composed_from": {source: {"manifest_sha256": digests[source]} for source in TILE_SOURCES},
        "licenses": "the tiles' own: OpenClipArt public domain; emoji images Apache-2.0 (see those manifests)",
        "options": {
            "page_size": options.page_size,
            "grids": list(options.grids),
            "query_size": options.query_size,
            "gutter": GUTTER,
            "query_scale": list(QUERY_SCALE),
        },
        "split": "a tile keeps its source dataset's split, except training tiles with "
        f"sha256('{NAME}-dev:<source>:<key>') mod 100 < {DEV_PERCENT}, which form the dev split; "
        "a page holds tiles of one split only",
        "layout": f"per grid g and split, tiles ordered by sha256('{NAME}:<g>:<source>:<key>'), cut into pages "
        "of g² tiles, row-major; the remainder is left out",
        "instructions": {"t2i_query": T2I_QUERY, "i2i_query": I2I_QUERY, "page_candidate": PAGE_CANDIDATE},
        "eval": {"distractors_per_query": distractor_counts, "gold": "first in tgt_* (MMEB); qrels score 1 (BEIR)"},
        "counts": counts,
        "left_over_tiles": leftovers,
        "files": {name: hashlib.sha256(blob).hexdigest() for name, blob in sorted(files.items())},
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_atomically(out / NAME, files)
    say(f"{NAME}: wrote {len(files)} files to {out / NAME}")
    return manifest


def _query(kind: str, tile: Tile) -> Entry:
    if kind == "t2i":
        return Entry(T2I_QUERY.format(caption=tile.caption))
    return Entry(I2I_QUERY, f"images/queries/{tile.uid}.png")


def _negative_tiles(tiles: Sequence[Tile]) -> dict[str, Tile]:
    """Each tile's nearest other tile of the split by title/keyword overlap (the source builders' rule)."""
    if len(tiles) < 2:
        return {}
    nearest = hard_negatives([t.item for t in tiles], NAME)
    return {tile.uid: tiles[n] for tile, n in zip(tiles, nearest, strict=True)}


def _negative_page(tile: Tile, nearest: dict[str, Tile], page_of: dict[str, int], pages: int, grid: int) -> int:
    own = page_of[tile.uid]
    other = nearest.get(tile.uid)
    if other is not None and page_of.get(other.uid, own) != own:
        return page_of[other.uid]
    if pages < 2:
        raise DataError(f"{NAME}: a {grid}x{grid} training split needs at least 2 pages, has {pages}")
    choice = seeded_rng(NAME, "negative", str(grid), tile.key).randrange(pages - 1)
    return choice + (choice >= own)
