"""docs/kernels.md's result tables are the stored benchmark JSON rendered, line for line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _claims_module():
    spec = importlib.util.spec_from_file_location("kernel_claims", ROOT / "benchmarks" / "kernel_claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_tables_are_the_stored_json_rendered():
    result = json.loads((ROOT / "docs" / "bench" / "kernels.json").read_text())
    rendered = _claims_module().markdown(result)
    docs = (ROOT / "docs" / "kernels.md").read_text().splitlines()
    missing = [line for line in rendered.splitlines() if line.strip() and line not in docs]
    assert not missing, f"docs/kernels.md lacks {len(missing)} rendered lines, e.g. {missing[0]!r}"
    for cell in result["cells"]:
        assert len(cell["ms"]) == len(result["rounds"])  # one value per round: medians and spreads are real
    for state in result["rounds"]:
        assert state["threads"] >= 1 and len(state["load_before"]) == 3 and state["ceilings"]["bandwidth_gbs"] > 0
