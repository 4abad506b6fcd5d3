"""/health is answered on the event loop: no worker thread, no model, no index lock."""

from __future__ import annotations

import anyio.to_thread
import torch

from metaembed.index.ingestion import open_for_model


def test_health_answers_while_every_worker_thread_is_taken(make_client, serve_model, tmp_path):
    index = open_for_model(tmp_path / "index", serve_model)
    index.add(["a", "b"], torch.nn.functional.normalize(torch.randn(2, 64, 64), dim=-1))
    client = make_client(index)
    holders = [object() for _ in range(client.app.state.config.thread_limit)]

    async def take_all_threads():
        limiter = anyio.to_thread.current_default_thread_limiter()
        for holder in holders:
            await limiter.acquire_on_behalf_of(holder)
        return limiter.available_tokens

    async def give_them_back():
        limiter = anyio.to_thread.current_default_thread_limiter()
        for holder in holders:
            limiter.release_on_behalf_of(holder)

    assert client.portal.call(take_all_threads) == 0  # a sync route would now wait for a thread
    try:
        with client.app.state.service.index_lock.write():  # and a write in progress holds the index
            health = client.get("/health")
    finally:
        client.portal.call(give_them_back)
    assert health.status_code == 200 and health.json()["index_size"] == 2
    assert client.get("/metrics").status_code == 200  # the thread pool works again
