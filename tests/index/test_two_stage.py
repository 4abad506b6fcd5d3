from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from metaembed import Budget
from metaembed.errors import InputError
from metaembed.index import create_index

H = runpy.run_path(str(Path(__file__).with_name("helpers.py")))
embeddings, assert_same_results = H["embeddings"], H["assert_same_results"]
TOLERANCE = {"fp32": 1e-5, "bf16": 0.02, "int8": 1e-5}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_two_stage_at_full_recall_equals_exhaustive(tmp_path, dtype):
    c, q = embeddings(300, 16, 16, seed=11), embeddings(5, 4, 16, seed=12)
    with create_index(tmp_path / "ix", 16, 16, dtype=dtype) as ix:
        ix.add([f"i{j}" for j in range(200)], c[:200])
        ix.add([f"i{j}" for j in range(200, 300)], c[200:])  # the graph grows incrementally
        ix.delete(["i3", "i250"])
        for budget in (Budget(1, 1), Budget(4, 8), Budget(4, 16)):
            exact = ix.search(q, budget, k=10)
            two = ix.search(q, budget, k=10, two_stage=True, candidates=len(ix))
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
