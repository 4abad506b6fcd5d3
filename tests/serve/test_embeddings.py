"""/v1/embeddings: the OpenAI envelope, budgets, base64 output, and every kind of bad input → 4xx JSON."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image
from serve_images import data_url, png_bytes


def test_float_output_is_r_by_d_and_matches_the_model(make_client, serve_model):
    client = make_client()
    response = client.post(
        "/v1/embeddings", json={"input": ["a red bicycle", "blue sky"], "input_type": "query", "budget": "4x8"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "metaembed" and body["num_vectors"] == 4
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]
    got = torch.tensor([d["embedding"] for d in body["data"]])
    want = serve_model.encode_queries(["a red bicycle", "blue sky"], budget="4x8")
    assert got.shape == (2, 4, serve_model.embedding_dim) and body["data"][0]["shape"] == [4, 64]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_documents_default_to_all_candidate_vectors_and_int_budget_counts_vectors(make_client):
    client = make_client()
    full = client.post("/v1/embeddings", json={"input": "page one"}).json()
    assert full["input_type"] == "document" and full["data"][0]["shape"] == [64, 64]
    three = client.post("/v1/embeddings", json={"input": "page one", "budget": 3}).json()
    assert three["data"][0]["shape"] == [3, 64]
    np.testing.assert_allclose(three["data"][0]["embedding"], full["data"][0]["embedding"][:3], atol=1e-6)


def test_base64_is_little_endian_float32_flattened_with_the_shape_beside_it(make_client, serve_model):
    client = make_client()
    body = client.post(
        "/v1/embeddings", json={"input": ["hello"], "input_type": "query", "encoding_format": "base64"}
    ).json()
    item = body["data"][0]
    assert item["dtype"] == "float32" and item["shape"] == [16, 64]
    flat = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    want = serve_model.encode_queries(["hello"])[0].numpy()
    assert flat.shape == (16 * 64,)
    np.testing.assert_allclose(flat.reshape(item["shape"]), want, atol=1e-6)


def test_base64_float16_only_when_asked_for_by_name(make_client, serve_model):
    client = make_client()
    body = client.post(
        "/v1/embeddings", json={"input": ["hello"], "input_type": "query", "encoding_format": "base64_float16"}
    ).json()
    item = body["data"][0]
    assert item["dtype"] == "float16" and item["shape"] == [16, 64]
    decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f2").reshape(item["shape"])
    want = serve_model.encode_queries(["hello"])[0].numpy()
    np.testing.assert_allclose(decoded.astype(np.float32), want, atol=2e-3)


def test_image_data_url_and_text_plus_image(make_client, serve_model):
    client = make_client()
    url = data_url(png_bytes(40, 32))
    body = client.post("/v1/embeddings", json={"input": [{"image": url}, {"text": "red", "image": url}]}).json()
    got = torch.tensor([d["embedding"] for d in body["data"]])
    image = Image.open(io.BytesIO(png_bytes(40, 32))).convert("RGB")
    want = serve_model.encode_candidates([image, {"text": "red", "image": image}])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_image_path_under_image_dir(make_client, tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "sub" / "red.png").write_bytes(png_bytes())
    client = make_client(image_dir=tmp_path / "imgs")
    by_path = client.post("/v1/embeddings", json={"input": [{"image": "sub/red.png"}]}).json()
    by_url = client.post("/v1/embeddings", json={"input": [{"image": data_url(png_bytes())}]}).json()
    np.testing.assert_allclose(by_path["data"][0]["embedding"], by_url["data"][0]["embedding"], atol=1e-6)


def test_paths_that_leave_the_image_dir_are_refused(make_client, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(png_bytes())
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(tmp_path, root / "up")
    client = make_client(image_dir=root)
    for path in ("../secret.png", str(tmp_path / "secret.png"), "link.png", "up/secret.png", "sub/../../secret.png"):
        response = client.post("/v1/embeddings", json={"input": [{"image": path}]})
        assert response.status_code == 400, (path, response.text)
        assert "image director" in response.json()["error"]["message"], path
    missing = client.post("/v1/embeddings", json={"input": [{"image": "nope.png"}]})
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]["message"]


def test_paths_are_disabled_without_image_dir(make_client):
    response = make_client().post("/v1/embeddings", json={"input": [{"image": "cat.png"}]})
    assert response.status_code == 400 and "--image-dir" in response.json()["error"]["message"]


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")  # 81 Mpx in ~10 kB
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("image", "status", "says"),
    [
        ("data:image/png;base64,!!!not-base64!!!", 400, "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"just some text").decode(), 400, "not an image"),
        ("data:text/plain;base64,aGVsbG8=", 400, "expected image/*"),
        ("data:image/png,rawbytes", 400, "base64 data URL"),
        ("data:image/png;base64,", 400, "empty"),
        (data_url(png_bytes()[:60]), 400, "truncated or corrupt"),
        (data_url(_bomb_png()), 413, "pixels"),
        (data_url(png_bytes(600, 2)), 400, "aspect ratio"),
        (data_url(png_bytes(3, 900)), 400, "aspect ratio"),
    ],
)
def test_bad_images_are_4xx_with_a_reason(make_client, image, status, says):
    response = make_client().post("/v1/embeddings", json={"input": [{"image": image}]})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["code"] == status


def test_image_bytes_limit(make_client):
    client = make_client(max_image_bytes=1000)
    response = client.post("/v1/embeddings", json={"input": [{"image": data_url(os.urandom(3000))}]})
    assert response.status_code == 413 and "at most 1,000" in response.json()["error"]["message"]


def test_lone_surrogates_in_texts_are_400_and_in_ignored_fields_200(make_client):
    """A text is encoded, so one that is not valid Unicode is refused with 400 naming it; ``user`` and ``model``
    are accepted for OpenAI compatibility and never read, so what they hold does not change the answer."""
    client = make_client()
    for raw in (b'{"input": "\\ud800 broken"}', b'{"input": [{"text": "x\\udfff"}]}'):
        response = client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert "surrogate" in response.json()["error"]["message"] and "input[0]" in response.json()["error"]["message"]
    for raw in (b'{"input": "a", "user": "\\ud800"}', b'{"input": "a", "model": "\\udfff"}'):
        response = client.post("/v1/embeddings", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"input": "x", "budget": "99x99"}, 400, "allowed"),
        ({"input": "x", "budget": 65}, 400, "1 ≤ budget ≤ 64"),
        ({"input": "x", "input_type": "query", "budget": 17}, 400, "1 ≤ budget ≤ 16"),
        ({"input": "x", "budget": 0}, 400, "budget"),
        ({"input": "x", "budget": "four"}, 400, "cannot read budget"),
        ({"input": "x", "dimensions": 128}, 400, "64 dimensions"),
        ({"input": []}, 400, "empty list"),
        ({"input": [{}]}, 400, "neither"),
        ({"input": "x", "budjet": "4x8"}, 422, "budjet"),
        ({"input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
        ({"input": "x", "input_type": "passage"}, 422, "input_type"),
        ({"input": 5}, 422, "input"),
        ({}, 422, "input"),
    ],
)
def test_bad_requests_say_what_was_wrong(make_client, body, status, says):
    response = make_client().post("/v1/embeddings", json=body)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]


def test_size_limits(make_client):
    client = make_client(max_items=3, max_body_bytes=2000, max_text_chars=100)
    response = client.post("/v1/embeddings", json={"input": ["a"] * 4})
    assert response.status_code == 413 and "at most 3" in response.json()["error"]["message"]
    response = client.post("/v1/embeddings", json={"input": ["x" * 101]})
    assert response.status_code == 413 and "at most 100" in response.json()["error"]["message"]
    response = client.post("/v1/embeddings", json={"input": ["y" * 3000]})
    assert response.status_code == 413 and "2,000 bytes" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(10):
            yield b" " * 500

    response = client.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_invalid_json_and_unknown_routes_use_the_error_envelope(make_client):
    client = make_client()
    response = client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/v1/nothing").json()["error"]["code"] == 404
    assert client.get("/v1/embeddings").json()["error"]["code"] == 405
