"""Schemathesis against our own OpenAPI schema: generated requests (valid and invalid) never get a 5xx.

Every operation is fuzzed in positive and negative generation mode with an API key, so the guarded
index writes are exercised too. Each response goes through schemathesis' default checks (no server
error; status code, content type, headers and body conform to the schema; invalid data is rejected)
except ``positive_data_acceptance``: a schema-valid body can still be bad input the schema cannot
express (invalid base64, lone surrogates, a budget above the model's vector count) and gets a 4xx.
In its place, a schema-valid body must never be refused as schema-invalid (422). The default suite
sends a couple of hundred requests; the slow test sends ≥ 1,000 and prints the summary.
"""

from __future__ import annotations

import collections
import contextlib
import time

import pytest
from serve_images import data_url, png_bytes

KEY = "fuzz-key-0123456789abcdef"


def run_schemathesis(client, examples_per_mode: int, key: str | None = KEY) -> dict:
    """Fuzz every operation; return {'requests', 'by_status', 'by_operation', 'server_errors', 'seconds'}."""
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    record = {"by_status": collections.Counter(), "by_operation": collections.Counter(), "failures": []}
    start = time.perf_counter()
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(result.ok(), mode, examples_per_mode, record, key)
    by_status = record["by_status"]
    return {
        "requests": sum(by_status.values()),
        "by_status": dict(sorted(by_status.items())),
        "by_operation": dict(record["by_operation"]),
        "server_errors": sum(n for status, n in by_status.items() if status >= 500),
        "failures": record["failures"],
        "seconds": time.perf_counter() - start,
    }


def _fuzz(operation, mode, examples: int, record: dict, key: str | None) -> None:
    import hypothesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    headers = {"Authorization": f"Bearer {key}"} if key else None
    strategy = operation.as_strategy(generation_mode=mode, headers=headers)

    @given(case=strategy)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case):
        response = case.call()
        record["by_status"][response.status_code] += 1
        record["by_operation"][f"{operation.label} {mode.value}"] += 1
        try:
            case.validate_response(response, excluded_checks=[positive_data_acceptance])
        except BaseExceptionGroup as error:  # collect every failure, report them together
            record["failures"].append(f"{operation.label} [{response.status_code}]: {str(error)[:800]}")
        if mode is GenerationMode.POSITIVE and response.status_code == 422:
            record["failures"].append(f"{operation.label}: schema-valid body refused by the schema: {response.text}")

    with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # e.g. no negative cases for GET /health
        fuzz()


@pytest.fixture
def fuzz_client(make_client, serve_model, tmp_path):
    from metaembed.index.ingestion import open_for_model

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes())
    client = make_client(
        open_for_model(tmp_path / "index", serve_model), api_key=KEY, image_dir=tmp_path / "imgs", max_items=16
    )
    client.post(
        "/v1/index/add",
        json={"items": ["seed text", {"image": data_url(png_bytes())}], "ids": ["seed", "img"]},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    return client


def _report(summary: dict) -> str:
    return (
        f"schemathesis: {summary['requests']} requests in {summary['seconds']:.1f} s, "
        f"server errors {summary['server_errors']}, check failures {len(summary['failures'])}; "
        f"by status {summary['by_status']}; by operation {summary['by_operation']}"
    )


def test_schemathesis_no_server_errors(fuzz_client):
    anonymous = run_schemathesis(fuzz_client, examples_per_mode=5, key=None)
    print(_report(anonymous))
    assert anonymous["by_status"].get(401, 0) > 0  # the guarded routes refuse callers without the key
    assert anonymous["server_errors"] == 0 and not anonymous["failures"], anonymous["failures"][:5]
    summary = run_schemathesis(fuzz_client, examples_per_mode=30)
    print(_report(summary))
    assert summary["requests"] >= 200
    assert summary["server_errors"] == 0, summary["failures"][:5]
    assert not summary["failures"], "\n".join(summary["failures"][:5])


@pytest.mark.slow
def test_schemathesis_thousand_requests(fuzz_client):
    summary = run_schemathesis(fuzz_client, examples_per_mode=150)
    print(_report(summary))
    assert summary["requests"] >= 1000
    assert summary["server_errors"] == 0, summary["failures"][:5]
    assert not summary["failures"], "\n".join(summary["failures"][:5])
