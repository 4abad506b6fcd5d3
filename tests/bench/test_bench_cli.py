from __future__ import annotations

import functools
import json

import pytest

from metaembed import Budget
from metaembed.bench.scoring import BenchError, index_bytes, percentile, profile_scoring
from metaembed.cli import main

KEYS = {"budget", "flops", "latency_ms", "latency_ms_std", "latency_ms_p99", "index_bytes", "roofline_ms"}


@pytest.fixture(autouse=True)
def small_ceilings(monkeypatch):
    """Real ceilings, measured on small arrays so each CLI call stays fast (the full measurement is ~1 GiB)."""
    from metaembed.bench import ceilings, scoring

    small = functools.partial(ceilings.measure, bandwidth_bytes=1 << 22, gemm_shape=(64, 64, 64), repeats=1)
    monkeypatch.setattr(scoring, "measure", small)


def run_json(capsys, *args: str) -> list[dict]:
    assert main(["bench", "scoring", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("dtype", "value_bytes", "scale_bytes"), [("bf16", 2, 0), ("fp32", 4, 0), ("int8", 1, 4)])
def test_scoring_json_has_the_keys_and_consistent_values(capsys, dtype, value_bytes, scale_bytes):
    n, dim = 300, 24
    rows = run_json(capsys, "--dim", str(dim), "--n", str(n), "--dtype", dtype, "--queries", "3", "--repeats", "2")
    assert [row["budget"] for row in rows] == [str(b) for b in Budget.LADDER]
    for row in rows:
        assert set(row) >= KEYS
        budget = Budget.parse(row["budget"])
        assert row["flops"] == 2 * n * budget.r_q * budget.r_c * dim
        assert row["index_bytes"] == n * budget.r_c * (dim * value_bytes + scale_bytes)
        assert row["latency_ms"] > 0 and row["latency_ms_std"] >= 0 and row["roofline_ms"] > 0
        assert row["latency_ms_p99"] >= row["latency_ms"]
        assert row["ratio"] == pytest.approx(row["latency_ms"] / row["roofline_ms"])
        assert row["batch_latency_ms"] == pytest.approx(row["latency_ms"] * 3, rel=0.5)


def test_percentile_matches_numpy():
    import numpy as np

    values = np.random.default_rng(0).exponential(size=37).tolist()
    for q in (0, 25, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert percentile([3.0], 99) == 3.0


def test_scoring_budget_subset_and_table_output(capsys):
    rows = run_json(capsys, "--dim", "16", "--n", "50", "--budgets", "3x5 16x64", "--queries", "2", "--repeats", "2")
    assert [row["budget"] for row in rows] == ["3x5", "16x64"]
    assert main(["bench", "scoring", "--dim", "16", "--n", "50", "--budgets", "1x1", "--queries", "1"]) == 0
    out = capsys.readouterr().out
    assert "| budget | FLOPs / query |" in out and "| 1x1 |" in out and "bandwidth" in out


def test_roofline_uses_the_given_ceilings():
    from metaembed.bench.ceilings import Ceilings

    c = Ceilings(device="cpu", threads=1, bandwidth_gbs=10.0, peak_gflops={"fp32": 100.0, "bf16": 400.0})
    rows, used = profile_scoring(8, 40, [Budget(2, 4)], dtype="bf16", queries=5, repeats=2, ceilings=c)
    assert used is c
    flops, nbytes = Budget(2, 4).flops(40, 8), index_bytes(Budget(2, 4), 40, 8, "bf16")
    expected = max(flops * 5 / 400e9, nbytes / 10e9) * 1e3 / 5
    assert rows[0].roofline_ms == pytest.approx(expected)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dim", "0", "--n", "10"], "--dim must be at least 1"),
        (["--dim", "8", "--n", "10", "--queries", "0"], "--queries must be at least 1"),
        (["--dim", "100000", "--n", "100000000"], "needs .* GiB, more than"),
        (["--dim", "8", "--n", "10", "--budgets", "0x4"], "r_q must be at least 1"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, args, message):
    assert main(["bench", "scoring", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaembed bench: error: ") and "Traceback" not in err
    assert pytest.importorskip("re").search(message, err)


def test_cuda_without_cuda_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BenchError, match="cuda"):
        profile_scoring(8, 10, dtype="bf16", device="cuda", queries=1, repeats=1)


def test_ceilings_command(capsys):
    assert main(["bench", "ceilings", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bandwidth_gbs"] > 0 and data["peak_gflops"]["fp32"] > 0


def test_without_queries_the_batch_is_sized_to_the_time_budget():
    rows, _ = profile_scoring(8, 300, [Budget(1, 1), Budget(16, 64)], queries=None, seconds=1e-6, repeats=2)
    assert [row.queries for row in rows] == [1, 1]  # no time at all: the smallest batch
    rows, _ = profile_scoring(8, 300, [Budget(1, 1)], queries=None, seconds=1e4, repeats=2)
    assert rows[0].queries == 1000  # plenty of time: the paper's batch, never more


def test_json_carries_the_ceilings_the_table_prints(capsys):
    rows = run_json(capsys, "--dim", "8", "--n", "50", "--budgets", "1x1 2x4", "--seconds", "0.2", "--repeats", "2")
    ceilings = rows[0]["ceilings"]
    assert set(ceilings) >= {"device", "threads", "bandwidth_gbs", "peak_gflops"} and ceilings["bandwidth_gbs"] > 0
    assert rows[1]["ceilings"] == ceilings


def test_defaults_are_cpu_sized_and_paper_is_explicit(monkeypatch, capsys):
    from metaembed.bench import scoring
    from metaembed.bench.ceilings import Ceilings

    seen = []

    def fake(dim, n, budgets, **kwargs):
        seen.append((dim, n, kwargs["queries"], kwargs["repeats"]))
        return [], Ceilings(device="cpu", threads=1, bandwidth_gbs=1.0, peak_gflops={"fp32": 1.0})

    monkeypatch.setattr(scoring, "profile_scoring", fake)
    assert main(["bench", "scoring"]) == 0
    assert main(["bench", "scoring", "--paper"]) == 0
    assert seen == [(384, 20_000, None, 10), (384, 100_000, 1000, 10)]
    assert "done in" in capsys.readouterr().err


@pytest.mark.parametrize(("threads", "clock"), [(1, "thread_cpu"), (2, "wall")])
def test_scoring_rows_and_ceilings_say_their_clock(capsys, threads, clock):
    import torch

    before = torch.get_num_threads()
    try:
        rows = run_json(capsys, "--dim", "16", "--n", "40", "--budgets", "1x1", "--queries", "1", "--repeats", "1",
                        "--threads", str(threads))  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert rows[0]["clock"] == clock and rows[0]["ceilings"]["clock"] == clock


def test_time_ms_reads_the_clock_it_is_given(monkeypatch):
    from metaembed.bench import ceilings, scoring

    readings = iter([1.0, 1.5, 2.0, 3.0])
    monkeypatch.setattr(ceilings.time, "thread_time", lambda: next(readings))
    monkeypatch.setattr(ceilings.time, "perf_counter", lambda: pytest.fail("wall clock read"))
    assert scoring.time_ms(lambda: None, 2, clock="thread_cpu") == [500.0, 1000.0]
