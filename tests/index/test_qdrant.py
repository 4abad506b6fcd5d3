"""The Qdrant backend (local mode) against the embedded store on the same data; a server test when QDRANT_URL is set."""

from __future__ import annotations

import os
import runpy
import uuid
from pathlib import Path

import pytest
import torch

from metaembed import Budget
from metaembed.errors import BudgetError, InputError
from metaembed.index import DuplicateIdError, UnknownIdError, create_index, open_index
from metaembed.index.layout import stored_values
from metaembed.scoring import maxsim_reference

pytest.importorskip("qdrant_client")
H = runpy.run_path(str(Path(__file__).with_name("helpers.py")))
embeddings, assert_matches_reference = H["embeddings"], H["assert_matches_reference"]
TOLERANCE = {"fp32": 1e-4, "bf16": 0.03, "int8": 1e-4}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_qdrant_local_equals_embedded_and_two_stage(tmp_path, dtype):
    c, q = embeddings(60, 16, 8, seed=21), embeddings(3, 4, 8, seed=22)
    ids = [f"doc/{i}" for i in range(60)]
    meta = [{"i": i} for i in range(60)]
    with (
        create_index(tmp_path / "emb", 8, 16, dtype=dtype) as emb,
        create_index(tmp_path / "qd", 8, 16, dtype=dtype, backend="qdrant") as qd,
    ):
        for ix in (emb, qd):
            ix.add(ids[:40], c[:40], meta[:40])
            ix.add(ids[40:], c[40:], meta[40:])
            ix.delete(["doc/7"])
            ix.upsert(["doc/8"], c[9:10], [{"i": 9}])
        assert len(qd) == len(emb) == 59
        current = c.clone()
        current[8] = c[9]
        stored, live = stored_values(current, dtype), torch.tensor([i != 7 for i in range(60)])
        for budget in (Budget(1, 1), Budget(2, 4), Budget(4, 8), Budget(4, 16)):
            for ix, two_stage in ((emb, False), (qd, False), (emb, True), (qd, True)):
                res = ix.search(q, budget, k=5, two_stage=two_stage, candidates=59 if two_stage else None)
                assert_matches_reference(res, stored_values(q, dtype), stored, ids, budget, TOLERANCE[dtype], live)
        res = qd.search(q, "4x8", k=3)
        assert res.metadata[0][0] == {"i": int(res.ids[0][0].split("/")[1]) + (1 if res.ids[0][0] == "doc/8" else 0)}
        got_q, _ = qd.get(["doc/3"])
        got_e, _ = emb.get(["doc/3"])
        torch.testing.assert_close(got_q, got_e)
        assert qd.stats()["count"] == 59


def test_qdrant_errors_and_reopen(tmp_path):
    path = tmp_path / "qd"
    with create_index(path, 8, 16, dtype="fp32", backend="qdrant") as qd:
        qd.add(["a", "b"], embeddings(2, 16, 8))
        with pytest.raises(DuplicateIdError):
            qd.add(["a"], embeddings(1, 16, 8))
        with pytest.raises(UnknownIdError, match="nothing was deleted"):
            qd.delete(["a", "zz"])
        with pytest.raises(BudgetError, match="r_c must be one of"):
            qd.search(embeddings(1, 4, 8), "2x5")
        with pytest.raises(BudgetError):
            qd.search(embeddings(1, 4, 8), "2x32")
        with pytest.raises(InputError, match="UTF-8"):
            qd.add(["\ud800"], embeddings(1, 16, 8))
        assert len(qd) == 2
    with open_index(path) as qd:  # backend detected from the directory
        assert qd.backend == "qdrant" and len(qd) == 2 and "a" in qd


@pytest.mark.skipif(not os.environ.get("QDRANT_URL"), reason="set QDRANT_URL to test against a Qdrant server")
def test_qdrant_server_roundtrip():
    collection = f"metaembed-test-{uuid.uuid4().hex[:8]}"
    url = os.environ["QDRANT_URL"]
    c, q = embeddings(30, 16, 8, seed=31), embeddings(2, 4, 8, seed=32)
    qd = create_index(None, 8, 16, dtype="fp32", backend="qdrant", url=url, collection=collection)
    try:
        qd.add([str(i) for i in range(30)], c)
        reopened = open_index(None, url=url, collection=collection)
        res = reopened.search(q, "4x16", k=5)
        ref = maxsim_reference(q, c, "4x16").topk(5, dim=1)
        assert res.ids == [[str(j) for j in row] for row in ref.indices.tolist()]
        reopened.close()
    finally:
        qd.client.delete_collection(collection)
        qd.close()
