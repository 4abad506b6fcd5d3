"""Bad input: a specific error, and the index on disk byte-for-byte unchanged."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from metaembed.errors import BudgetError, InputError, ShapeError
from metaembed.index import (
    DuplicateIdError,
    IndexExistsError,
    IndexFormatError,
    IndexNotFoundError,
    UnknownIdError,
    create_index,
    open_index,
)

H = runpy.run_path(str(Path(__file__).with_name("helpers.py")))
embeddings, digest = H["embeddings"], H["digest"]


@pytest.fixture(params=["fp32", "int8"])
def index(tmp_path, request):
    ix = create_index(tmp_path / "ix", dim=8, num_vectors=16, dtype=request.param)
    ix.add(["a", "b", "c"], embeddings(3, 16, 8), [{"n": 1}, None, {"n": 3}])
    yield ix
    ix.close()


BAD_WRITES = [
    ("wrong D", lambda ix: ix.add(["x"], embeddings(1, 16, 7)), ShapeError, "D = 8"),
    ("wrong R", lambda ix: ix.add(["x"], embeddings(1, 15, 8)), ShapeError, "R = 16"),
    ("2-d tensor", lambda ix: ix.add(["x"], torch.randn(16, 8)), ShapeError, "3 dims"),
    ("int tensor", lambda ix: ix.add(["x"], torch.ones(1, 16, 8, dtype=torch.long)), ShapeError, "float"),
    ("NaN", lambda ix: ix.add(["x"], torch.full((1, 16, 8), float("nan"))), InputError, "NaN"),
    ("dup in call", lambda ix: ix.add(["x", "x"], embeddings(2, 16, 8)), DuplicateIdError, "repeat"),
    ("dup existing", lambda ix: ix.add(["x", "a"], embeddings(2, 16, 8)), DuplicateIdError, "upsert"),
    ("dup in upsert", lambda ix: ix.upsert(["a", "a"], embeddings(2, 16, 8)), DuplicateIdError, "repeat"),
    ("id count", lambda ix: ix.add(["x"], embeddings(2, 16, 8)), InputError, "one id per item"),
    ("empty id", lambda ix: ix.add([""], embeddings(1, 16, 8)), InputError, "empty"),
    ("non-str id", lambda ix: ix.add([5], embeddings(1, 16, 8)), InputError, "must be a str"),
    ("lone surrogate", lambda ix: ix.add(["ok", "\ud800"], embeddings(2, 16, 8)), InputError, "UTF-8"),
    ("single str ids", lambda ix: ix.add("ab", embeddings(2, 16, 8)), InputError, "sequence"),
    ("metadata count", lambda ix: ix.add(["x"], embeddings(1, 16, 8), [{}, {}]), InputError, "metadata"),
    ("metadata type", lambda ix: ix.add(["x"], embeddings(1, 16, 8), [{"f": {1, 2}}]), InputError, "JSON"),
    ("metadata nan", lambda ix: ix.add(["x"], embeddings(1, 16, 8), [{"f": float("nan")}]), InputError, "JSON"),
    ("metadata surrogate", lambda ix: ix.add(["x"], embeddings(1, 16, 8), [{"f": "\udc80"}]), InputError, "JSON"),
    ("unknown delete", lambda ix: ix.delete(["a", "zzz"]), UnknownIdError, "nothing was deleted"),
    ("surrogate delete", lambda ix: ix.delete(["\ud800"]), InputError, "UTF-8"),
]


@pytest.mark.parametrize(("name", "call", "error", "match"), BAD_WRITES, ids=[b[0] for b in BAD_WRITES])
def test_bad_write_raises_and_leaves_disk_unchanged(index, name, call, error, match):
    before = digest(index.path)
    with pytest.raises(error, match=match):
        call(index)
    assert digest(index.path) == before
    assert len(index) == 3 and "a" in index  # in-memory state unchanged too
    reopened = open_index(index.path, read_only=True)
    assert len(reopened) == 3
    reopened.close()


BAD_SEARCHES = [
    ("budget above stored", dict(budget="4x32"), BudgetError, "r_c ≤ 16"),
    ("budget above query", dict(budget="8x16"), BudgetError, "r_q ≤ 4"),
    ("bad budget text", dict(budget="lots"), BudgetError, "16x64"),
    ("k zero", dict(budget="1x1", k=0), InputError, "positive"),
    ("candidates without two-stage", dict(budget="1x1", candidates=5), InputError, "two_stage"),
]


@pytest.mark.parametrize(("name", "kwargs", "error", "match"), BAD_SEARCHES, ids=[b[0] for b in BAD_SEARCHES])
def test_bad_search(index, name, kwargs, error, match):
    with pytest.raises(error, match=match):
        index.search(embeddings(2, 4, 8), **kwargs)


def test_wrong_query_dim(index):
    with pytest.raises(ShapeError, match="D = 8"):
        index.search(embeddings(2, 4, 5), "1x1")


def test_create_refuses_existing_or_bad_args(index, tmp_path):
    before = digest(index.path)
    with pytest.raises(IndexExistsError):
        create_index(index.path, 8, 16)
    assert digest(index.path) == before
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(IndexExistsError, match="non-empty"):
        create_index(tmp_path / "full", 8, 16)
    with pytest.raises(InputError, match="dtype"):
        create_index(tmp_path / "n1", 8, 16, dtype="fp16")
    with pytest.raises(InputError, match="dim"):
        create_index(tmp_path / "n2", 0, 16)
    with pytest.raises(InputError, match="backend"):
        create_index(tmp_path / "n3", 8, 16, backend="lucene")


def _corrupt_and_open(path: Path, mutate) -> None:
    mutate(path)
    before = digest(path)
    with pytest.raises(IndexFormatError):
        open_index(path)
    with pytest.raises(IndexFormatError):
        open_index(path, read_only=True)
    assert digest(path) == before


def test_truncated_segment_file(index):
    index.close()
    seg = sorted(index.path.glob("seg-*.g3.bin"))[0]
    _corrupt_and_open(index.path, lambda p: seg.write_bytes(seg.read_bytes()[:-3]))


def test_truncated_manifest(index):
    index.close()
    m = index.path / "MANIFEST"
    _corrupt_and_open(index.path, lambda p: m.write_bytes(m.read_bytes()[: len(m.read_bytes()) // 2]))


def test_flipped_manifest_byte(index):
    index.close()
    m = index.path / "MANIFEST"
    _corrupt_and_open(index.path, lambda p: m.write_bytes(m.read_bytes().replace(b'"count": 3', b'"count": 2')))


def test_corrupt_items_file(index):
    index.close()
    items = sorted(index.path.glob("seg-*.items.json"))[0]
    _corrupt_and_open(index.path, lambda p: items.write_bytes(items.read_bytes().replace(b'"a"', b'"z"')))


def test_foreign_files(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "MANIFEST").write_bytes(b"\x89PNG\r\n\x1a\n binary")
    _corrupt_and_open(foreign, lambda p: None)
    (foreign / "MANIFEST").write_text('{"format": "something-else", "version": 1}')
    _corrupt_and_open(foreign, lambda p: None)
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"not an index")
    with pytest.raises(IndexFormatError, match="is a file"):
        open_index(a_file)
    with pytest.raises(IndexNotFoundError):
        open_index(tmp_path / "missing")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(IndexNotFoundError, match="no metaembed index"):
        open_index(tmp_path / "emptydir")


def test_newer_format_version(index):
    import json
    import zlib

    index.close()
    m = index.path / "MANIFEST"
    body = json.loads(m.read_text())
    body.pop("checksum")
    body["version"] = 99
    body["checksum"] = zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    m.write_text(json.dumps(body))
    before = digest(index.path)
    with pytest.raises(IndexFormatError, match="version 99"):
        open_index(index.path)
    assert digest(index.path) == before
