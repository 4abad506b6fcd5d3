"""``metaembed demo``: a small end-to-end run — encode, index in memory, score at every ladder budget.

Until the shipped real-data checkpoint exists this runs on a tiny *random* Qwen2-VL built on the spot,
so the scores show the mechanics (shapes, budgets, latency, bytes), not retrieval quality.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from metaembed.budget import Budget


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="tiny end-to-end encode-and-score example (random weights)")
    parser.add_argument("--candidates", type=int, default=256, help="number of candidates to index")
    parser.add_argument("--queries", type=int, default=16, help="number of queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import transformers
    from PIL import Image

    from metaembed import MetaEmbedModel, maxsim
    from metaembed.model.tiny import make_tiny_backbone

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    print("demo: building a tiny random Qwen2-VL backbone (no hub needed) ...")
    with tempfile.TemporaryDirectory() as tmp:
        model = MetaEmbedModel.from_backbone(make_tiny_backbone(tmp, "qwen2_vl"))
    gen = torch.Generator().manual_seed(args.seed)
    colours = torch.randint(0, 256, (args.candidates, 3), generator=gen).tolist()
    candidates = [
        {"text": f"a swatch of colour {r} {g} {b}", "image": Image.new("RGB", (56, 56), (r, g, b))}
        for r, g, b in colours
    ]
    queries = [f"colour {r} {g} {b}" for r, g, b in colours[: args.queries]]
    start = time.perf_counter()
    candidate_vectors = model.encode_candidates(candidates, batch_size=32)
    query_vectors = model.encode_queries(queries, batch_size=32)
    encode_s = time.perf_counter() - start
    print(
        f"demo: encoded {len(candidates)} text+image candidates and {len(queries)} queries in {encode_s:.1f} s "
        f"→ {tuple(candidate_vectors.shape)} and {tuple(query_vectors.shape)}"
    )
    dim = model.embedding_dim
    print("\n| budget | scoring ms / query (median of 5) | index bytes (bf16) | FLOPs / query | top-1 = own |")
    print("|---|---|---|---|---|")
    index = candidate_vectors.to(torch.bfloat16)
    for budget in Budget.LADDER:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            scores = maxsim(query_vectors.to(torch.bfloat16), index, budget)
            times.append((time.perf_counter() - start) * 1000 / len(queries))
        hits = (scores.argmax(dim=1) == torch.arange(len(queries))).float().mean().item()
        print(
            f"| {budget} | {statistics.median(times):.3f} | {budget.index_bytes(len(candidates), dim, 2):,} "
            f"| {budget.flops(len(candidates), dim):,} | {hits:.2f} |"
        )
    print("\ndemo: the backbone is random, so 'top-1 = own' is chance level; see the README for real models.")
    return 0
