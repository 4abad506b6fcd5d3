"""API keys, binding, no pickle, health/metrics/OpenAPI, and the ``metaembed serve`` command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import metaembed
from metaembed.errors import InputError
from metaembed.serve.errors import AuthenticationError, PermissionDeniedError
from metaembed.serve.security import API_KEY_ENV, check_bearer, load_api_key

KEY = "k" * 24


def test_key_from_env_or_file(tmp_path):
    assert load_api_key(environ={}) is None
    assert load_api_key(environ={API_KEY_ENV: f" {KEY}\n"}) == KEY
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    assert load_api_key(key_file, environ={API_KEY_ENV: "ignored-when-a-file-is-given"}) == KEY
    with pytest.raises(InputError, match="at least 16"):
        load_api_key(environ={API_KEY_ENV: "short"})
    with pytest.raises(InputError, match="cannot read"):
        load_api_key(tmp_path / "missing")


def test_check_bearer():
    check_bearer(f"Bearer {KEY}", KEY)
    check_bearer(f"bearer {KEY}", KEY)
    for header, match in (
        (None, "missing"),
        ("Bearer", "malformed"),
        (f"Token {KEY}", "malformed"),
        ("Bearer x", "wrong"),
    ):
        with pytest.raises(AuthenticationError, match=match):
            check_bearer(header, KEY)
    with pytest.raises(PermissionDeniedError, match="disabled"):
        check_bearer(f"Bearer {KEY}", None)


def test_no_pickle_in_the_service_or_index():
    root = Path(metaembed.__file__).parent
    for path in [*(root / "serve").glob("*.py"), *(root / "index").glob("*.py")]:
        source = path.read_text()
        assert not re.search(r"\bimport pickle\b|\bpickle\.|torch\.load\(|allow_pickle=True", source), path


def test_health_metrics_and_openapi(make_client):
    client = make_client()
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["dim"] == 64 and health["index_size"] is None
    client.post("/v1/embeddings", json={"input": ["a", "b"]})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert 'metaembed_requests_total{route="/v1/embeddings",status="200"} 1.0' in metrics.text
    assert "metaembed_encode_batch_items_count 1.0" in metrics.text
    schema = client.get("/openapi.json").json()
    assert {"/v1/embeddings", "/v1/search", "/v1/index/add", "/v1/index/delete", "/health", "/metrics"} <= set(
        schema["paths"]
    )
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def _args(*extra: str):
    from metaembed.cli import build_parser

    return build_parser().parse_args(["serve", *extra])


def test_cli_defaults_bind_localhost():
    args = _args("--model", "m")
    assert args.host == "127.0.0.1" and args.index is None and not args.no_batching


def test_cli_builds_a_working_app(serve_model, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from metaembed.serve.cli import build

    checkpoint = serve_model.save_pretrained(tmp_path / "ckpt")
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    (tmp_path / "imgs").mkdir()
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = _args(
        "--model", str(checkpoint), "--index", str(tmp_path / "idx"), "--api-key-file", str(key_file),
        "--image-dir", str(tmp_path / "imgs"), "--torch-threads", "1", "--index-dtype", "fp32",
    )  # fmt: skip
    with TestClient(build(args)) as client:
        added = client.post(
            "/v1/index/add", json={"items": ["x", "y"], "ids": ["x", "y"]}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert added.status_code == 200, added.text
        assert client.post("/v1/search", json={"query": "x", "k": 1}).json()["model"] == "ckpt"
    with pytest.raises(InputError, match="not a directory"):
        build(_args("--model", str(checkpoint), "--image-dir", str(tmp_path / "nope")))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from metaembed.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaembed serve: error:") and err.count("\n") == 1


@pytest.fixture(scope="module")
def checkpoint(serve_model, tmp_path_factory):
    return serve_model.save_pretrained(tmp_path_factory.mktemp("serve-cli") / "ckpt")


@pytest.mark.parametrize(
    ("flag", "value", "requirement"),
    [
        ("--queue-size", "0", "must be at least 1, got 0"),
        ("--max-concurrency", "0", "must be at least 1, got 0"),
        ("--max-items", "-3", "must be at least 1, got -3"),
        ("--max-batch-items", "0", "must be at least 1, got 0"),
        ("--max-batch-wait-ms", "-1", "must be a finite number ≥ 0, got -1.0"),
        ("--request-timeout", "0", "must be a finite number > 0, got 0.0"),
        ("--request-timeout", "nan", "must be a finite number > 0, got nan"),
        ("--request-timeout", "inf", "must be a finite number > 0, got inf"),
        ("--timeout-keep-alive", "0", "must be a finite number > 0, got 0.0"),
        ("--timeout-keep-alive", "nan", "must be a finite number > 0, got nan"),
    ],
)
def test_a_limit_out_of_range_is_the_usual_error_line_naming_its_flag(
    checkpoint, tmp_path, capsys, flag, value, requirement
):
    from metaembed.cli import main

    index = tmp_path / "index"
    assert main(["serve", "--model", str(checkpoint), "--index", str(index), flag, value]) == 2
    err = capsys.readouterr().err
    assert err == f"metaembed serve: error: {flag} {requirement}\n"
    assert not index.exists()  # refused before the index was created


def test_an_existing_index_of_another_dtype_is_refused_not_ignored(checkpoint, serve_model, tmp_path, capsys):
    from metaembed.cli import main
    from metaembed.index.ingestion import open_for_model

    open_for_model(tmp_path / "index", serve_model).close()  # bf16, the default
    assert main(["serve", "--model", str(checkpoint), "--index", str(tmp_path / "index"), "--index-dtype", "int8"]) == 2
    assert "stores bf16, not int8" in capsys.readouterr().err


def test_serve_config_names_the_field_out_of_range():
    from metaembed.serve.config import ServeConfig, ServeConfigError

    with pytest.raises(ServeConfigError, match=r"^queue_size must be at least 1, got 0$") as caught:
        ServeConfig(queue_size=0)
    assert isinstance(caught.value, InputError) and caught.value.field == "queue_size"
    with pytest.raises(ServeConfigError, match="max_aspect_ratio"):
        ServeConfig(max_aspect_ratio=float("nan"))
    with pytest.raises(ServeConfigError, match="max_batch_wait_ms"):
        ServeConfig(max_batch_wait_ms=float("inf"))
