"""Eval fixtures: MMEB and ViDoRe data in their exact schemas (images drawn with PIL), a table encoder."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "purple": (140, 40, 160),
    "orange": (250, 140, 20),
}


def draw(path: Path, colour: str, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (size, size), COLOURS[colour])
    image.putpixel((size // 2, size // 2), (size, 3 * size % 256, 7))
    image.save(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


CLS_LABELS = ["red", "green", "blue", "yellow"]


def mmeb_rows() -> dict[str, list[dict]]:
    """Four datasets: Classification IND, Retrieval IND (image candidates), Grounding OOD, and an unknown one."""
    imagenet = []
    for i, colour in enumerate(["red", "green", "blue"]):
        labels = [colour] + [c for c in CLS_LABELS if c != colour] + [colour]  # the gold repeated at the end
        imagenet.append(
            {
                "qry_text": "<|image_1|>\nRepresent the given image for classification",
                "qry_img_path": f"ImageNet-1K/q{i}.png",
                "tgt_text": labels,
                "tgt_img_path": [""] * len(labels),
            }
        )
    cirr = []
    for i, (colour, others) in enumerate([("yellow", ["black", "white"]), ("purple", ["orange", "red"])]):
        cirr.append(
            {
                "qry_text": f"<|image_1|>\nFind a similar everyday image with the described changes: {colour}",
                "qry_img_path": f"CIRR/q{i}.png",
                "tgt_text": ["<|image_1|>\nRepresent the given image."] * 3,
                "tgt_img_path": [f"CIRR/c_{c}.png" for c in [colour, *others]],
            }
        )
    refcoco = [
        {
            "qry_text": f'<|image_1|>\nSelect the portion of the image that isolates the object labeled as "{c}"',
            "qry_img_path": f"RefCOCO/q{i}.png",
            "tgt_text": ["<|image_1|>\nRepresent the given cropped image of the object"] * 2,
            "tgt_img_path": [f"RefCOCO/crop_{c}.png", f"RefCOCO/crop_{o}.png"],
        }
        for i, (c, o) in enumerate([("orange", "blue"), ("white", "black")])
    ]
    toy = [
        {"qry_text": f"colour {c}", "qry_img_path": "", "tgt_text": [c, "grey", "pink"], "tgt_img_path": []}
        for c in ["red", "blue"]
    ]
    return {"ImageNet-1K": imagenet, "CIRR": cirr, "RefCOCO": refcoco, "ToySet": toy}


def mmeb_images(rows: dict[str, list[dict]]) -> dict[str, str]:
    """relative image path → colour."""
    out = {}
    for records in rows.values():
        for r in records:
            paths = [r["qry_img_path"], *r["tgt_img_path"]]
            for p in paths:
                if p:
                    stem = Path(p).stem
                    colour = stem.split("_")[-1] if "_" in stem else "purple"
                    out[p] = colour if colour in COLOURS else "black"
    return out


@pytest.fixture
def mmeb_data(tmp_path):
    """A data helper's layout: data/<source>/eval/<task>.jsonl (+ one hub-style parquet folder), images
    relative to data/<source>/. Returns (eval dir, image root, rows)."""
    source = tmp_path / "data" / "fixture"
    rows = mmeb_rows()
    for name, records in rows.items():
        if name == "RefCOCO":
            write_parquet(source / "eval" / name / "test-00000-of-00001.parquet", records)
        else:
            write_jsonl(source / "eval" / f"{name}.jsonl", records)
    for path, colour in mmeb_images(rows).items():
        draw(source / path, colour)
    return source / "eval", source, rows


@pytest.fixture
def mmeb_zip_data(tmp_path, monkeypatch):
    """The hub layout: <dataset>/test-*.parquet and an images.zip wrapping the images in eval_images/."""
    monkeypatch.setenv("METAEMBED_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "mmeb"
    rows = mmeb_rows()
    for name, records in rows.items():
        write_parquet(data / name / "test-00000-of-00001.parquet", records)
    staging = tmp_path / "staging"
    for path, colour in mmeb_images(rows).items():
        draw(staging / path, colour)
    with zipfile.ZipFile(data / "images.zip", "w") as bundle:
        for file in sorted(staging.rglob("*.png")):
            bundle.write(file, "eval_images/" + file.relative_to(staging).as_posix())
    return data, rows


class TableEncoder:
    """A deterministic encoder: each item's vectors are small dyadic numbers seeded by the item (exact in
    float32), or set explicitly; it records every item it was asked to encode."""

    def __init__(self, num_query=16, num_candidate=64, dim=4, table=None):
        self.counts = {"query": num_query, "candidate": num_candidate}
        self.dim = dim
        self.table = dict(table or {})
        self.calls: list[tuple[str, list]] = []

    def num_vectors(self, side):
        return self.counts[side]

    @staticmethod
    def key(item):
        image = item.get("image")
        if isinstance(image, Image.Image):  # pages decoded from parquet bytes: key by content
            return item.get("text"), f"pixels{image.getpixel((0, 0))}{image.size}"
        return item.get("text"), ("/".join(Path(image).parts[-2:]) if image is not None else None)

    def vectors(self, side, key):
        if (side, key) in self.table:
            return torch.as_tensor(self.table[(side, key)], dtype=torch.float32)
        seed = int(hashlib.sha1(repr((side, key)).encode()).hexdigest()[:8], 16)
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(-8, 9, (self.counts[side], self.dim), generator=gen).float() / 8

    def _encode(self, side, items, batch_size):
        assert batch_size >= 1
        self.calls.append((side, list(items)))
        return torch.stack([self.vectors(side, self.key(i)) for i in items])

    def encode_queries(self, items, *, batch_size=8):
        return self._encode("query", items, batch_size)

    def encode_candidates(self, items, *, batch_size=8):
        return self._encode("candidate", items, batch_size)


@pytest.fixture
def table_encoder():
    return TableEncoder


def page(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (48, 64), colour)


def vidore_tables(seed: int, n_pages: int, languages: list[str]):
    """corpus / queries / qrels rows (graded 1-2, some queries without qrels)."""
    import random

    rng = random.Random(seed)
    pages = [(f"{seed}-p{i}", (rng.randrange(256), rng.randrange(256), 17 * i % 256)) for i in range(n_pages)]
    queries, qrels = [], []
    for i, language in enumerate(languages):
        queries.append({"query-id": f"{seed}-q{i}", "query": f"what is on page {i} ({language})", "language": language})
        if i % 4 == 3:
            continue  # a query without judgments is skipped
        for doc, _ in rng.sample(pages, rng.randint(1, 3)):
            qrels.append({"query-id": f"{seed}-q{i}", "corpus-id": doc, "score": rng.randint(1, 2)})
    return pages, queries, qrels


@pytest.fixture
def vidore_data(tmp_path):
    """Three BEIR datasets: two as jsonl with page files, one in the hub's parquet layout with image bytes."""
    root = tmp_path / "vidore"
    specs = {
        "esg_reports_human_labeled_v2": (1, 7, ["eng"] * 5),
        "esg_reports_v2": (2, 9, ["eng", "fra", "spa", "deu", "eng", "fra", "eng", "deu"]),
        "economics_reports_v2": (3, 8, ["english", "french", "english", "german", "spanish", "english"]),
    }
    for name, (seed, n_pages, languages) in specs.items():
        pages, queries, qrels = vidore_tables(seed, n_pages, languages)
        folder = root / name
        if name == "economics_reports_v2":
            corpus = []
            for doc, colour in pages:
                buffer = io.BytesIO()
                page(colour).save(buffer, format="PNG")
                corpus.append({"corpus-id": doc, "image": {"bytes": buffer.getvalue(), "path": f"{doc}.png"}})
            write_parquet(folder / "corpus" / "test-00000-of-00001.parquet", corpus)
            write_parquet(folder / "queries" / "test-00000-of-00001.parquet", queries)
            write_parquet(folder / "qrels" / "test-00000-of-00001.parquet", qrels)
        else:
            corpus = []
            for doc, colour in pages:
                (folder / "pages").mkdir(parents=True, exist_ok=True)
                page(colour).save(folder / "pages" / f"{doc}.png")
                corpus.append({"corpus-id": doc, "image": f"pages/{doc}.png"})
            write_jsonl(folder / "corpus.jsonl", corpus)
            write_jsonl(folder / "queries.jsonl", queries)
            write_jsonl(folder / "qrels.jsonl", qrels)
    return root
