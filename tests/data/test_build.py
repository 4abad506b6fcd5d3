"""Dataset builders on synthetic raw trees: schema, determinism, split, leaks, candidates, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
from PIL import Image

from metaembed.cli import main
from metaembed.data import (
    BuildOptions,
    DataError,
    ImageSkippedWarning,
    MissingRawDataError,
    build_dataset,
    verify_dataset,
)
from metaembed.data.common import I2T_QUERY, IMAGE_CANDIDATE, T2I_QUERY, is_test

OPTIONS = BuildOptions(size=32, num_distractors=5)
# sha256 of the manifests' "files" maps of the synthetic raw trees, recorded once: a rebuild in another process or
# on another day must give the same bytes (PNG bytes depend on the Pillow version: these are Pillow 13.0.0's).
OPENCLIPART_DIGEST = "9e038136954475276730bc9fc2ee5a83e64a07a89ebdc9f34c3f1d6be5c6f799"
EMOJI_LIMIT_30_DIGEST = "1bd9315d5bc71c4f26f16b45d34c4bca02e1d96d399f3ef54ecf39e9040a8707"
RENDER_DIGEST = "b4321a58b8d87ad6097a465b40212c8cbd5f17e80c443e63dc70c9e1e15bf5a1"
TRAIN_KEYS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
EVAL_KEYS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


def build(source: str, raw: Path, out: Path, options: BuildOptions = OPTIONS) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageSkippedWarning)
        return build_dataset(source, raw, out, options)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def files_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def built(clipart_raw, tmp_path):
    with pytest.warns(ImageSkippedWarning, match="corrupt.png"):
        manifest = build_dataset("openclipart", clipart_raw, tmp_path / "out", OPTIONS)
    return tmp_path / "out" / "openclipart", manifest


def test_layout_schema_and_images(built):
    folder, manifest = built
    assert (folder / "manifest.json").is_file()
    for task in ("t2i", "i2t"):
        for part, keys in (("train", TRAIN_KEYS), ("eval", EVAL_KEYS)):
            records = read_jsonl(folder / part / f"openclipart_{task}.jsonl")
            assert records, (part, task)
            for record in records:
                assert tuple(record) == keys
                for key in keys:
                    values = record[key] if isinstance(record[key], list) else [record[key]]
                    for value in values:
                        assert isinstance(value, str)
                        if key.endswith("path") and value:
                            assert (folder / value).is_file(), value
    image = Image.open(next((folder / "images").iterdir()))
    assert image.size == (32, 32) and image.mode == "RGB" and image.format == "PNG"
    assert verify_dataset(folder)["files"] == manifest["files"]
    assert set(manifest["files"]) == set(tree_bytes(folder)) - {"manifest.json"}
    assert manifest["source_versions"] == {"openclipart-png": "1:0.18+dfsg-19", "openclipart-svg": "1:0.18+dfsg-19"}


def test_cleaning_counts_and_texts(built):
    folder, manifest = built
    counts = manifest["counts"]
    assert counts["dropped"] == {
        "symlinked_duplicate": 1,
        "excluded_folder": 2,
        "frequent_title": 4,
        "duplicate_title": 1,
        "empty_title": 1,
        "garbage_title": 2,
    }
    assert counts["skipped_images"] == 1 and manifest["skipped_images"][0]["key"] == "unsorted/corrupt"
    assert counts["raw_entries"] == 60 + 2 + 4 + 2 + 3 + 1 + 1
    assert counts["items"] == 61 == counts["train_items"] + counts["test_items"]
    items = {i["key"]: i for i in read_jsonl(folder / "items.jsonl")}
    assert "animals/aa_duplicate_title" in items and "animals/zz_duplicate_title" not in items
    kept = items["animals/birds/item_000"]
    assert kept["description"] and kept["description"].endswith(".")
    # generic keywords, the creator's name and repeats (case-insensitive) are gone
    assert all(k not in ("clip art", "hash", "some artist") for k in kept["keywords"])
    assert len(kept["keywords"]) == len(set(kept["keywords"])) == 2
    assert kept["caption"].startswith(kept["title"] + ". ") and "Keywords: " in kept["caption"]


def test_two_builds_are_byte_identical_wherever_the_raw_tree_lives(clipart_raw, tmp_path):
    manifest = build("openclipart", clipart_raw, tmp_path / "a")
    assert files_digest(manifest) == OPENCLIPART_DIGEST
    moved = tmp_path / "elsewhere" / "raw"
    shutil.copytree(clipart_raw, moved, symlinks=True)
    build("openclipart", moved, tmp_path / "b")
    first, second = tree_bytes(tmp_path / "a" / "openclipart"), tree_bytes(tmp_path / "b" / "openclipart")
    assert first == second


def test_split_is_per_item_and_stable_when_items_come_and_go(clipart_raw, tmp_path, rawkit):
    build("openclipart", clipart_raw, tmp_path / "a")
    before = {i["key"]: i["split"] for i in read_jsonl(tmp_path / "a/openclipart/items.jsonl")}
    assert all((split == "test") == is_test("openclipart", key, 20) for key, split in before.items())
    for j in range(5):
        rawkit.add_clipart(clipart_raw, f"plants/new_{j}", f"Brand new plant {j}", seed=9000 + j, keywords=("plant",))
    shutil.rmtree(clipart_raw / "openclipart/usr/share/openclipart/png/people")
    build("openclipart", clipart_raw, tmp_path / "b")
    after = {i["key"]: i["split"] for i in read_jsonl(tmp_path / "b/openclipart/items.jsonl")}
    common = before.keys() & after.keys()
    assert len(common) >= 40 and len(after) > len(common)
    assert all(before[k] == after[k] for k in common)


def test_no_test_item_leaks_into_training(built):
    folder, _ = built
    items = read_jsonl(folder / "items.jsonl")
    test_images = {i["image"] for i in items if i["split"] == "test"}
    test_captions = {i["caption"] for i in items if i["split"] == "test"}
    for task in ("t2i", "i2t"):
        for record in read_jsonl(folder / "train" / f"openclipart_{task}.jsonl"):
            assert not {record["qry_image_path"], record["pos_image_path"], record["neg_image_path"]} & test_images
            assert record["pos_text"] not in test_captions and record["neg_text"] not in test_captions
            assert all(caption not in record["qry"] for caption in test_captions)
        for record in read_jsonl(folder / "eval" / f"openclipart_{task}.jsonl"):
            assert record["qry_img_path"] in test_images | {""}
            assert set(record["tgt_img_path"]) <= test_images | {""}
            assert set(record["tgt_text"]) <= test_captions | {IMAGE_CANDIDATE}
    assert len({i["caption"] for i in items}) == len(items)  # no two items share a caption


def test_eval_gold_first_with_distinct_distractors(built):
    folder, manifest = built
    items = read_jsonl(folder / "items.jsonl")
    caption_of = {i["image"]: i["caption"] for i in items}
    n_test = manifest["counts"]["test_items"]
    t2i = read_jsonl(folder / "eval/openclipart_t2i.jsonl")
    i2t = read_jsonl(folder / "eval/openclipart_i2t.jsonl")
    assert len(t2i) == len(i2t) == n_test
    for record in t2i:
        paths = record["tgt_img_path"]
        assert len(paths) == len(set(paths)) == 6 == len(record["tgt_text"])
        assert record["qry_text"] == T2I_QUERY.format(caption=caption_of[paths[0]])
        assert record["qry_img_path"] == "" and set(record["tgt_text"]) == {IMAGE_CANDIDATE}
    for record in i2t:
        texts = record["tgt_text"]
        assert len(texts) == len(set(texts)) == 6 and record["tgt_img_path"] == [""] * 6
        assert record["qry_text"] == I2T_QUERY and texts[0] == caption_of[record["qry_img_path"]]
    # distractors differ from query to query (sampled per item, not one fixed list)
    assert len({tuple(sorted(r["tgt_img_path"][1:])) for r in t2i}) > 1


def test_hard_negative_is_the_nearest_other_training_item(clipart_raw, tmp_path, rawkit):
    for j, words in enumerate((("zebra", "stripes", "savanna"), ("zebra", "stripes", "grass"), ("zebra", "stripes"))):
        key = f"animals/zebra_{j}"
        while is_test("openclipart", key, 20):
            key += "x"
        title = ("Zebra picture one", "Zebra picture two", "zebra")[j]  # "zebra" is contained: not a negative
        rawkit.add_clipart(clipart_raw, key, title, seed=7000 + j, keywords=words)
    folder = tmp_path / "out" / "openclipart"
    build("openclipart", clipart_raw, tmp_path / "out")
    by_image = {i["image"]: i for i in read_jsonl(folder / "items.jsonl")}
    records = read_jsonl(folder / "train/openclipart_t2i.jsonl")
    zebras = [r for r in records if "Zebra picture" in r["qry"]]
    assert len(zebras) == 2
    negatives = {by_image[r["pos_image_path"]]["title"]: by_image[r["neg_image_path"]]["title"] for r in zebras}
    assert negatives == {"Zebra picture one": "Zebra picture two", "Zebra picture two": "Zebra picture one"}
    for record in records:
        assert by_image[record["neg_image_path"]]["split"] == "train"
        assert record["neg_image_path"] != record["pos_image_path"]
    i2t = read_jsonl(folder / "train/openclipart_i2t.jsonl")
    assert all(r["neg_text"] != r["pos_text"] and r["qry"] == I2T_QUERY for r in i2t)


def test_emoji_build(emoji_raw, tmp_path):
    with pytest.warns(ImageSkippedWarning, match="1f4a3.png"):
        manifest = build_dataset("emoji", emoji_raw, tmp_path / "out", OPTIONS)
    folder = tmp_path / "out" / "emoji"
    counts = manifest["counts"]
    assert counts["dropped"] == {"component": 1, "no_image": 1, "no_label": 1}
    assert counts["skipped_images"] == 1 and counts["items"] == 60 and counts["raw_entries"] == 64
    assert manifest["source_versions"] == {"emoji-datasource-google": "16.0.0", "emojibase-data": "17.0.0"}
    items = {i["key"]: i for i in read_jsonl(folder / "items.jsonl")}
    assert items["1f12c-fe0f"]["title"].endswith(" 0")  # joined to emojibase through non_qualified
    assert all("face" in i["keywords"] for i in items.values())
    for task in ("t2i", "i2t"):
        assert len(read_jsonl(folder / f"eval/emoji_{task}.jsonl")) == counts["test_items"]
        assert len(read_jsonl(folder / f"train/emoji_{task}.jsonl")) == counts["train_items"]
    verify_dataset(folder)


def test_limit_takes_a_deterministic_subset(emoji_raw, tmp_path):
    options = BuildOptions(size=32, num_distractors=3, limit=30)
    a = build("emoji", emoji_raw, tmp_path / "a", options)
    assert files_digest(a) == EMOJI_LIMIT_30_DIGEST
    build("emoji", emoji_raw, tmp_path / "b", options)
    skipped = a["counts"]["skipped_images"]
    assert a["counts"]["items"] == 30 and a["counts"]["dropped"]["over_limit"] == 61 - 30 - skipped
    assert tree_bytes(tmp_path / "a/emoji") == tree_bytes(tmp_path / "b/emoji")


def test_missing_raw_files_say_how_to_fetch(tmp_path):
    for source in ("openclipart", "emoji"):
        with pytest.raises(MissingRawDataError, match=r"fetch_resources\.sh"):
            build_dataset(source, tmp_path, tmp_path / "out")
    with pytest.raises(MissingRawDataError, match=r"fetch_resources\.sh"):
        build_dataset("emoji", tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_requests_fail_clearly_and_keep_the_previous_build(clipart_raw, tmp_path):
    build("openclipart", clipart_raw, tmp_path / "out")
    before = tree_bytes(tmp_path / "out/openclipart")
    with pytest.raises(DataError, match="distractors"):
        build("openclipart", clipart_raw, tmp_path / "out", BuildOptions(size=32, num_distractors=500))
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        build_dataset("mnist", clipart_raw, tmp_path / "out")
    with pytest.raises(DataError, match="image size"):
        build_dataset("openclipart", clipart_raw, tmp_path / "out", BuildOptions(size=4))
    assert tree_bytes(tmp_path / "out/openclipart") == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["openclipart"]


def test_verify_detects_tampering(built):
    folder, _ = built
    image = next((folder / "images").iterdir())
    image.write_bytes(image.read_bytes() + b"x")
    with pytest.raises(DataError, match="differ from the manifest"):
        verify_dataset(folder)


def test_cli_build_verify_and_errors(tmp_path, capsys, rawkit):
    raw = rawkit.make_emoji_raw(tmp_path / "raw", n=30)
    out = tmp_path / "out"
    args = ["data", "build", "emoji", "--raw", str(raw), "--out", str(out), "--size", "24", "--distractors", "3"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "emoji: 30 items" in captured.out and "warning: emoji: skipped image" in captured.err
    assert main(["data", "verify", str(out / "emoji")]) == 0
    assert main(["data", "build", "openclipart", "--raw", str(raw), "--out", str(out)]) == 2
    assert "fetch_resources.sh" in capsys.readouterr().err


def test_render_composites_on_white_and_keeps_aspect(tmp_path):
    from metaembed.data.common import ImageProblem, render_image

    source = Image.new("RGBA", (80, 20), (0, 0, 0, 0))
    source.paste((255, 0, 0, 255), (0, 0, 80, 20))
    wide = tmp_path / "wide.png"
    padded = Image.new("RGBA", (120, 60), (0, 0, 0, 0))
    padded.paste(source, (20, 20))
    padded.save(wide)
    import io

    out = Image.open(io.BytesIO(render_image(wide, 40)))
    assert out.size == (40, 40) and out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    red_rows = [y for y in range(40) if out.getpixel((20, y))[1] < 50]
    assert 7 <= len(red_rows) <= 11  # 4:1 drawing → about 37×9 after trimming and a 4% margin
    assert out.getpixel((20, 20))[0] > 200 and out.getpixel((20, 20))[1] < 50
    blank = tmp_path / "blank.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(blank)
    with pytest.raises(ImageProblem, match="blank"):
        render_image(blank, 40)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ImageProblem, match="cannot decode"):
        render_image(broken, 40)
    assert hashlib.sha256(render_image(wide, 40)).hexdigest() == RENDER_DIGEST


def test_hard_negatives_rank_by_overlap_and_skip_contained_titles(tmp_path):
    from metaembed.data.common import SourceItem, hard_negatives

    def item(key, title, *keywords):
        return SourceItem(key=key, id=key, title=title, image=tmp_path / f"{key}.png", keywords=keywords)

    items = [
        item("a", "biohazard", "warning", "sign"),
        item("b", "Biohazard symbol", "warning", "sign"),
        item("c", "radiation", "warning", "sign"),
        item("d", "grinning face", "face", "smile"),
        item("e", "grinning face with big eyes", "face", "smile"),
    ]
    assert hard_negatives(items, "x") == [1, 0, 0, 4, 3]
    skipping = hard_negatives(items, "x", skip_contained_titles=True)
    assert skipping[:3] == [2, 2, 0]
    assert skipping[3] not in (3, 4) and skipping[4] not in (3, 4)  # nothing left: a seeded random other item
    assert skipping == hard_negatives(items, "x", skip_contained_titles=True)
