"""Data readers: the three schemas, image roots (directory, zip, inline), mixture, bad records, collate."""

from __future__ import annotations

import json
import logging
import zipfile
from collections import Counter

import pytest
from PIL import Image

from metaembed.errors import DataError
from metaembed.train.data import DatasetSpec, Mixture, collate, detect_format


def _png(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), colour).save(path)


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def mmeb(tmp_path):
    """data/<source>/train/<source>_t2i.jsonl with image paths relative to data/<source>/ (the data room's layout)."""
    root = tmp_path / "data" / "clip"
    _png(root / "images" / "a.png", "red")
    _png(root / "images" / "b.png", "blue")
    rows = [
        {"qry": "find a red square", "qry_image_path": "", "pos_text": "", "pos_image_path": "images/a.png",
         "neg_text": [""], "neg_image_path": ["images/b.png"]},
        {"qry": "<|image_1|>\nRepresent the given image.", "qry_image_path": "images/b.png", "pos_text": "blue",
         "pos_image_path": "", "neg_text": "red", "neg_image_path": ""},
    ]  # fmt: skip
    _write_jsonl(root / "train" / "clip_t2i.jsonl", rows)
    return root


def test_mmeb_rows_resolve_images_against_image_root(mmeb):
    spec = DatasetSpec(path=str(mmeb / "train" / "clip_t2i.jsonl"), image_root=str(mmeb))
    mixture = Mixture([spec], seed=0)
    examples = {e.where: e for e in (mixture.next_example() for _ in range(2))}
    first = examples["clip_t2i:0"]
    assert first.query == {"text": "find a red square", "image": None}
    assert first.positive["text"] is None and first.positive["image"].getpixel((0, 0)) == (255, 0, 0)
    assert first.negatives[0]["image"].getpixel((0, 0)) == (0, 0, 255)
    second = examples["clip_t2i:1"]
    assert second.query["image"] is not None and second.negatives == [{"text": "red", "image": None}]


def test_zip_image_root_and_plain_jsonl(tmp_path):
    _png(tmp_path / "img" / "x.png", "green")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.write(tmp_path / "img" / "x.png", "pics/x.png")
    rows = [{"query": "green", "positive_image": "pics/x.png", "negatives": [{"text": "not green"}]}]
    _write_jsonl(tmp_path / "plain" / "part.jsonl", rows)
    spec = DatasetSpec(path=str(tmp_path / "plain"), image_root=str(tmp_path / "images.zip"), name="plain")
    example = Mixture([spec]).next_example()
    assert example.positive["image"].getpixel((0, 0)) == (0, 128, 0)
    assert example.negatives == [{"text": "not green", "image": None}]


def test_colpali_schema_through_datasets(tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    _png(tmp_path / "page.png", "white")
    data = Dataset.from_dict(
        {"query": ["what is on page 1?"], "image": [str(tmp_path / "page.png")]},
        features=Features({"query": Value("string"), "image": ImageFeature()}),
    )
    data.save_to_disk(str(tmp_path / "colpali"))
    example = Mixture([DatasetSpec(path=str(tmp_path / "colpali"))]).next_example()
    assert example.query == {"text": "what is on page 1?", "image": None}
    assert example.positive["image"].size == (32, 24) and example.negatives == []
    assert detect_format({"query": "q", "image": None}) == "colpali"


def test_parquet_folders_read_by_the_shared_reader_and_rows_named_by_file(tmp_path, caplog):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), "white").save(buffer, format="PNG")
    page = {"bytes": buffer.getvalue(), "path": "page.png"}
    (tmp_path / "colpali").mkdir()
    for number, rows in enumerate(([{"query": "q0", "image": page}], [{"query": "q1", "image": None}])):
        path = tmp_path / "colpali" / f"train-{number:05d}-of-00002.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    spec = DatasetSpec(path=str(tmp_path / "colpali"), name="pages")
    mixture = Mixture([spec], seed=0)
    with caplog.at_level(logging.WARNING, logger="metaembed.train"):
        examples = [mixture.next_example() for _ in range(3)]  # one epoch holds both rows
    for example in examples:
        assert example.query == {"text": "q0", "image": None} and example.positive["image"].size == (32, 24)
    assert mixture.bad["pages"] >= 1  # the row without a page, named by its file and row
    assert f"{tmp_path / 'colpali' / 'train-00001-of-00002.parquet'} row 0" in caplog.text


def test_weighted_interleaving_and_resume(tmp_path):
    specs = []
    for name, weight in (("a", 3.0), ("b", 1.0)):
        _write_jsonl(tmp_path / f"{name}.jsonl", [{"query": f"{name}{i}", "positive": "p"} for i in range(5)])
        specs.append(DatasetSpec(path=str(tmp_path / f"{name}.jsonl"), weight=weight))
    mixture = Mixture(specs, seed=1)
    stream = [mixture.next_example().where for _ in range(400)]
    share = Counter(w.split(":")[0] for w in stream)
    assert 0.68 < share["a"] / 400 < 0.82  # 3:1
    firsts = [w for w in stream if w.startswith("a:")][:5]
    assert sorted(firsts) == [f"a:{i}" for i in range(5)]  # one epoch = every row once
    again = Mixture(specs, seed=1)
    for _ in range(150):
        again.next_example()
    state = again.state_dict()
    resumed = Mixture(specs, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert [resumed.next_example().where for _ in range(250)] == stream[150:]
    assert [w for w in (Mixture(specs, seed=1, rank=1).next_example().where for _ in range(20))] != stream[:20]


def test_bad_records_are_counted_and_named_or_fail(tmp_path, caplog):
    rows = [{"query": "ok", "positive": "p"}, {"query": "x", "positive_image": "missing.png"}, {"query": ""}]
    _write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.jsonl").write_text((tmp_path / "d.jsonl").read_text() + "{not json\n")
    spec = DatasetSpec(path=str(tmp_path / "d.jsonl"), name="mine")
    mixture = Mixture([spec], seed=0)
    with caplog.at_level(logging.WARNING, logger="metaembed.train"):
        got = [mixture.next_example().where for _ in range(3)]
    assert got == ["mine:0"] * 3
    assert mixture.bad["mine"] == 9  # 3 bad rows per epoch, 3 epochs
    assert "mine:1" in caplog.text and "missing.png" in caplog.text
    assert "mine:3" in caplog.text and "invalid JSON" in caplog.text
    failing = Mixture([spec], seed=0, on_bad_record="fail")
    with pytest.raises(DataError, match=r"bad record mine:\d .*on_bad_record=skip"):
        for _ in range(4):
            failing.next_example()


def test_bad_specs(tmp_path):
    with pytest.raises(DataError, match="format must be"):
        DatasetSpec(path="x", format="csv")
    with pytest.raises(DataError, match="neither a file"):
        Mixture([DatasetSpec(path=str(tmp_path / "nope" / "x"))])
    with pytest.raises(DataError, match="image root"):
        _write_jsonl(tmp_path / "d.jsonl", [{"query": "a", "positive": "b"}])
        Mixture([DatasetSpec(path=str(tmp_path / "d.jsonl"), image_root=str(tmp_path / "no.zip"))])


def test_collate_masks_missing_negatives(tiny_model, mmeb):
    from metaembed.train.data import Example

    examples = [
        Example({"text": "q1", "image": None}, {"text": "p1", "image": None}, [{"text": "n1", "image": None}]),
        Example({"text": "q2", "image": None}, {"text": "p2", "image": None}, []),
    ]
    batch = collate(tiny_model, examples, num_negatives=1, chunk_size=3)
    assert batch["num_negatives"] == 1
    assert batch["negative_mask"].tolist() == [[True], [False]]
    assert [c["input_ids"].shape[0] for c in batch["candidate"]] == [3, 1]
    assert collate(tiny_model, examples[1:], num_negatives=1)["num_negatives"] == 0


def test_batches_by_dataset_come_from_one_dataset(tmp_path):
    specs = []
    for name in ("a", "b"):
        _write_jsonl(tmp_path / f"{name}.jsonl", [{"query": f"{name}{i}", "positive": "p"} for i in range(5)])
        specs.append(DatasetSpec(path=str(tmp_path / f"{name}.jsonl")))
    mixture = Mixture(specs, seed=3)
    sources = [{e.where.split(":")[0] for e in mixture.next_batch(4, by_dataset=True)} for _ in range(20)]
    assert all(len(s) == 1 for s in sources) and {next(iter(s)) for s in sources} == {"a", "b"}
