"""Our exact MaxSim against the peers' MaxSim on identical data, at every ladder budget.

Peers (each given the budget's prefixes as dense tensors — none of them has a budget):

* **colpali-engine** ``BaseVisualRetrieverProcessor.score_multi_vector`` (illuin-tech/colpali,
  ``colpali_engine/utils/processing_utils.py``): batches of 128 queries × 128 documents padded with
  ``pad_sequence``, ``torch.einsum("bnd,csd->bcns", qs, ps).max(dim=3)[0].sum(dim=2)``, scores cast to float32.
  Re-implemented here from that source (installing colpali-engine would pull torchvision, which breaks this
  environment).
* **PyLate** ``pylate.scores.colbert_scores`` (lightonai/pylate, ``pylate/scores/scores.py``):
  ``torch.einsum("ash,bth->abst", q, d)`` then ``.max(axis=-1).values.sum(axis=-1)`` over all documents at
  once. Re-implemented from that source.
* **sentence-transformers** ``util.maxsim`` (6.x, MultiVectorEncoder's similarity): called for real when the
  package is importable (it chunks to ~100M elements and accumulates half precision in float32).

Ours: ``metaembed.maxsim(queries, candidates, budget)``. Every peer's scores are checked against ours
(bf16 tolerance) before timing. Prints a markdown table with the speed-up of ours over each peer.

    PYTHONPATH=src python benchmarks/peers.py                      # N=100,000, D=384, bf16, 1 query
    PYTHONPATH=src python benchmarks/peers.py --dim 2048 --n 20000 --queries 8
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from metaembed import Budget, maxsim
from metaembed.bench.scoring import time_ms


def colpali_score_multi_vector(qs: torch.Tensor, ps: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """colpali-engine's score_multi_vector on lists of (T, D) tensors (here already dense: no padding happens)."""
    scores_list = []
    for i in range(0, len(qs), batch_size):
        qs_batch = torch.nn.utils.rnn.pad_sequence(list(qs[i : i + batch_size]), batch_first=True, padding_value=0)
        scores_batch = []
        for j in range(0, len(ps), batch_size):
            ps_batch = torch.nn.utils.rnn.pad_sequence(list(ps[j : j + batch_size]), batch_first=True, padding_value=0)
            scores_batch.append(torch.einsum("bnd,csd->bcns", qs_batch, ps_batch).max(dim=3)[0].sum(dim=2))
        scores_list.append(torch.cat(scores_batch, dim=1).cpu())
    return torch.cat(scores_list, dim=0).to(torch.float32)


def pylate_colbert_scores(queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """PyLate's colbert_scores without a mask: one einsum over every query token × document token."""
    scores = torch.einsum("ash,bth->abst", queries, documents)
    return scores.max(axis=-1).values.sum(axis=-1)


def peers() -> dict:
    found = {
        "colpali-engine einsum": colpali_score_multi_vector,
        "PyLate colbert_scores": pylate_colbert_scores,
    }
    try:
        from sentence_transformers import util

        found["sentence-transformers util.maxsim"] = lambda q, c: util.maxsim(q, c)
    except ImportError:
        print("(sentence-transformers not installed: its row is skipped)")
    return found


def median_ms(fn, repeats: int) -> tuple[float, float]:
    times = time_ms(fn, repeats)
    return statistics.median(times), (statistics.stdev(times) if len(times) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--budgets", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; N = {args.n:,}, D = {args.dim}, "
        f"{args.queries} quer{'y' if args.queries == 1 else 'ies'}, {args.dtype}; ms per batch, median ± std\n"
    )
    found = peers()
    print("| budget | ours ms | " + " | ".join(f"{name} ms (speed-up)" for name in found) + " |")
    print("|---|---|" + "---|" * len(found))
    gen = torch.Generator().manual_seed(0)
    for budget in Budget.parse_many(args.budgets):
        c = torch.empty(args.n, budget.r_c, args.dim, dtype=dtype)
        step = max(1, (1 << 24) // (budget.r_c * args.dim))
        for start in range(0, args.n, step):
            block = torch.randn(min(step, args.n - start), budget.r_c, args.dim, generator=gen)
            c[start : start + step] = torch.nn.functional.normalize(block, dim=-1)
        q = torch.nn.functional.normalize(torch.randn(args.queries, budget.r_q, args.dim, generator=gen), dim=-1)
        q = q.to(dtype)
        ours = maxsim(q, c, budget)
        ours_ms, ours_std = median_ms(lambda q=q, c=c, b=budget: maxsim(q, c, b), args.repeats)
        cells = []
        for fn in found.values():
            got = fn(q, c).float()
            tolerance = budget.r_q * 2**-7 if dtype == torch.bfloat16 else 1e-4
            assert torch.allclose(got, ours, atol=tolerance, rtol=0), f"peer disagrees: {(got - ours).abs().max()}"
            ms, std = median_ms(lambda fn=fn, q=q, c=c: fn(q, c), args.peer_repeats)
            cells.append(f"{ms:,.1f} ± {std:,.1f} ({ms / ours_ms:.1f}×)")
        print(f"| {budget} | {ours_ms:,.1f} ± {ours_std:,.1f} | " + " | ".join(cells) + " |", flush=True)
        del c
    print(f"\nuptime after: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
