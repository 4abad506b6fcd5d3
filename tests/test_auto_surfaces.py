"""``budget="auto"`` gives the same results through the Python API, both CLIs and the HTTP service."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaembed import Budget, MetaEmbedModel
from metaembed.auto_budget import POLICY_FILE, AutoBudget
from metaembed.cli import main
from metaembed.index import open_index
from metaembed.index.ingestion import ingest
from metaembed.search import search

QUERY = "a red square"


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("auto")
    items = root / "items"
    items.mkdir()
    for colour in ("red", "green", "blue", "yellow", "purple", "orange"):
        Image.new("RGB", (32, 32), colour).save(items / f"{colour}.png")
        (items / f"{colour}.txt").write_text(f"a {colour} square")
    for i, text in enumerate(["quarterly revenue table", "a red bicycle", "minutes of the board", "red alert"]):
        (items / f"note{i}.md").write_text(text)
    model = MetaEmbedModel.from_pretrained(tiny_checkpoint).eval()
    ingest(root / "ix", model, items, dtype="fp32", progress=False)
    return root / "ix", model


def _cheap_margin(index, queries: torch.Tensor, cheap: Budget) -> float:
    top = index.search(queries, cheap, k=2).scores[0]
    return float(top[0] - top[1]) / cheap.r_q


def _from_body(body: dict, via: str) -> dict:
    """The comparable part of a search answer in JSON (`metaembed search --json` and /v1/search share it)."""
    hits = body["results"]
    return {"ids": [h["id"] for h in hits], "scores": [h["score"] for h in hits], "budget": body["budget"],
            "bytes": body["index_bytes_read"], "via": via}  # fmt: skip


def _serve(index_path, checkpoint):
    """The app `metaembed serve --model CHECKPOINT --index INDEX --read-only` builds (its policy lookup included)."""
    from metaembed.cli import build_parser
    from metaembed.serve.cli import build

    args = build_parser().parse_args(["serve", "--model", str(checkpoint), "--index", str(index_path), "--read-only"])
    return build(args)


def _through_every_surface(index_path, model, checkpoint, capsys, tmp_path) -> list[dict]:
    """(ids, scores, final budget, bytes read) of QUERY at budget "auto" via each surface.

    The policy is the one beside the index, else the model folder's; `metaembed index search` knows no model, so
    it runs only when the index has its own policy."""
    from fastapi.testclient import TestClient

    beside_index = AutoBudget.locate(index_path) is not None
    out = []
    with open_index(index_path, read_only=True) as index:
        queries = model.encode_queries([QUERY])
        api = index.search(queries, "auto" if beside_index else AutoBudget.load(checkpoint), k=4)
        out.append(
            {
                "ids": api.ids[0],
                "scores": api.scores[0].tolist(),
                "budget": api.budgets[0],
                "bytes": api.bytes_read[0],
                "via": "index.search",
            }
        )
        found = search(index, model, QUERY, "auto", k=4, model_dir=checkpoint)
        out.append(
            {
                "ids": [h.id for h in found.results],
                "scores": [h.score for h in found.results],
                "budget": found.budget,
                "bytes": found.index_bytes_read,
                "via": "search()",
            }
        )
    assert (
        main(["search", str(index_path), QUERY, "--model", str(checkpoint), "--budget", "auto", "-k", "4", "--json"])
        == 0
    )
    out.append(_from_body(json.loads(capsys.readouterr().out), "metaembed search"))
    if beside_index:
        np.save(tmp_path / "q.npy", queries.numpy())
        command = ["index", "search", str(index_path), "--queries", str(tmp_path / "q.npy"), "--budget", "auto"]
        assert main([*command, "-k", "4", "--json"]) == 0
        row = json.loads(capsys.readouterr().out)[0]
        out.append(
            {
                "ids": row["ids"],
                "scores": row["scores"],
                "budget": row["budget"],
                "bytes": row["bytes_read"],
                "via": "metaembed index search",
            }
        )
    with TestClient(_serve(index_path, checkpoint)) as client:
        response = client.post("/v1/search", json={"query": QUERY, "budget": "auto", "k": 4})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["auto"]["ceiling"] == "16x64" and body["auto"]["escalations"] == api.escalations[0]
        assert client.get("/v1/budgets").json()["auto"]["steps"] == ["2x4", "4x8", "8x16", "16x64"]
        out.append(_from_body(body, "/v1/search"))
    return out


def _assert_same(results: list[dict]) -> None:
    first = results[0]
    for other in results[1:]:
        assert other["ids"] == first["ids"], (other["via"], other["ids"], first["ids"])
        assert other["budget"] == first["budget"] and other["bytes"] == first["bytes"], other["via"]
        np.testing.assert_allclose(other["scores"], first["scores"], rtol=0, atol=1e-5, err_msg=other["via"])


@pytest.fixture
def own_checkpoint(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint this test may store a policy in (the session's stays without one)."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))


@pytest.mark.parametrize("stored", ["index", "model"])
@pytest.mark.parametrize("where", ["never", "once", "always"])
def test_auto_is_the_same_through_the_api_the_clis_and_the_service(
    built, own_checkpoint, capsys, tmp_path, where, stored
):
    index_path, model = built
    (index_path / POLICY_FILE).unlink(missing_ok=True)
    with open_index(index_path) as index:
        n = len(index)
        margin = _cheap_margin(index, model.encode_queries([QUERY]), Budget(2, 4))
    threshold = {"never": 0.0, "once": math.nextafter(margin, math.inf), "always": math.inf}[where]
    AutoBudget(threshold, cheap=Budget(2, 4), top_m=n if where == "always" else 3).save(
        index_path if stored == "index" else own_checkpoint
    )
    results = _through_every_surface(index_path, model, own_checkpoint, capsys, tmp_path)
    assert len(results) == (5 if stored == "index" else 4)
    _assert_same(results)
    expected = {"never": "2x4", "always": "16x64"}.get(where)
    if expected:
        assert results[0]["budget"] == expected
        with open_index(index_path, read_only=True) as index:
            fixed = index.search(model.encode_queries([QUERY]), expected, k=4)
        assert results[0]["ids"] == fixed.ids[0]
    else:
        assert results[0]["budget"] != "2x4"  # the margin sits just below the threshold: it climbs


def test_the_service_prefers_the_index_policy_and_reads_a_new_one(built, own_checkpoint):
    from fastapi.testclient import TestClient

    index_path, _ = built
    (index_path / POLICY_FILE).unlink(missing_ok=True)
    AutoBudget(0.0, cheap=Budget(2, 4)).save(own_checkpoint)  # never escalates
    ask = {"query": QUERY, "budget": "auto", "k": 4}
    with TestClient(_serve(index_path, own_checkpoint)) as client:
        assert client.post("/v1/search", json=ask).json()["budget"] == "2x4"
        AutoBudget(math.inf, cheap=Budget(4, 8), top_m=100).save(index_path)  # beside the index: it wins
        body = client.post("/v1/search", json=ask).json()
        assert body["budget"] == "16x64" and body["auto"]["cheap"] == "4x8" and body["auto"]["escalations"] == 2
        assert client.get("/v1/budgets").json()["auto"]["cheap"] == "4x8"
    (index_path / POLICY_FILE).unlink()


def test_the_service_names_the_missing_policy(built, tmp_path):
    from fastapi.testclient import TestClient

    from metaembed.index import create_index
    from metaembed.serve import ServeConfig, create_app

    _, model = built
    empty = create_index(tmp_path / "empty", model.embedding_dim, model.num_vectors("candidate"), dtype="fp32")
    app = create_app(model, empty, ServeConfig(), model_dir=tmp_path / "model-without-policy")
    with TestClient(app) as client:
        response = client.post("/v1/search", json={"query": QUERY, "budget": "auto"})
        assert client.get("/v1/budgets").json()["auto"] is None  # the page offers no auto
    error = response.json()["error"]
    assert response.status_code == 400 and "plan calibrate" in error["message"] and error["param"] == "budget"
    assert str(tmp_path) not in response.text


def test_a_broken_policy_is_the_servers_fault_and_names_no_path(built, tmp_path, caplog):
    from fastapi.testclient import TestClient

    from metaembed.index import create_index
    from metaembed.serve import ServeConfig, create_app

    _, model = built
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / POLICY_FILE).write_text('{"format": "metaembed-auto-budget", "threshold": 0.1}')
    empty = create_index(tmp_path / "empty", model.embedding_dim, model.num_vectors("candidate"), dtype="fp32")
    with TestClient(create_app(model, empty, ServeConfig(), model_dir=model_dir)) as client:
        response = client.post("/v1/search", json={"query": QUERY, "budget": "auto"})
    assert response.status_code == 503 and response.json()["error"]["type"] == "policy_unavailable"
    assert str(tmp_path) not in response.text and str(model_dir / POLICY_FILE) in caplog.text
