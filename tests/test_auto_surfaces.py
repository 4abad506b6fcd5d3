"""``budget="auto"`` gives the same results through the Python API, both CLIs and the HTTP service."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from metaembed import Budget, MetaEmbedModel
from metaembed.auto_budget import AutoBudget
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


def _through_every_surface(index_path, model, tiny_checkpoint, capsys, tmp_path) -> list[dict]:
    """(ids, scores, final budget, bytes read) of QUERY at budget "auto" via each surface."""
    from fastapi.testclient import TestClient

    from metaembed.serve import ServeConfig, create_app

    out = []
    with open_index(index_path, read_only=True) as index:
        queries = model.encode_queries([QUERY])
        api = index.search(queries, "auto", k=4)
        out.append(
            {
                "ids": api.ids[0],
                "scores": api.scores[0].tolist(),
                "budget": api.budgets[0],
                "bytes": api.bytes_read[0],
                "via": "index.search",
            }
        )
        found = search(index, model, QUERY, "auto", k=4)
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
        main(
            ["search", str(index_path), QUERY, "--model", str(tiny_checkpoint), "--budget", "auto", "-k", "4", "--json"]
        )
        == 0
    )
    out.append(_from_body(json.loads(capsys.readouterr().out), "metaembed search"))
    np.save(tmp_path / "q.npy", queries.numpy())
    assert (
        main(
            [
                "index",
                "search",
                str(index_path),
                "--queries",
                str(tmp_path / "q.npy"),
                "--budget",
                "auto",
                "-k",
                "4",
                "--json",
            ]
        )
        == 0
    )
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
    with open_index(index_path, read_only=True) as index:
        app = create_app(model, index, ServeConfig())
        with TestClient(app) as client:
            response = client.post("/v1/search", json={"query": QUERY, "budget": "auto", "k": 4})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["auto"]["ceiling"] == "16x64"
            out.append(_from_body(body, "/v1/search"))
    return out


def _assert_same(results: list[dict]) -> None:
    first = results[0]
    for other in results[1:]:
        assert other["ids"] == first["ids"], (other["via"], other["ids"], first["ids"])
        assert other["budget"] == first["budget"] and other["bytes"] == first["bytes"], other["via"]
        np.testing.assert_allclose(other["scores"], first["scores"], rtol=0, atol=1e-5, err_msg=other["via"])


@pytest.mark.parametrize("where", ["never", "once", "always"])
def test_auto_is_the_same_through_the_api_the_clis_and_the_service(built, tiny_checkpoint, capsys, tmp_path, where):
    index_path, model = built
    with open_index(index_path) as index:
        n = len(index)
        margin = _cheap_margin(index, model.encode_queries([QUERY]), Budget(2, 4))
        threshold = {"never": 0.0, "once": math.nextafter(margin, math.inf), "always": math.inf}[where]
        AutoBudget(threshold, cheap=Budget(2, 4), top_m=n if where == "always" else 3).save(index.path)
    results = _through_every_surface(index_path, model, tiny_checkpoint, capsys, tmp_path)
    _assert_same(results)
    expected = {"never": "2x4", "always": "16x64"}.get(where)
    if expected:
        assert results[0]["budget"] == expected
        with open_index(index_path, read_only=True) as index:
            fixed = index.search(model.encode_queries([QUERY]), expected, k=4)
        assert results[0]["ids"] == fixed.ids[0]
    else:
        assert results[0]["budget"] != "2x4"  # the margin sits just below the threshold: it climbs


def test_the_service_names_the_missing_policy(built, tmp_path):
    from fastapi.testclient import TestClient

    from metaembed.index import create_index
    from metaembed.serve import ServeConfig, create_app

    _, model = built
    empty = create_index(tmp_path / "empty", model.embedding_dim, model.num_vectors("candidate"), dtype="fp32")
    with TestClient(create_app(model, empty, ServeConfig())) as client:
        response = client.post("/v1/search", json={"query": QUERY, "budget": "auto"})
    assert response.status_code == 400 and "plan calibrate" in response.json()["error"]["message"]
