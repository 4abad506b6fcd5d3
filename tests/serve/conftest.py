"""Fixtures for the service tests: one tiny model per session, apps built on it, images as data URLs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for serve_images (tests use importlib import mode)

API_KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="session")
def serve_model(tiny_backbone):
    """The tiny Qwen2-VL MetaEmbedModel (same as ``tiny_model``), built once: the service never trains it."""
    import torch

    from metaembed import MetaEmbedModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl")).eval()


@pytest.fixture
def make_client(serve_model):
    """``make_client(index=None, quality=None, **config)`` → a started TestClient, closed after the test."""
    from fastapi.testclient import TestClient

    from metaembed.serve import ServeConfig, create_app

    clients = []

    def build(index=None, model=None, quality=None, **config):
        app = create_app(model or serve_model, index, ServeConfig(**config), quality=quality)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def live_server(serve_model):
    """``live_server(index=None, quality=None, **config)`` → the base URL of a uvicorn server on 127.0.0.1."""
    import socket
    import threading
    import time

    import uvicorn

    from metaembed.serve import ServeConfig, create_app

    running = []

    def start(index=None, quality=None, **config):
        app = create_app(serve_model, index, ServeConfig(**config), quality=quality)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        running.append((server, thread))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(10)
