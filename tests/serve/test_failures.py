"""The service when things go wrong: overload, unexpected errors, a damaged or full index, hostile images.

Every case answers with the error envelope and a status that says what happened; no exception reaches the
server, no body names a server path, and the connection stays usable.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import http.client
import io
import logging
import os
import struct
import zlib
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serve_images import data_url

from metaembed.index.ingestion import open_for_model

KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


# ------------------------------------------------------------------------------------------ admission control


def test_admission_answers_503_at_once_when_a_lane_is_full_and_keeps_the_others_open():
    from metaembed.serve.middleware import ENCODE, LIGHT, WRITE, Admission
    from metaembed.serve.security import check_bearer

    release = asyncio.Event()
    entered = []

    async def app(scope, receive, send):
        entered.append(scope["path"])
        if scope["path"] == "/v1/embeddings":
            await release.wait()  # an encode that takes a long time
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = Admission(
        app,
        limits={ENCODE: 2, WRITE: 1, LIGHT: 4},
        lanes={"/v1/embeddings": ENCODE, "/v1/index/add": WRITE},
        authorize=lambda header: check_bearer(header, KEY),
    )

    async def scenario():
        transport = httpx.ASGITransport(app=guarded)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            slow = [asyncio.create_task(client.post("/v1/embeddings", json={})) for _ in range(2)]
            while entered.count("/v1/embeddings") < 2:
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/embeddings", json={})
            health = await client.get("/health")
            anonymous = await client.post("/v1/index/add", json={})
            keyed = await client.post("/v1/index/add", json={}, headers=AUTH)
            release.set()
            done = await asyncio.gather(*slow)
            after = await client.post("/v1/embeddings", json={})
        return refused, health, anonymous, keyed, done, after

    refused, health, anonymous, keyed, done, after = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "overloaded" and "busy" in refused.json()["error"]["message"]
    assert health.status_code == 200 and keyed.status_code == 200
    assert anonymous.status_code == 401 and entered.count("/v1/index/add") == 1  # refused before the app
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200


def test_the_thread_pool_holds_every_admitted_request(make_client):
    import anyio.to_thread

    from metaembed.serve import ServeConfig

    config = ServeConfig(max_encode_requests=10, max_write_requests=3, max_light_requests=5)
    assert config.thread_limit > 10 + 3 + 5
    client = make_client(max_encode_requests=10, max_write_requests=3, max_light_requests=5)
    tokens = client.portal.call(lambda: anyio.to_thread.current_default_thread_limiter().total_tokens)
    assert tokens >= config.thread_limit


def test_an_urgent_encode_overtakes_waiting_bulk_work(serve_model):
    import threading

    from metaembed.model.items import Item
    from metaembed.serve.batcher import EncodeBatcher

    order = []
    gate = threading.Event()

    class Recording(EncodeBatcher):
        def _encode_many(self, groups, side):
            gate.wait(10)
            order.extend(group[0].text for group in groups)
            return super()._encode_many(groups, side)

    batcher = Recording(serve_model, batching=False)
    try:
        first = batcher.submit([Item(text="first")], "candidate")  # the worker takes it and waits at the gate
        while batcher.depth:
            pass
        bulk = [batcher.submit([Item(text=f"bulk {i}")], "candidate") for i in range(3)]
        urgent = batcher.submit([Item(text="write")], "candidate", urgent=True)
        gate.set()
        for future in (first, *bulk, urgent):
            future.result(timeout=30)
    finally:
        batcher.close()
    assert order == ["first", "write", "bulk 0", "bulk 1", "bulk 2"]


def test_an_urgent_encode_is_batched_only_with_urgent_work(serve_model):
    """Merged into a batch of waiting bulk work, a one-item keyed write would wait for that whole forward pass."""
    import threading

    from metaembed.model.items import Item
    from metaembed.serve.batcher import EncodeBatcher

    batches, entered, gate = [], threading.Event(), threading.Event()

    class Recording(EncodeBatcher):
        def _encode_many(self, groups, side):
            entered.set()
            gate.wait(10)
            batches.append(sorted(item.text for group in groups for item in group))
            return super()._encode_many(groups, side)

    batcher = Recording(serve_model, max_batch_items=32, max_batch_wait_ms=50)
    try:
        first = batcher.submit([Item(text="first")], "candidate")
        assert entered.wait(10)  # the worker holds "first" at the gate; everything below waits in the queue
        bulk = [batcher.submit([Item(text=f"bulk {i}"), Item(text=f"bulk {i}b")], "candidate") for i in range(3)]
        urgent = [batcher.submit([Item(text=f"write {i}")], "candidate", urgent=True) for i in range(2)]
        gate.set()
        for future in (first, *bulk, *urgent):
            future.result(timeout=30)
    finally:
        batcher.close()
    bulk_items = sorted(f"bulk {i}{b}" for i in range(3) for b in ("", "b"))
    assert batches == [["first"], ["write 0", "write 1"], bulk_items]


# ------------------------------------------------------------------------------------------ unexpected errors


class _BrokenIndex:
    """An index whose search fails in a way nothing expects."""

    dim, num_vectors, dtype, read_only = 64, 64, "bf16", False

    def __len__(self) -> int:
        return 0

    def search(self, *args, **kwargs):
        raise RuntimeError("something nobody planned for")


def test_an_unexpected_error_is_a_500_and_never_reaches_the_server(serve_model):
    from fastapi.testclient import TestClient

    from metaembed.serve import ServeConfig, create_app

    app = create_app(serve_model, _BrokenIndex(), ServeConfig())
    with TestClient(app, raise_server_exceptions=True) as client:  # raises here if an exception escapes the app
        response = client.post("/v1/search", json={"query": "x"})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert "nobody planned" not in response.text


def test_the_connection_stays_usable_after_a_500(live_server, caplog):
    url = urlparse(live_server(_BrokenIndex()))
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    with caplog.at_level(logging.ERROR):
        connection.request("POST", "/v1/search", body=b'{"query": "x"}', headers={"Content-Type": "application/json"})
        first = connection.getresponse()
        first.read()
        sock = connection.sock
        connection.request("GET", "/health")
        second = connection.getresponse()
        second.read()
    assert first.status == 500 and second.status == 200
    assert connection.sock is sock  # the same keep-alive connection answered both
    assert "Exception in ASGI application" not in caplog.text
    connection.close()


# ------------------------------------------------------------------------------------------ index failures


@pytest.fixture
def index_client(make_client, serve_model, tmp_path):
    index = open_for_model(tmp_path / "index", serve_model)
    client = make_client(index, api_key=KEY)
    response = client.post("/v1/index/add", json={"items": ["a", "b"], "ids": ["a", "b"]}, headers=AUTH)
    assert response.status_code == 200
    return client, index, tmp_path / "index"


def test_a_full_disk_in_the_merge_after_an_add_still_acknowledges_the_add(index_client, monkeypatch):
    client, index, _ = index_client

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(type(index), "_maybe_compact", full)
    response = client.post("/v1/index/add", json={"items": ["c"], "ids": ["c"]}, headers=AUTH)
    assert response.status_code == 200, response.text
    again = client.post("/v1/index/add", json={"items": ["c"], "ids": ["c"]}, headers=AUTH)
    assert again.status_code == 409  # it was stored, and it was reported as stored


def test_a_full_disk_during_an_add_is_507_without_paths(index_client, monkeypatch):
    from metaembed.index import storage

    client, _, path = index_client

    def full(file, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))

    monkeypatch.setattr(storage, "open", full, raising=False)
    response = client.post("/v1/index/add", json={"items": ["d"], "ids": ["d"]}, headers=AUTH)
    assert response.status_code == 507 and response.json()["error"]["type"] == "insufficient_storage"
    assert str(path) not in response.text and "No space left" in response.text


def test_a_damaged_index_is_503_and_the_body_names_no_server_path(index_client):
    client, _, path = index_client
    for file in path.glob("seg-*.g0.bin"):
        os.truncate(file, 0)
    response = client.post("/v1/search", json={"query": "a"})
    assert response.status_code == 503 and response.json()["error"]["type"] == "index_unavailable"
    assert str(path) not in response.text and str(path.parent) not in response.text
    assert "damaged" in response.json()["error"]["message"]
    assert client.get("/health").status_code == 200  # the service itself is alive


def test_a_read_only_index_is_served_and_refuses_writes(make_client, serve_model, tmp_path):
    writer = open_for_model(tmp_path / "index", serve_model)
    writer.add(["x"], torch.nn.functional.normalize(torch.randn(1, 64, 64), dim=-1))
    reader = open_for_model(tmp_path / "index", serve_model, read_only=True)  # while the writer holds it
    client = make_client(reader, api_key=KEY)
    assert client.post("/v1/search", json={"query": "x"}).json()["results"][0]["id"] == "x"
    response = client.post("/v1/index/add", json={"items": ["y"], "ids": ["y"]}, headers=AUTH)
    assert response.status_code == 403 and "read-only" in response.json()["error"]["message"]
    assert client.get("/health").json()["index_writes_enabled"] is False
    writer.close()


# ------------------------------------------------------------------------------------------ images


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` (8-bit gray), followed by almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_a_png_header_claiming_30000_by_30000_is_413(make_client):
    response = make_client().post(
        "/v1/embeddings", json={"input": [{"image": data_url(_png_header_only(30000, 30000))}]}
    )
    assert response.status_code == 413, response.text
    assert "pixels" in response.json()["error"]["message"]


def _gradient(width: int = 64) -> np.ndarray:
    return np.tile(np.linspace(0, 1, width), (16, 1))


def _encoded_like(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if image.mode != "F" else "TIFF")
    return data_url(buffer.getvalue(), "image/png" if image.mode != "F" else "image/tiff")


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("I;16", lambda g: Image.fromarray(np.round(g * 65535).astype(np.uint16))),
        ("I", lambda g: Image.fromarray(np.round(g * 65535).astype(np.int32))),
        ("F", lambda g: Image.fromarray(g.astype(np.float32))),
        ("P", lambda g: Image.fromarray(np.round(g * 255).astype(np.uint8)).convert("RGB").quantize(256)),
    ],
)
def test_wide_and_palette_images_are_scaled_not_clipped(mode, make):
    from metaembed.model.items import load_image

    gradient = _gradient()
    image = make(gradient)
    assert image.mode == mode
    rgb = np.asarray(load_image(image, "item 0"), dtype=np.float64)
    assert rgb.shape == (16, 64, 3)
    np.testing.assert_allclose(rgb[..., 0] / 255, gradient, atol=3 / 255)  # a gradient stays a gradient


def test_a_16_bit_png_is_embedded_like_its_8_bit_version(make_client):
    gradient = _gradient()
    wide = Image.fromarray(np.round(gradient * 65535).astype(np.uint16))
    narrow = Image.fromarray(np.round(gradient * 255).astype(np.uint8)).convert("RGB")
    client = make_client()
    got = [
        np.array(
            client.post("/v1/embeddings", json={"input": [{"image": _encoded_like(image)}]}).json()["data"][0][
                "embedding"
            ]
        )
        for image in (wide, narrow)
    ]
    np.testing.assert_allclose(got[0], got[1], atol=1e-4)


# ------------------------------------------------------------------------------------------ OpenAI clients


def test_the_openai_client_decodes_correct_embeddings(live_server, serve_model):
    openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")
    client = openai.OpenAI(base_url=live_server() + "/v1", api_key="unused", max_retries=0)
    texts = ["a red bicycle", "two dogs on a beach"]
    want = serve_model.encode_candidates(texts).numpy()

    default = client.embeddings.create(model="metaembed", input=texts)  # the client asks for base64 by default
    for item, vectors in zip(default.data, want, strict=True):
        assert len(item.embedding) == 64 * 64
        np.testing.assert_allclose(np.array(item.embedding).reshape(64, 64), vectors, atol=1e-6)

    floats = client.embeddings.create(model="metaembed", input=texts, encoding_format="float")
    np.testing.assert_allclose(np.array([item.embedding for item in floats.data]), want, atol=1e-6)

    budget = client.embeddings.create(
        model="metaembed", input=texts[:1], extra_body={"input_type": "query", "budget": "4x8"}
    )
    query = serve_model.encode_queries(texts[:1], budget="4x8")[0].numpy()
    np.testing.assert_allclose(np.array(budget.data[0].embedding).reshape(4, 64), query, atol=1e-6)
    raw = base64.b64decode(
        httpx.post(f"{client.base_url}embeddings", json={"input": texts[:1], "encoding_format": "base64"}).json()[
            "data"
        ][0]["embedding"]
    )
    assert len(raw) == 64 * 64 * 4  # float32, not float16
