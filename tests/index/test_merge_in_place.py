"""Merges that extend their first input in place: the same index as a rewrite, fewer bytes written, readers of the
old snapshot undisturbed, bytes past the manifest's rows ignored by readers and verify and trimmed by the writer."""

from __future__ import annotations

import errno
import json
import os
import runpy
import zlib
from pathlib import Path

import pytest
import torch

from metaembed.budget import Budget
from metaembed.cli import main
from metaembed.index import create_index, open_index
from metaembed.index import manifest as manifest_module
from metaembed.index import merge as merge_module
from metaembed.index.layout import row_bytes
from metaembed.index.merge import MergePolicy
from metaembed.index.store import EmbeddedIndex

H = runpy.run_path(str(Path(__file__).with_name("helpers.py")))
embeddings, digest = H["embeddings"], H["digest"]
R, D = 16, 8
OFF_THE_WRITE_PATH = MergePolicy(on_write=False)


def _batch(b: int, n: int = 5) -> tuple[list[str], torch.Tensor, list[dict]]:
    ids = [f"b{b}-{i}" for i in range(n)]
    return ids, embeddings(n, R, D, seed=b), [{"batch": b, "row": i} for i in range(n)]


def _build(path: Path, dtype: str = "int8", batches: int = 10, policy: MergePolicy = OFF_THE_WRITE_PATH):
    ix = create_index(path, dim=D, num_vectors=R, dtype=dtype, merge_policy=policy)
    for b in range(batches):
        ix.add(*_batch(b))
    return ix


def _inode(path: Path, segment: str) -> int:
    return os.stat(path / f"{segment}.g0.bin").st_ino


def _files(path: Path) -> dict[str, bytes]:
    """Every segment file's bytes, keyed by its suffix (one segment in the index)."""
    return {p.name.split(".", 1)[1]: p.read_bytes() for p in sorted(path.glob("seg-*"))}


def _vector_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """(size on disk, size the manifest counts) of every vector file the manifest names."""
    manifest = manifest_module.read(path)
    return {
        name: ((path / name).stat().st_size, size)
        for seg in manifest["segments"]
        for name, size in manifest_module.segment_files(manifest, seg)
        if not name.endswith(".items.json")
    }


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_a_merge_extends_its_first_segment_and_gives_the_index_a_rewrite_gives(tmp_path, monkeypatch, dtype):
    queries = embeddings(3, 4, D, seed=99)
    extended = _build(tmp_path / "extended", dtype)
    first = extended.segments[0].name
    inode = _inode(tmp_path / "extended", first)
    assert extended.merge() == 1
    (merged,) = extended.segments
    assert merged.name != first and _inode(tmp_path / "extended", merged.name) == inode  # the same file, grown
    assert not list((tmp_path / "extended").glob(f"{first}.*"))  # the base's own names are gone

    with monkeypatch.context() as patched:
        patched.setattr(merge_module, "extendable", lambda *args: False)
        rewritten = _build(tmp_path / "rewritten", dtype)
        base_inode = _inode(tmp_path / "rewritten", rewritten.segments[0].name)
        assert rewritten.merge() == 1
        assert _inode(tmp_path / "rewritten", rewritten.segments[0].name) != base_inode

    assert _files(tmp_path / "extended") == _files(tmp_path / "rewritten")  # byte for byte, items included
    entries = [manifest_module.read(tmp_path / name)["segments"] for name in ("extended", "rewritten")]
    assert [{**e, "name": None} for e in entries[0]] == [{**e, "name": None} for e in entries[1]]
    assert extended.ids() == rewritten.ids() and len(extended) == 50
    a, b = extended.search(queries, "4x16", k=10), rewritten.search(queries, "4x16", k=10)
    assert a.ids == b.ids and torch.equal(a.scores, b.scores)
    assert extended.get(["b0-0", "b9-4"])[1] == [{"batch": 0, "row": 0}, {"batch": 9, "row": 4}]
    extended.close()
    rewritten.close()
    assert EmbeddedIndex.verify(tmp_path / "extended") == ([], 5 if dtype != "int8" else 9)


def test_an_extended_segment_is_extended_again_by_the_next_tier(tmp_path):
    c, ids = embeddings(27, 8, 4, seed=1), [f"i{j}" for j in range(27)]
    with create_index(tmp_path / "ix", 4, 8, dtype="bf16", merge_policy=MergePolicy(ratio=3)) as ix:
        for j in range(27):
            ix.add([ids[j]], c[j : j + 1])
        assert [s.count for s in ix.segments] == [27] and ix.ids() == ids
        torch.testing.assert_close(ix.get(ids)[0], c.bfloat16().float(), rtol=0, atol=0)
    assert EmbeddedIndex.verify(tmp_path / "ix")[0] == []


def test_a_reader_of_the_old_snapshot_keeps_reading_its_rows_while_the_base_grows(tmp_path):
    path = tmp_path / "ix"
    writer = _build(path, "bf16")
    reader = open_index(path, read_only=True)
    queries = embeddings(2, 4, D, seed=7)
    old = reader.segments
    budget = Budget(4, 16)
    scores = [s.score(queries, budget, slice(0, s.count)) for s in old]
    writer.merge()  # extends old[0]'s files in place, removes the other nine
    for segment, expected in zip(old, scores, strict=True):
        segment.check()  # a file grown past the mapping is no change to what it maps
        assert torch.equal(segment.score(queries, budget, slice(0, segment.count)), expected)
    assert old[0].files[0].size < os.stat(path / f"{writer.segments[0].name}.g0.bin").st_size
    assert len(reader) == 50 and len(reader.segments) == 1  # the next read refreshes to the merged snapshot
    reader.close()
    writer.close()


def test_a_base_with_tombstones_or_another_link_is_rewritten(tmp_path):
    path = tmp_path / "ix"
    with _build(path) as ix:
        first = ix.segments[0].name
        inode = _inode(path, first)
        ix.delete(["b0-1"])
        assert ix.merge() == 1
        assert _inode(path, ix.segments[0].name) != inode and len(ix) == 49
    path = tmp_path / "linked"
    with _build(path) as ix:
        first = ix.segments[0].name
        backup = tmp_path / "backup.g0.bin"
        os.link(path / f"{first}.g0.bin", backup)  # as a `cp -al` backup would
        size = backup.stat().st_size
        assert ix.merge() == 1
        assert _inode(path, ix.segments[0].name) != backup.stat().st_ino and backup.stat().st_size == size
        assert len(ix) == 50


def test_without_hard_links_the_merge_rewrites(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    path = tmp_path / "ix"
    with _build(path) as ix:
        monkeypatch.setattr(os, "link", no_links)
        assert ix.merge() == 1 and len(ix) == 50 and len(ix.segments) == 1
    assert EmbeddedIndex.verify(path)[0] == []


def test_the_headroom_check_asks_for_the_appended_bytes_only(tmp_path, monkeypatch):
    asked = []
    check = merge_module.check_headroom

    def recording(root, needed, what):
        asked.append((needed, what))
        check(root, needed, what)

    with _build(tmp_path / "ix") as ix:
        manifest = manifest_module.read(tmp_path / "ix")
        monkeypatch.setattr(merge_module, "check_headroom", recording)
        ix.merge()
    items = sum(seg["items_bytes"] for seg in manifest["segments"])
    assert asked == [(45 * row_bytes(manifest) + items, "merge 10 segments (50 live rows, 45 of them copied)")]


def test_a_failed_extension_leaves_the_files_as_they_were(tmp_path, monkeypatch):
    path = tmp_path / "ix"
    with _build(path) as ix:
        before = digest(path)

        def refuse(root, manifest):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(manifest_module, "publish", refuse)
        with pytest.raises(OSError, match="Input/output"):
            ix.merge()
        monkeypatch.undo()
        assert digest(path) == before  # the links removed, the base's files truncated back to its rows
        assert ix.merge() == 1 and len(ix) == 50


def test_bytes_past_the_rows_are_ignored_by_readers_and_verify_and_trimmed_by_the_writer(tmp_path, capsys):
    path = tmp_path / "ix"
    with _build(path, batches=2) as ix:
        expected = ix.get(ix.ids())
    vector_file = next(iter(_vector_sizes(path)))
    with open(path / vector_file, "ab") as f:  # what an in-place merge killed before its commit leaves
        f.write(os.urandom(1000))
    assert EmbeddedIndex.verify(path) == ([], 18)
    assert main(["index", "verify", str(path)]) == 0 and "18 files intact" in capsys.readouterr().out
    with open_index(path, read_only=True) as reader:
        got = reader.get(reader.ids())
        assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
        assert (
            _vector_sizes(path)[vector_file][0] == _vector_sizes(path)[vector_file][1] + 1000
        )  # readers write nothing
    with open_index(path) as writer:
        assert all(on_disk == counted for on_disk, counted in _vector_sizes(path).values())
        assert torch.equal(writer.get(writer.ids())[0], expected[0])
    items = sorted(path.glob("seg-*.items.json"))[0]
    with open(items, "ab") as f:  # an items file never grows: longer is damage
        f.write(b" ")
    problems, _ = EmbeddedIndex.verify(path)
    assert len(problems) == 1 and items.name in problems[0] and "truncated or foreign" in problems[0]


def test_a_shorter_file_is_still_damage(tmp_path):
    path = tmp_path / "ix"
    _build(path, batches=1).close()
    vector_file = next(iter(_vector_sizes(path)))
    os.truncate(path / vector_file, _vector_sizes(path)[vector_file][1] - 1)
    problems, _ = EmbeddedIndex.verify(path)
    assert len(problems) == 1 and "truncated or foreign" in problems[0]
    with pytest.raises(Exception, match="truncated or foreign"):
        open_index(path, read_only=True)


def test_the_merged_manifest_entry_checksums_match_the_files(tmp_path):
    path = tmp_path / "ix"
    with _build(path) as ix:
        ix.merge()
    (entry,) = manifest_module.read(path)["segments"]
    for suffix, crc in entry["crc32"].items():
        assert zlib.crc32((path / f"{entry['name']}.{suffix}").read_bytes()) == crc
    assert json.loads((path / f"{entry['name']}.items.json").read_bytes())["ids"][:2] == ["b0-0", "b0-1"]
