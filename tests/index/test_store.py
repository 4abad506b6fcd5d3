from __future__ import annotations

import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from metaembed import Budget
from metaembed.index import IndexLockedError, ReadOnlyIndexError, SearchResults, create_index, open_index
from metaembed.index.base import Index
from metaembed.index.layout import quantize_int8, stored_values
from metaembed.index.segment import Segment
from metaembed.scoring import maxsim_reference

embeddings = runpy.run_path(str(Path(__file__).with_name("helpers.py")))["embeddings"]

# bf16 GEMM outputs carry bf16 rounding (~2⁻⁹ relative on each dot product); int8 is exact for the quantised query
# against the dequantised codes.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.05, "int8": 1e-4}


def dequantised(c: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "fp32":
        return c.double()
    if dtype == "bf16":
        return c.bfloat16().double()
    codes, scale = quantize_int8(c)
    return codes.double() * scale[..., None].double()


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_search_equals_float64_reference_at_every_budget(tmp_path, dtype):
    c = embeddings(120, seed=1)
    q = embeddings(4, 16, seed=2)
    ids = [f"doc-{i}" for i in range(120)]
    with create_index(tmp_path / "ix", dim=16, num_vectors=64, dtype=dtype) as ix:
        assert isinstance(ix, Index)
        ix.add(ids[:70], c[:70], [{"i": i} for i in range(70)])
        ix.add(ids[70:], c[70:])  # two segments
        ref_c = dequantised(c, dtype)
        for budget in [*Budget.LADDER, Budget(3, 5)]:
            res = ix.search(q, budget, k=7)
            assert isinstance(res, SearchResults)
            assert res.scores.dtype == torch.float32 and res.scores.shape == (4, 7)
            ref = maxsim_reference(stored_values(q, dtype), ref_c, budget)  # queries scored as items are stored
            top = ref.topk(7, dim=1)
            torch.testing.assert_close(res.scores.double(), top.values, rtol=0, atol=TOLERANCE[dtype])
            # returned ids carry exactly their reference scores
            got = torch.tensor([[ref[i, int(x.split("-")[1])] for x in row] for i, row in enumerate(res.ids)])
            torch.testing.assert_close(res.scores.double(), got.double(), rtol=0, atol=TOLERANCE[dtype])
            if dtype != "bf16":
                assert res.ids == [[ids[j] for j in row] for row in top.indices.tolist()]
        assert res.metadata[0][0] == ({"i": int(res.ids[0][0][4:])} if int(res.ids[0][0][4:]) < 70 else {})


def test_int8_roundtrip_and_get(tmp_path):
    c = embeddings(10, seed=3)
    with create_index(tmp_path / "ix", 16, 64, dtype="int8") as ix:
        ix.add([str(i) for i in range(10)], c)
        got, meta = ix.get(["3", "7"])
    codes, scale = quantize_int8(c)
    torch.testing.assert_close(got, (codes.float() * scale[..., None])[[3, 7]])
    assert (got - c[[3, 7]]).abs().max() < 0.5 / 127 + 1e-6
    assert meta == [{}, {}]


def test_upsert_delete_compact_and_reopen(tmp_path):
    c = embeddings(30, seed=4)
    path = tmp_path / "ix"
    with create_index(path, 16, 64, dtype="fp32") as ix:
        ix.add([f"a{i}" for i in range(20)], c[:20])
        ix.upsert(["a0", "new"], c[20:22], [{"v": 2}, {"v": 3}])
        ix.delete(["a5", "a6"])
        assert len(ix) == 19 and "a5" not in ix and "new" in ix
        got, meta = ix.get(["a0"])
        torch.testing.assert_close(got[0], c[20])
        assert meta == [{"v": 2}]
        before = ix.search(c[:3, :16], "4x8", k=5)
        assert ix.stats()["deleted_rows"] == 3
        ix.compact()
        assert ix.stats()["segments"] == 1 and ix.stats()["deleted_rows"] == 0
        after = ix.search(c[:3, :16], "4x8", k=5)
        assert before.ids == after.ids
        torch.testing.assert_close(before.scores, after.scores)
    with open_index(path) as ix:
        assert len(ix) == 19
        assert ix.search(c[:3, :16], "4x8", k=5).ids == before.ids
        assert sorted(p.name for p in path.iterdir() if p.name.startswith("seg-")).__len__() == 6  # one segment


def test_budget_reads_only_its_groups(tmp_path):
    with create_index(tmp_path / "ix", 8, 64, dtype="bf16") as ix:
        ix.add(["x", "y"], embeddings(2, d=8))
        groups, _ = ix.segments[0].read(Budget(1, 4), slice(None))
        assert [g.shape[1] for g in groups] == [1, 3]
        stats = ix.stats()
    assert stats["bytes_per_budget"] == {"1x1": 32, "2x4": 128, "4x8": 256, "8x16": 512, "16x64": 2048}
    assert stats["count"] == 2 and stats["dtype"] == "bf16"


def test_group_bounds_for_other_widths(tmp_path):
    with create_index(tmp_path / "ix", 4, 20, dtype="fp32") as ix:
        assert ix.bounds == [0, 1, 4, 8, 16, 20]
        c = embeddings(5, 20, 4)
        ix.add(list("abcde"), c)
        q = embeddings(2, 3, 4, seed=9)
        res = ix.search(q, "3x20", k=5)
        torch.testing.assert_close(res.scores.double(), maxsim_reference(q, c, "3x20").sort(1, True).values)


def test_empty_index_and_k_larger_than_count(tmp_path):
    with create_index(tmp_path / "ix", 4, 8, dtype="fp32") as ix:
        res = ix.search(embeddings(2, 2, 4), "1x1", k=5)
        assert res.ids == [[], []] and res.scores.shape == (2, 0)
        ix.add(["a", "b"], embeddings(2, 8, 4))
        assert ix.search(embeddings(2, 2, 4), "1x1", k=5).scores.shape == (2, 2)


def test_single_writer_lock_and_read_only(tmp_path):
    path = tmp_path / "ix"
    ix = create_index(path, 4, 8, dtype="fp32")
    with pytest.raises(IndexLockedError, match="read_only"):
        open_index(path)
    reader = open_index(path, read_only=True)
    with pytest.raises(ReadOnlyIndexError):
        reader.add(["a"], embeddings(1, 8, 4))
    ix.add(["a"], embeddings(1, 8, 4))
    assert len(reader) == 1  # refreshed on read
    ix.close()
    open_index(path).close()  # the lock is released on close
    reader.close()


READER = textwrap.dedent(
    """
    import runpy, sys, torch
    from metaembed.index import open_index
    from metaembed.scoring import maxsim_reference
    H = runpy.run_path(sys.argv[2])
    ids = [f"i{b}-{j}" for b in range(20) for j in range(10)]
    stored = torch.cat([H["embeddings"](10, 16, 8, seed=b) for b in range(20)]).bfloat16().double()
    q = H["embeddings"](2, 4, 8, seed=99)
    ix = open_index(sys.argv[1], read_only=True)
    seen = set()
    while True:
        res = ix.search(q, "4x16", k=3)
        now = ix.ids()                                  # a snapshot at least as new as the search's
        n = len(now)
        assert now == ids[:n] and n % 10 == 0, now      # whole batches, in commit order, nothing else
        # the search saw one whole-batch prefix of the items: its hits and scores are that prefix's exact top 3
        ref = maxsim_reference(q, stored, "4x16")
        fits = [
            m for m in range(10, n + 1, 10)
            if all(i in ids[:m] for row in res.ids for i in row)
            and torch.allclose(res.scores.double(), ref[:, :m].topk(3, dim=1).values, atol=0.05)
        ]
        assert fits, (res.ids, n)
        got, _ = ix.get([i for row in res.ids for i in row])  # every hit is fully readable
        assert torch.isfinite(got).all()
        seen.add(n)
        if n == 200:
            break
    print(len(seen), max(seen))
    """
)


def test_reader_process_sees_consistent_snapshots_while_writer_appends(tmp_path):
    path = tmp_path / "ix"
    ix = create_index(path, 8, 16, dtype="bf16")
    ix.add([f"i0-{j}" for j in range(10)], embeddings(10, 16, 8, seed=0))
    helpers = str(Path(__file__).with_name("helpers.py"))
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path), helpers], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for batch in range(1, 20):
        ix.add([f"i{batch}-{j}" for j in range(10)], embeddings(10, 16, 8, seed=batch))
    out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, err
    snapshots, last = map(int, out.split())
    assert last == 200 and 1 <= snapshots <= 20
    ix.close()


def test_many_small_adds_merge_small_segments(tmp_path):
    c = embeddings(80, 8, 4, seed=13)
    with create_index(tmp_path / "ix", 4, 8, dtype="int8") as ix:
        ix.add([f"big{j}" for j in range(40)], c[:40])
        for j in range(40):
            ix.add([f"s{j}"], c[40 + j : 41 + j])
        assert len(ix) == 80 and ix.stats()["segments"] <= 33
        names = [s.name for s in ix.segments]
        assert names[0] == ix.segments[0].name and ix.segments[0].count == 40  # the big segment was not rewritten
        ix.compact(names[1:3])
        got, _ = ix.get([f"s{j}" for j in range(40)])
        codes, scale = quantize_int8(c[40:])
        torch.testing.assert_close(got, codes.float() * scale[..., None])
        ix.compact()
        assert ix.stats()["segments"] == 1 and len(ix) == 80


def test_threads_search_while_one_thread_writes(tmp_path):
    """Searches share one ANN graph: one may extend it past another's snapshot (a race CI once caught)."""
    import threading

    c = embeddings(1000, 8, 4, seed=14)
    q = embeddings(2, 2, 4, seed=15)
    errors: list[BaseException] = []
    with create_index(tmp_path / "ix", 4, 8, dtype="fp32") as ix:
        ix.add([f"i{j}" for j in range(10)], c[:10])
        done = threading.Event()

        def searcher():
            try:
                while not done.is_set():
                    for two_stage in (False, True):
                        res = ix.search(q, "2x8", k=5, two_stage=two_stage)
                        for i, (row, scores) in enumerate(zip(res.ids, res.scores, strict=True)):
                            idx = [int(x[1:]) for x in row]
                            want = maxsim_reference(q[i : i + 1], c[idx], "2x8")[0]
                            torch.testing.assert_close(scores.double(), want, rtol=0, atol=1e-4)  # ids match scores
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=searcher) for _ in range(4)]
        for t in threads:
            t.start()
        for lo in range(10, 1000, 10):
            ix.add([f"i{j}" for j in range(lo, lo + 10)], c[lo : lo + 10])
            if lo % 50 == 0:
                ix.delete([f"i{lo - 5}"])
        done.set()
        for t in threads:
            t.join()
    assert not errors, errors


def test_a_search_holding_the_old_snapshot_sees_the_old_state_while_a_delete_commits(tmp_path, monkeypatch):
    """A delete swaps in a new snapshot; a search already scanning the old one must finish on the old masks."""
    import threading

    c = embeddings(10, 8, 4, seed=21)
    with create_index(tmp_path / "ix", 4, 8, dtype="fp32") as ix:
        ix.add([f"a{i}" for i in range(5)], c[:5])
        ix.add([f"b{i}" for i in range(5)], c[5:])  # a second segment, scanned after the first
        before = ix.search(c[:2, :2], "2x8", k=10)
        first_segment, scanning, deleted = ix.segments[0], threading.Event(), threading.Event()
        score = Segment.score

        def paused(segment, queries, budget, rows):
            if segment.name == first_segment.name and not scanning.is_set():
                scanning.set()  # the search has its snapshot and is part-way through it
                assert deleted.wait(30)
            return score(segment, queries, budget, rows)

        monkeypatch.setattr(Segment, "score", paused)
        found = []
        search = threading.Thread(target=lambda: found.append(ix.search(c[:2, :2], "2x8", k=10)))
        search.start()
        assert scanning.wait(30)
        ix.delete(["b0", "a1"])
        deleted.set()
        search.join(30)
        assert found and found[0].ids == before.ids and "b0" in found[0].ids[0]
        torch.testing.assert_close(found[0].scores, before.scores)
        after = ix.search(c[:2, :2], "2x8", k=10)
        assert all("b0" not in row and "a1" not in row and len(row) == 8 for row in after.ids)
