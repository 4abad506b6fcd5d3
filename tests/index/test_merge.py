"""The merge policy: tiered merges (a base-T counter of segment sizes), the disk headroom check, explicit merges."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from metaembed.errors import InputError
from metaembed.index import IndexStorageError, create_index, open_index
from metaembed.index import merge as merge_module
from metaembed.index.merge import MergePolicy
from metaembed.index.segment import Segment

H = runpy.run_path(str(Path(__file__).with_name("helpers.py")))
embeddings, digest, assert_matches_reference = H["embeddings"], H["digest"], H["assert_matches_reference"]


def fake(name: str, count: int, dead: int = 0) -> Segment:
    live = torch.ones(count, dtype=torch.bool)
    live[:dead] = False
    return Segment(name, count, [], [], [], [], live)


def test_tiers_and_picks():
    policy = MergePolicy(ratio=3, max_merged_bytes=100)
    assert [policy.tier(n) for n in (1, 2, 3, 8, 9, 27)] == [0, 0, 1, 1, 2, 3]
    assert policy.pick([fake("a", 1), fake("b", 2)], 1) is None
    assert policy.pick([fake("big", 9), fake("a", 1), fake("b", 2), fake("c", 1)], 1) == ["a", "b", "c"]
    assert policy.pick([fake("a", 5), fake("b", 4), fake("c", 6), fake("d", 1, dead=1)], 1) == ["d"]
    # three tier-3 segments would make a 81-row segment: over a 60-byte cap, they never merge
    assert MergePolicy(ratio=3, max_merged_bytes=60).pick([fake(n, 27) for n in "abc"], 1) is None
    assert MergePolicy(ratio=3, max_merged_bytes=60).pick([fake(n, 27) for n in "abc"], 2) is None
    for bad in ({"ratio": 1}, {"ratio": True}, {"max_merged_bytes": 0}):
        with pytest.raises(InputError, match="MergePolicy"):
            MergePolicy(**bad)


def test_single_adds_merge_like_a_base_ratio_counter_and_search_is_unchanged(tmp_path):
    c, q = embeddings(27, 8, 4, seed=1), embeddings(2, 2, 4, seed=2)
    with create_index(tmp_path / "ix", 4, 8, dtype="fp32", merge_policy=MergePolicy(ratio=3)) as ix:
        for j in range(26):
            ix.add([f"i{j}"], c[j : j + 1])
        assert [s.count for s in ix.segments] == [9, 9, 3, 3, 1, 1]  # 26 = 222 in base 3
        ids = [f"i{j}" for j in range(27)]
        assert_matches_reference(ix.search(q, "2x8", k=26), q, c[:26], ids[:26], "2x8", 1e-5)
        ix.add(["i26"], c[26:])
        assert [s.count for s in ix.segments] == [27] and sorted(ix.ids()) == sorted(ids)
        assert_matches_reference(ix.search(q, "2x8", k=27), q, c, ids, "2x8", 1e-5)


def test_mostly_dead_segments_are_rewritten_alone(tmp_path):
    with create_index(tmp_path / "ix", 4, 8, dtype="bf16") as ix:
        ix.add([f"a{j}" for j in range(10)], embeddings(10, 8, 4, seed=3))
        ix.add([f"b{j}" for j in range(10)], embeddings(10, 8, 4, seed=4))
        first, second = (s.name for s in ix.segments)
        ix.delete([f"a{j}" for j in range(6)])  # 6 of 10 dead: that segment alone is rewritten
        assert [s.count for s in ix.segments] == [10, 4] and ix.segments[0].name == second
        assert first not in {s.name for s in ix.segments} and ix.stats()["deleted_rows"] == 0


def test_a_merge_without_room_on_the_disk_writes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "ix"
    with create_index(path, 4, 8, dtype="int8") as ix:
        for j in range(3):
            ix.add([f"i{j}"], embeddings(1, 8, 4, seed=j))
        before = digest(path)
        monkeypatch.setattr(merge_module, "free_bytes", lambda root: 10 * 2**20)  # less than the headroom
        with pytest.raises(IndexStorageError, match="nothing was written") as raised:
            ix.compact()
        assert raised.value.errno == 28 and digest(path) == before and len(ix.segments) == 3
        monkeypatch.undo()
        ix.compact()
        assert len(ix.segments) == 1 and len(ix) == 3


def test_merges_off_the_write_path_run_when_the_writer_asks(tmp_path):
    path = tmp_path / "ix"
    policy = MergePolicy(ratio=2, on_write=False)
    with create_index(path, 4, 8, dtype="bf16", merge_policy=policy) as ix:
        for j in range(8):
            ix.add([f"i{j}"], embeddings(1, 8, 4, seed=j))
        assert len(ix.segments) == 8  # no add merged
        assert ix.merge() == 7 and [s.count for s in ix.segments] == [8]
        assert ix.merge() == 0
    with open_index(path, read_only=True) as reader:
        assert sorted(reader.ids()) == sorted(f"i{j}" for j in range(8))
        with pytest.raises(Exception, match="read_only"):
            reader.merge()
