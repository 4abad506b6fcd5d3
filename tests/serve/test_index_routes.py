"""/v1/search, /v1/index/add and /v1/index/delete on the embedded index: results, keys, persistence."""

from __future__ import annotations

import io

import pytest
import torch
from serve_images import data_url, png_bytes

from metaembed.index.ingestion import open_for_model
from metaembed.scoring import maxsim_reference

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["a red bicycle", "a blue car", "quarterly revenue table", "two dogs on a beach"]
IDS = [f"t{i}" for i in range(len(TEXTS))] + ["img"]
METADATA = [{"text": t} for t in TEXTS] + [None]
BF16 = 2e-3  # relative: the CPU's bf16 kernel also rounds the query to bf16 (a sum over 16 vectors moves by ~1e-4)


@pytest.fixture
def indexed(make_client, serve_model, tmp_path):
    """A client on a fresh index holding TEXTS (ids t0..t3) plus one image (id img)."""
    client = make_client(open_for_model(tmp_path / "index", serve_model), api_key=KEY)
    response = client.post(
        "/v1/index/add",
        json={
            "items": [*TEXTS, {"image": data_url(png_bytes())}],
            "ids": IDS,
            "metadata": METADATA,
        },
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    assert response.json()["index_size"] == 5
    return client


def _stored_candidates(serve_model) -> torch.Tensor:
    """What the index holds for TEXTS + the image: their candidate vectors rounded to bf16, the index's dtype."""
    from PIL import Image

    items = [*TEXTS, Image.open(io.BytesIO(png_bytes()))]
    return serve_model.encode_candidates(items).bfloat16().float()


def test_search_returns_exact_maxsim_ranking(indexed, serve_model):
    response = indexed.post("/v1/search", json={"query": "red bicycle", "budget": "4x8", "k": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["budget"] == "4x8" and body["k"] == 3 and len(body["results"]) == 3
    assert set(body["timings"]) == {"encode_ms", "score_ms", "total_ms"}
    assert all(v >= 0 for v in body["timings"].values())
    want = maxsim_reference(serve_model.encode_queries(["red bicycle"]), _stored_candidates(serve_model), "4x8")[0]
    top = want.argsort(descending=True)[:3].tolist()
    assert [hit["id"] for hit in body["results"]] == [IDS[i] for i in top]
    assert [hit["score"] for hit in body["results"]] == pytest.approx([float(want[i]) for i in top], rel=BF16)
    assert [hit["metadata"] for hit in body["results"]] == [METADATA[i] for i in top]


def test_search_defaults_to_full_budget_and_accepts_image_queries(indexed, serve_model):
    from PIL import Image

    body = indexed.post("/v1/search", json={"query": {"image": data_url(png_bytes())}, "k": 2}).json()
    assert body["budget"] == "16x64"
    # the tiny model is random, so the top hit is whatever exact MaxSim says over the stored vectors, not "img"
    query = serve_model.encode_queries([Image.open(io.BytesIO(png_bytes()))])
    want = maxsim_reference(query, _stored_candidates(serve_model))[0]
    top = want.argsort(descending=True)[:2].tolist()
    assert [hit["id"] for hit in body["results"]] == [IDS[i] for i in top]
    assert [hit["score"] for hit in body["results"]] == pytest.approx([float(want[i]) for i in top], rel=BF16)


def test_two_stage_at_full_recall_matches_exact(indexed):
    exact = indexed.post("/v1/search", json={"query": "a blue car", "budget": "8x16", "k": 5}).json()
    cascade = indexed.post("/v1/search", json={"query": "a blue car", "budget": "8x16", "k": 5, "two_stage": True})
    assert cascade.status_code == 200, cascade.text
    assert cascade.json()["two_stage"] is True
    assert [h["id"] for h in cascade.json()["results"]] == [h["id"] for h in exact["results"]]


def test_search_bad_input(indexed):
    cases = [
        ({"query": "x", "budget": "17x64"}, 400, "allowed"),
        ({"query": "x", "budget": "4x65"}, 400, "allowed"),
        ({"query": "x", "budget": 17}, 400, "allowed"),  # the int N is NxN: 17 query vectors do not exist
        ({"query": "x", "k": 0}, 422, "k"),
        ({"query": "x", "k": 100000}, 400, "at most 1000"),
        ({"query": {}}, 400, "neither"),
        ({"query": "x", "extra": 1}, 422, "extra"),
    ]
    for body, status, says in cases:
        response = indexed.post("/v1/search", json=body)
        assert response.status_code == status, (body, response.text)
        assert says in response.json()["error"]["message"], body


def test_writes_need_the_key(indexed):
    body = {"items": ["new"], "ids": ["n1"]}
    missing = indexed.post("/v1/index/add", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "missing API key" in missing.json()["error"]["message"]
    wrong = indexed.post("/v1/index/add", json=body, headers={"Authorization": "Bearer " + "x" * 24})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "wrong API key"
    basic = indexed.post("/v1/index/delete", json={"ids": ["t0"]}, headers={"Authorization": "Basic abc"})
    assert basic.status_code == 401
    assert indexed.get("/health").json()["index_size"] == 5  # nothing changed


def test_writes_are_disabled_without_a_configured_key(make_client, serve_model, tmp_path):
    client = make_client(open_for_model(tmp_path / "index", serve_model))
    for path, body in (("/v1/index/add", {"items": ["x"], "ids": ["x"]}), ("/v1/index/delete", {"ids": ["x"]})):
        response = client.post(path, json=body, headers=AUTH)
        assert response.status_code == 403 and "no API key is configured" in response.json()["error"]["message"]
    assert client.get("/health").json()["index_writes_enabled"] is False


def test_add_errors_leave_the_index_unchanged(indexed):
    cases = [
        ({"items": ["x"], "ids": ["t0"]}, 409, "upsert"),
        ({"items": ["x", "y"], "ids": ["d", "d"]}, 400, "repeat"),
        ({"items": ["x", "y"], "ids": ["only-one"]}, 400, "one id per item"),
        ({"items": ["x"], "ids": ["m"], "metadata": [{}, {}]}, 400, "metadata"),
        ({"items": ["x"], "ids": [""]}, 400, "ids[0]"),
        ({"items": [{"image": "data:image/png;base64,@@"}], "ids": ["bad"]}, 400, "base64"),
        ({"items": [], "ids": []}, 422, "items"),
        ({"items": ["x"], "ids": ["deep"], "metadata": [{"a": _nested(40)}]}, 400, "at most 32"),
        ({"items": ["x"], "ids": ["big"], "metadata": [{"a": "x" * 70_000}]}, 413, "at most 65,536"),
    ]
    for body, status, says in cases:
        response = indexed.post("/v1/index/add", json=body, headers=AUTH)
        assert response.status_code == status, (body, response.text)
        assert says in response.json()["error"]["message"], body
    raw = b'{"items": ["x"], "ids": ["nan"], "metadata": [{"v": NaN}]}'
    response = indexed.post("/v1/index/add", content=raw, headers={**AUTH, "content-type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert indexed.get("/health").json()["index_size"] == 5


def _nested(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def test_metadata_that_was_accepted_comes_back(indexed):
    meta = {"a": _nested(30), "unicode": "naïve ☃", "n": 1.5}
    added = indexed.post("/v1/index/add", json={"items": ["deep"], "ids": ["deep"], "metadata": [meta]}, headers=AUTH)
    assert added.status_code == 200, added.text
    hits = indexed.post("/v1/search", json={"query": "deep", "k": 10}).json()["results"]
    assert {h["id"]: h["metadata"] for h in hits}["deep"] == meta


def test_upsert_replaces_and_delete_removes(indexed):
    response = indexed.post(
        "/v1/index/add",
        json={"items": ["a blue car", "new item"], "ids": ["t0", "t9"], "metadata": [{"v": 2}, None], "upsert": True},
        headers=AUTH,
    )
    assert response.status_code == 200 and response.json()["index_size"] == 6
    hits = indexed.post("/v1/search", json={"query": "a blue car", "k": 6}).json()["results"]
    assert {h["id"]: h["metadata"] for h in hits}["t0"] == {"v": 2}
    unknown = indexed.post("/v1/index/delete", json={"ids": ["t1", "nope"]}, headers=AUTH)
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]
    assert indexed.get("/health").json()["index_size"] == 6  # nothing deleted
    done = indexed.post("/v1/index/delete", json={"ids": ["t1", "t9"]}, headers=AUTH)
    assert done.status_code == 200 and done.json() == {"object": "index.delete", "deleted": 2, "index_size": 4}
    ids = {h["id"] for h in indexed.post("/v1/search", json={"query": "car", "k": 10}).json()["results"]}
    assert ids == {"t0", "t2", "t3", "img"}


def test_index_survives_a_restart(make_client, serve_model, tmp_path):
    path = tmp_path / "index"
    first = make_client(open_for_model(path, serve_model), api_key=KEY)
    first.post("/v1/index/add", json={"items": TEXTS, "ids": ["a", "b", "c", "d"]}, headers=AUTH)
    before = first.post("/v1/search", json={"query": "red bicycle", "budget": "2x4", "k": 4}).json()["results"]
    first.__exit__(None, None, None)  # shuts the app down: worker stopped, index closed (lock released)
    second = make_client(open_for_model(path, serve_model), api_key=KEY)
    after = second.post("/v1/search", json={"query": "red bicycle", "budget": "2x4", "k": 4}).json()["results"]
    assert [h["id"] for h in after] == [h["id"] for h in before] and len(after) == 4
    assert [h["score"] for h in after] == pytest.approx([h["score"] for h in before], abs=1e-6)


def test_no_index_configured(make_client):
    response = make_client().post("/v1/search", json={"query": "x"})
    assert response.status_code == 404 and "--index" in response.json()["error"]["message"]


def test_empty_index_returns_no_results(make_client, serve_model, tmp_path):
    client = make_client(open_for_model(tmp_path / "index", serve_model))
    body = client.post("/v1/search", json={"query": "anything", "k": 5}).json()
    assert body["results"] == []


def test_index_with_other_dimensions_is_refused(serve_model, tmp_path):
    from metaembed.errors import InputError
    from metaembed.index import create_index

    create_index(tmp_path / "index", dim=32, num_vectors=64).close()
    with pytest.raises(InputError, match="dimension 32"):
        open_for_model(tmp_path / "index", serve_model)


def test_search_scores_equal_index_search(indexed, serve_model):
    index = indexed.app.state.index
    query = serve_model.encode_queries(["quarterly revenue"])
    want = index.search(query[:, :8], "8x16", k=5)
    got = indexed.post("/v1/search", json={"query": "quarterly revenue", "budget": "8x16", "k": 5}).json()
    assert [h["id"] for h in got["results"]] == want.ids[0]
    torch.testing.assert_close(torch.tensor([h["score"] for h in got["results"]]), want.scores[0], atol=1e-5, rtol=0)
