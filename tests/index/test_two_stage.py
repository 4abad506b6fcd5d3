from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from metaembed import Budget
from metaembed.errors import InputError
from metaembed.index import create_index
from metaembed.index.layout import stored_values

H = runpy.run_path(str(Path(__file__).with_name("helpers.py")))
embeddings, assert_same_results = H["embeddings"], H["assert_same_results"]
assert_matches_reference = H["assert_matches_reference"]
TOLERANCE = {"fp32": 1e-5, "bf16": 0.02, "int8": 1e-5}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_two_stage_at_full_recall_equals_exhaustive(tmp_path, dtype):
    c, q = embeddings(300, 16, 16, seed=11), embeddings(5, 4, 16, seed=12)
    with create_index(tmp_path / "ix", 16, 16, dtype=dtype) as ix:
        ix.add([f"i{j}" for j in range(200)], c[:200])
        ix.add([f"i{j}" for j in range(200, 300)], c[200:])  # the graph grows incrementally
        ix.delete(["i3", "i250"])
        ids, live = [f"i{j}" for j in range(300)], torch.tensor([j not in (3, 250) for j in range(300)])
        for budget in (Budget(1, 1), Budget(4, 8), Budget(4, 16)):
            exact = ix.search(q, budget, k=10)
            two = ix.search(q, budget, k=10, two_stage=True, candidates=len(ix))
            scored = stored_values(q, dtype), stored_values(c, dtype)  # queries are scored as items are stored
            assert_matches_reference(two, *scored, ids, budget, TOLERANCE[dtype], live)
            assert_same_results(two, exact, TOLERANCE[dtype])
            assert not {"i3", "i250"} & {i for row in two.ids for i in row}


def test_two_stage_recall_on_clustered_data_and_rebuild_after_compact(tmp_path):
    gen = torch.Generator().manual_seed(3)
    centers = torch.randn(20, 16, generator=gen)
    item = centers[torch.randint(0, 20, (500,), generator=gen)] + 0.3 * torch.randn(500, 16, generator=gen)
    c = torch.nn.functional.normalize(item[:, None] + 0.3 * torch.randn(500, 8, 16, generator=gen), dim=-1)
    q = c[:10, :4] + 0.05 * torch.randn(10, 4, 16, generator=gen)
    with create_index(tmp_path / "ix", 16, 8, dtype="fp32") as ix:
        ix.add([str(j) for j in range(500)], c)
        exact = ix.search(q, "4x8", k=10)
        two = ix.search(q, "4x8", k=10, two_stage=True, candidates=100)
        recall = sum(len(set(a) & set(b)) for a, b in zip(exact.ids, two.ids, strict=True)) / 100
        assert recall >= 0.8
        ix.delete([str(j) for j in range(100, 200)])
        ix.compact()
        exact = ix.search(q, "4x8", k=10)
        full = ix.search(q, "4x8", k=10, two_stage=True, candidates=400)
        assert full.ids == exact.ids
        with pytest.raises(InputError, match="candidates"):
            ix.search(q, "4x8", k=10, two_stage=True, candidates=0)


def test_graph_is_saved_by_the_writer_and_loaded_by_readers(tmp_path):
    from metaembed.index import open_index
    from metaembed.index.two_stage import CoarseIndex

    c, q = embeddings(300, 8, 8, seed=16), embeddings(3, 2, 8, seed=17)
    path = tmp_path / "ix"
    with create_index(path, 8, 8, dtype="bf16") as ix:
        ix.add([f"i{j}" for j in range(300)], c)
        first = ix.search(q, "2x8", k=5, two_stage=True, candidates=300)
        assert (path / "ann.json").exists() and len(list(path.glob("ann-*.faiss"))) == 1
        with open_index(path, read_only=True) as reader:
            loaded = CoarseIndex.load(path, reader.segments)
            assert loaded is not None and loaded.index.ntotal == 300
            again = reader.search(q, "2x8", k=5, two_stage=True, candidates=300)
            assert again.ids == first.ids
        ix.add([f"j{j}" for j in range(100)], embeddings(100, 8, 8, seed=18))
        ix.search(q, "2x8", k=5, two_stage=True)  # grew by 33 %: saved again, old graph file removed
        assert len(list(path.glob("ann-*.faiss"))) == 1
        assert CoarseIndex.load(path, ix.segments).index.ntotal == 400
        ix.delete(["i0"])
        ix.compact()
        assert CoarseIndex.load(path, ix.segments) is None  # stale after compaction: rebuilt on next search
        full = ix.search(q, "2x8", k=5, two_stage=True, candidates=399)
        assert_same_results(full, ix.search(q, "2x8", k=5), 0.02)
