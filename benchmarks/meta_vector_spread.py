"""How far a model's Meta-Token vectors spread: are its r vectors per item really different?

For a mean-anchored model (``meta_anchor: mean``) it also re-encodes with the residual map zeroed and
reports each query vector's cosine to the pure content mean. Values near 1 mean the extra vectors of a
larger budget read almost the same signal as the first one (docs/results.md).

    python benchmarks/meta_vector_spread.py [--model models/metaembed-mini] [--data data/emoji/eval/emoji_t2i.jsonl]
"""

from __future__ import annotations

import argparse
import json
from itertools import islice

import torch

from metaembed import MetaEmbedModel


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine between different vectors of the same item, over items ``(n, r, D)`` (unit vectors)."""
    gram = vectors @ vectors.transpose(1, 2)
    off_diagonal = ~torch.eye(vectors.shape[1], dtype=torch.bool)
    return float(gram[:, off_diagonal].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/metaembed-mini")
    parser.add_argument("--data", default="data/emoji/eval/emoji_t2i.jsonl", help="MMEB-eval JSONL (qry_text)")
    parser.add_argument("--items", type=int, default=64)
    args = parser.parse_args()
    model = MetaEmbedModel.from_pretrained(args.model).eval()
    with open(args.data) as f:
        texts = [json.loads(line)["qry_text"] for line in islice(f, args.items)]
    queries, candidates = model.encode_queries(texts), model.encode_candidates(texts)
    print(f"{len(texts)} items from {args.data}")
    print(f"query vectors of one item, mean pairwise cosine:     {mean_pairwise_cosine(queries):.3f}")
    print(f"candidate vectors of one item, mean pairwise cosine: {mean_pairwise_cosine(candidates):.3f}")
    if model.meta_residual is not None:
        saved = model.meta_residual.weight.detach().clone()
        with torch.no_grad():
            model.meta_residual.weight.zero_()
            content_mean = model.encode_queries(texts)
            model.meta_residual.weight.copy_(saved)
        cosine = (queries * content_mean).sum(-1)
        print(f"query vectors' cosine to the content mean: mean {cosine.mean():.3f}, min {cosine.min():.3f}")


if __name__ == "__main__":
    main()
