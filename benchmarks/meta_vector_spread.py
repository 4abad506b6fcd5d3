"""How far a model's Meta-Token vectors spread: are its r vectors per item really different?

Encodes the first ``--items`` queries of an MMEB-eval file and their gold candidates (texts or images, as the
file has them) and reports the mean pairwise cosine between the vectors of one item, per side. Values near 1
mean the extra vectors of a larger budget read almost the same signal as the first one (docs/results.md).
For a mean-anchored model (``meta_anchor: mean``) it also re-encodes the queries with the residual map
zeroed and reports each query vector's cosine to the pure content mean.

    python benchmarks/meta_vector_spread.py [--model models/metaembed-mini] [--data data/emoji/eval/emoji_t2i.jsonl]
    python benchmarks/meta_vector_spread.py --model M --data data/sheets/eval/sheets_t2i_2x2.jsonl --json out.json
"""

from __future__ import annotations

import argparse
import json
from itertools import islice
from pathlib import Path

import torch

from metaembed import MetaEmbedModel


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    """Mean cosine between different vectors of the same item, over items ``(n, r, D)`` (unit vectors)."""
    gram = vectors @ vectors.transpose(1, 2)
    off_diagonal = ~torch.eye(vectors.shape[1], dtype=torch.bool)
    return float(gram[:, off_diagonal].mean())


def item(text: str, image: str, root: Path) -> dict:
    return {"text": text or None, "image": root / image if image else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/metaembed-mini")
    parser.add_argument("--data", default="data/emoji/eval/emoji_t2i.jsonl", help="MMEB-eval JSONL")
    parser.add_argument("--image-root", type=Path, help="image paths' folder (default: the file's dataset folder)")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    root = args.image_root or Path(args.data).parent.parent
    model = MetaEmbedModel.from_pretrained(args.model).eval()
    with open(args.data) as f:
        records = [json.loads(line) for line in islice(f, args.items)]
    queries = model.encode_queries([item(r["qry_text"], r["qry_img_path"], root) for r in records])
    candidates = model.encode_candidates([item(r["tgt_text"][0], r["tgt_img_path"][0], root) for r in records])
    out = {
        "model": args.model,
        "data": args.data,
        "items": len(records),
        "query_pairwise_cosine": mean_pairwise_cosine(queries),
        "candidate_pairwise_cosine": mean_pairwise_cosine(candidates),
    }
    print(f"{len(records)} items from {args.data}")
    print(f"query vectors of one item, mean pairwise cosine:     {out['query_pairwise_cosine']:.3f}")
    print(f"candidate vectors of one item, mean pairwise cosine: {out['candidate_pairwise_cosine']:.3f}")
    if model.config.meta_anchor == "mean":
        saved = model.meta_residual.weight.detach().clone()
        with torch.no_grad():
            model.meta_residual.weight.zero_()
            content_mean = model.encode_queries([item(r["qry_text"], r["qry_img_path"], root) for r in records])
            model.meta_residual.weight.copy_(saved)
        cosine = (queries * content_mean).sum(-1)
        out["query_cosine_to_content_mean"] = float(cosine.mean())
        print(f"query vectors' cosine to the content mean: mean {cosine.mean():.3f}, min {cosine.min():.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
