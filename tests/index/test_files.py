"""Discovery and loading of a user's files: folders, sidecars, JSONL, CSV, and every kind of bad item."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from metaembed.errors import InputError
from metaembed.index.files import BadItemError, Limits, discover, load


def make_folder(root: Path) -> Path:
    (root / "animals").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "animals" / "fox.png")
    (root / "animals" / "fox.txt").write_text("a red fox in the snow")
    Image.new("RGBA", (20, 20), (0, 0, 255, 128)).save(root / "blue.webp")
    (root / "notes.md").write_text("# Revenue\nquarterly revenue table")
    (root / "plain.txt").write_text("two dogs on a beach")
    (root / "broken.png").write_bytes(b"not a png at all")
    (root / "empty.txt").write_text("  \n")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "data.bin").write_bytes(b"\x00")
    (root / ".hidden" / "secret.png").write_bytes(b"")
    return root


def test_folder_lists_images_with_sidecars_and_text_files_by_relative_path(tmp_path):
    found = discover([make_folder(tmp_path)])
    by_id = {item.id: item for item in found.items}
    assert list(by_id) == sorted(by_id)  # a sorted walk: the same order every time
    assert set(by_id) == {
        "animals/fox.png", "blue.webp", "broken.png", "empty.txt", "latin1.txt", "notes.md", "plain.txt"
    }  # fmt: skip
    assert by_id["animals/fox.png"].text_path == tmp_path / "animals" / "fox.txt"  # the sidecar is its caption
    assert by_id["blue.webp"].text_path is None
    assert found.ignored == {".bin": 1}
    assert found.bad == []


def test_load_reads_items_and_names_what_is_wrong_with_bad_ones(tmp_path):
    found = discover([make_folder(tmp_path)])
    by_id = {item.id: item for item in found.items}
    value, meta = load(by_id["animals/fox.png"])
    assert value["text"] == "a red fox in the snow" and value["image"].size == (40, 30)
    assert meta["caption"] == "a red fox in the snow" and meta["kind"] == "image+text"
    assert meta["path"] == str((tmp_path / "animals" / "fox.png").resolve())
    assert meta["size"] == (tmp_path / "animals" / "fox.png").stat().st_size
    value, meta = load(by_id["blue.webp"])
    assert value["image"].mode == "RGB" and value["text"] is None and meta["kind"] == "image"
    value, meta = load(by_id["notes.md"])
    assert value == {"text": "# Revenue\nquarterly revenue table", "image": None} and meta["kind"] == "text"
    for item_id, reason in [("broken.png", "not a readable image"), ("empty.txt", "empty text"),
                            ("latin1.txt", "not UTF-8")]:  # fmt: skip
        with pytest.raises(BadItemError, match=reason):
            load(by_id[item_id])


def test_limits_refuse_large_files_before_reading_them(tmp_path):
    found = discover([make_folder(tmp_path)])
    by_id = {item.id: item for item in found.items}
    with pytest.raises(BadItemError, match="pixels"):
        load(by_id["animals/fox.png"], Limits(max_image_pixels=1000))
    with pytest.raises(BadItemError, match="bytes"):
        load(by_id["animals/fox.png"], Limits(max_image_bytes=10))
    with pytest.raises(BadItemError, match="bytes"):
        load(by_id["plain.txt"], Limits(max_text_bytes=5))


def test_jsonl_and_csv_manifests_keep_their_fields_as_metadata(tmp_path):
    Image.new("RGB", (16, 16), "white").save(tmp_path / "a.png")
    rows = [
        {"id": "one", "text": "first", "source": "x"},
        {"image": "a.png", "caption": "a white square", "split": "test"},
        {"text": "no id", "split": "train"},
        {"id": 7, "text": "numeric id"},
        {"split": "test"},
    ]
    manifest = tmp_path / "items.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n[1]\n")
    (tmp_path / "more.csv").write_text("id,text,image,lang\nc1,hello,,en\nc2,,a.png,\n")
    found = discover([manifest, tmp_path / "more.csv"])
    assert [i.id for i in found.items] == ["one", "a.png", "items.jsonl:3", "c1", "c2"]
    assert found.items[0].fields == {"source": "x"} and found.items[3].fields == {"lang": "en"}
    assert found.items[1].image == tmp_path / "a.png"
    reasons = {b.id: b.reason for b in found.bad}
    assert set(reasons) == {"items.jsonl:4", "items.jsonl:5", "items.jsonl:6", "items.jsonl:7"}
    assert "non-empty string" in reasons["items.jsonl:4"] and "neither" in reasons["items.jsonl:5"]
    assert "not JSON" in reasons["items.jsonl:6"] and "JSON object" in reasons["items.jsonl:7"]
    _, meta = load(found.items[1])
    assert meta["caption"] == "a white square" and meta["split"] == "test"  # the manifest's own caption wins
    assert [i.id for i in discover([manifest], where={"split": "test"}).items] == ["a.png"]
    assert [i.id for i in discover([manifest], limit=2).items] == ["one", "a.png"]


def test_the_same_id_from_two_sources_is_a_bad_item_not_a_silent_overwrite(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("from a")
    (tmp_path / "b" / "x.txt").write_text("from b")
    found = discover([tmp_path / "a", tmp_path / "b"])
    assert [i.text_path for i in found.items] == [tmp_path / "a" / "x.txt"]
    assert found.bad[0].id == "x.txt" and "duplicate id" in found.bad[0].reason


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "x.json").write_text("[]") and p / "x.json", "not a .json file"),
        (lambda p: (p / "x.csv").write_text("a,b\n1,2\n") and p / "x.csv", "header"),
    ],
)
def test_unusable_sources_raise_before_anything_is_read(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        discover([make(tmp_path)])
