"""The encode worker: merged batches match, the queue is bounded, waits time out, errors stay per request."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from metaembed.model.items import Item
from metaembed.serve.batcher import EncodeBatcher
from metaembed.serve.errors import BadRequestError, OverloadedError


def _blocked_batcher(model, **kwargs):
    """A batcher whose worker stops after its first batch until ``release`` is set."""
    release, started = threading.Event(), threading.Event()

    def hold(items, seconds):
        started.set()
        release.wait(30)

    return EncodeBatcher(model, on_batch=hold, **kwargs), release, started


def _recorder(sizes: list[int]):
    return lambda items, seconds: sizes.append(items)


def test_concurrent_requests_share_batches_and_match_sequential(serve_model):
    texts = [f"item number {i} about {'cats' if i % 2 else 'revenue'}" for i in range(12)]
    sizes: list[int] = []
    batcher = EncodeBatcher(
        serve_model, max_batch_items=32, max_batch_wait_ms=300, on_batch=lambda n, s: sizes.append(n)
    )
    try:
        with ThreadPoolExecutor(12) as pool:
            futures = list(pool.map(lambda t: batcher.submit([Item(text=t)], "query"), texts))
            results = [f.result(30) for f in futures]
    finally:
        batcher.close()
    got = torch.cat([r.embeddings for r in results])
    want = serve_model.encode_queries(texts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert sum(sizes) == 12 and max(sizes) > 1  # at least one forward pass served several requests
    assert all(r.tokens[0] > 0 for r in results)


def test_sides_are_never_mixed_and_batching_off_runs_jobs_alone(serve_model):
    for batching in (True, False):
        sizes: list[int] = []
        batcher = EncodeBatcher(serve_model, batching=batching, max_batch_wait_ms=200, on_batch=_recorder(sizes))
        try:
            q = batcher.submit([Item(text="q")], "query")
            c = batcher.submit([Item(text="c"), Item(text="d")], "candidate")
            assert q.result(30).embeddings.shape == (1, 16, 64)
            assert c.result(30).embeddings.shape == (2, 64, 64)
        finally:
            batcher.close()
        assert sorted(sizes) == [1, 2]


def test_full_queue_is_refused(serve_model):
    batcher, release, started = _blocked_batcher(serve_model, queue_size=2, batching=False)
    try:
        first = batcher.submit([Item(text="a")], "query")
        assert started.wait(30)  # the worker is now holding after its first batch
        batcher.submit([Item(text="b")], "query")
        batcher.submit([Item(text="c")], "query")
        with pytest.raises(OverloadedError, match="queue is full"):
            batcher.submit([Item(text="d")], "query")
    finally:
        release.set()
        batcher.close()
    assert first.result(30).embeddings.shape == (1, 16, 64)


def test_bulk_work_is_refused_once_the_measured_work_ahead_would_outlast_max_wait(serve_model):
    """max_wait_s=0: any measured work ahead (in progress or queued) refuses bulk work; urgent work never is."""
    holding, release, started = threading.Event(), threading.Event(), threading.Event()

    def hold(items, seconds):
        if holding.is_set():
            started.set()
            release.wait(30)

    batcher = EncodeBatcher(serve_model, batching=False, max_wait_s=0.0, on_batch=hold)
    try:
        assert batcher.submit([Item(text="a")], "query").result(30)  # nothing measured yet: accepted and measured
        assert batcher.expected_wait_s == 0  # an idle worker: accepted however slow it is
        holding.set()
        second = batcher.submit([Item(text="b"), Item(text="c")], "query")
        assert started.wait(30)  # "b c" is the forward pass in progress
        assert batcher.expected_wait_s > 0
        with pytest.raises(OverloadedError, match="s of work queued"):
            batcher.submit([Item(text="d")], "query")
        urgent = batcher.submit([Item(text="write")], "candidate", urgent=True)
    finally:
        holding.clear()
        release.set()
    try:
        for future in (second, urgent):
            future.result(30)
        deadline = time.monotonic() + 30
        while batcher.expected_wait_s > 0 and time.monotonic() < deadline:  # the worker finishes what it took
            time.sleep(0.01)
        assert batcher.submit([Item(text="e")], "query").result(30).embeddings.shape == (1, 16, 64)
    finally:
        batcher.close()


def test_one_bad_request_does_not_fail_the_batch(serve_model):
    """An item that slips past the HTTP checks and breaks the model fails only its own request, as a 400."""
    wide = Image.new("RGB", (300 * 28, 28))  # aspect 300:1, the Qwen-VL resizer refuses it
    batcher = EncodeBatcher(serve_model, max_batch_wait_ms=300)
    try:
        good = batcher.submit([Item(text="fine")], "candidate")
        bad = batcher.submit([Item(image=wide)], "candidate")
        assert good.result(30).embeddings.shape == (1, 64, 64)
        with pytest.raises(BadRequestError, match="cannot encode"):
            bad.result(30)
    finally:
        batcher.close()


def test_http_overload_is_503_and_slow_encode_is_504(make_client):
    client = make_client(queue_size=1, batching=False, request_timeout_s=0.5)
    release, started = threading.Event(), threading.Event()

    def hold(items, seconds):
        started.set()
        release.wait(30)

    client.app.state.batcher.on_batch = hold
    try:
        with ThreadPoolExecutor(1) as pool:
            blocked = pool.submit(client.post, "/v1/embeddings", json={"input": "first"})
            assert started.wait(30)
            slow = client.post("/v1/embeddings", json={"input": "second"})  # queued, never started in time
            assert slow.status_code == 504 and slow.json()["error"]["type"] == "timeout"
            # the timed-out job still holds the one queue slot until the worker skips it
            full = client.post("/v1/embeddings", json={"input": "third"})
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            release.set()
            assert blocked.result(30).status_code == 504  # it waited > 0.5 s too
    finally:
        release.set()
    client.app.state.batcher.on_batch = None
    client.app.state.config.request_timeout_s = 30  # a busy machine may need more than 0.5 s to encode
    assert client.post("/v1/embeddings", json={"input": "after"}).status_code == 200
