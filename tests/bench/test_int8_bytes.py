"""docs/index.md's int8 tables are the stored benchmark record rendered; the record keeps its accuracy contract."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from metaembed import Budget

ROOT = Path(__file__).resolve().parents[2]
RECORD = ROOT / "docs" / "bench" / "int8-quality-stdlib.json"


def test_the_docs_tables_are_the_stored_record_rendered(benchmark_script, assert_rendered_in):
    record = json.loads(RECORD.read_text())
    assert_rendered_in(benchmark_script("int8_bytes").table(record), "docs/index.md")
    assert record["torch_threads"] >= 1 and len(record["load_average_before"]) == 3 and record["fused"]
    budgets = [str(b) for b in Budget.LADDER]
    for dtype in ("fp32", "bf16", "int8", "int8_bf16_query"):
        assert list(record[dtype]["mrr_at_10"]) == budgets and list(record[dtype]["max_abs_error"]) == budgets
    int8 = record["int8"]
    assert int8["bound_holds_for_every_pair"]
    for b in budgets:  # the integer dot products are exact: what is left against the contract is fp32 rounding
        assert int8["max_abs_error_vs_quantised_query"][b] < 1e-4 < int8["max_query_rounding_effect"][b]
        assert int8["max_query_rounding_effect"][b] <= int8["query_rounding_bound"][b]


def test_reference_scores_and_the_full_score_matrix_agree_with_the_index(tmp_path, benchmark_script):
    module = benchmark_script("int8_bytes")
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(5, 4, 16), dim=-1)
    candidates = torch.nn.functional.normalize(torch.randn(7, 8, 16), dim=-1)
    ids = [f"c{i}" for i in range(7)]
    budget = Budget(2, 4)
    expected = module.reference(queries, candidates, budget, chunk=2)
    assert expected.shape == (5, 7) and expected.dtype == torch.float64
    from metaembed.index import create_index

    with create_index(tmp_path / "ix", 16, 8, dtype="fp32") as ix:
        ix.add(ids, candidates)
        got = module.all_scores(ix, queries, budget, ids)
    assert module.max_abs(got, expected) < 1e-5
    top = module.top_ids(expected, ids)
    assert [row[0] for row in top] == [ids[j] for j in expected.argmax(dim=1).tolist()] and len(top[0]) == 7
