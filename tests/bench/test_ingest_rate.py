"""docs/search.md's ingest-rate table is the stored benchmark record rendered, line for line."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_docs_table_is_the_stored_record_rendered(benchmark_script, assert_rendered_in):
    record = json.loads((ROOT / "docs" / "bench" / "ingest-rate.json").read_text())
    assert_rendered_in(benchmark_script("ingest_rate").table(record), "docs/search.md")
    assert record["added"] == record["listed"] - record["bad"] > 0
    assert record["torch_threads"] >= 1 and len(record["load_average_before"]) == 3
    assert record["encode"]["items_per_s"] > 0 and record["index_writes"]["items_per_s"] > 0
    assert record["disk_bytes"] > 0 and record["started_utc"] < record["finished_utc"]


def test_the_table_is_rewritten_between_its_markers(tmp_path, benchmark_script):
    module = benchmark_script("ingest_rate")
    record = json.loads((ROOT / "docs" / "bench" / "ingest-rate.json").read_text())
    doc = tmp_path / "search.md"
    doc.write_text(f"before\n{module.TABLE_START}\nstale | row\n{module.TABLE_END}\nafter\n")
    module.write_table(record, doc)
    text = doc.read_text()
    assert "stale" not in text and module.table(record) in text
    assert text.startswith("before\n") and text.endswith(f"{module.TABLE_END}\nafter\n")
