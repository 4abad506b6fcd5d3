"""MMEB runner vs naive per-budget re-encoding: items encoded, wall time, and identical numbers.

The runner encodes each distinct query and candidate of a dataset once, with all vectors, and scores
every budget from that pass. The naive loop a first implementation tends to write encodes, for every
budget, every query and its whole candidate list (with ``budget=``) and scores it. Both run here on the
same synthetic MMEB-schema data (PIL images, candidate lists drawn from a shared pool, as MMEB's are)
and the tiny random model (or ``--model``), and the script prints encodes, seconds and the ratio.

    PYTHONPATH=src python benchmarks/eval_mmeb_runner.py [--queries 32 --candidates 16 --pool 40]

Timings are wall clock on whatever machine runs it (shared CPUs are noisy); the encode counts are exact.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from metaembed import Budget, maxsim
from metaembed.eval.mmeb import evaluate_mmeb, load_datasets


class Counting:
    """Wraps an encoder and counts the items it encodes."""

    def __init__(self, model):
        self.model, self.items = model, 0

    def num_vectors(self, side):
        return self.model.num_vectors(side)

    def encode_queries(self, items, *, batch_size=8, budget=None):
        self.items += len(items)
        return self.model.encode_queries(items, budget=budget, batch_size=batch_size)

    def encode_candidates(self, items, *, batch_size=8, budget=None):
        self.items += len(items)
        return self.model.encode_candidates(items, budget=budget, batch_size=batch_size)


def make_data(root: Path, datasets: int, queries: int, candidates: int, pool: int, seed: int) -> dict:
    rng = random.Random(seed)
    rows = {}
    for d in range(datasets):
        name = ["ImageNet-1K", "CIRR", "VisDial", "RefCOCO"][d % 4] if d < 4 else f"Extra{d}"
        images = []
        for i in range(pool):
            path = f"{name}/pool{i}.png"
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (56, 56), (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(root / path)
            images.append(path)
        records = []
        for q in range(queries):
            chosen = rng.sample(range(pool), candidates)
            records.append({
                "qry_text": f"<|image_1|>\nFind the picture matching item {chosen[0]} of set {d}",
                "qry_img_path": images[(chosen[0] + 1) % pool] if q % 2 else "",
                "tgt_text": ["<|image_1|>\nRepresent the given image."] * candidates,
                "tgt_img_path": [images[c] for c in chosen],
            })  # fmt: skip
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        rows[name] = records
    return rows


def naive(model: Counting, rows: dict, root: Path, budgets, batch_size: int) -> dict:
    """For each budget, encode each query and its candidate list at that budget; Precision@1 (ties: miss)."""
    out = {}
    for name, records in rows.items():
        for budget in budgets:
            hits = 0
            for row in records:
                query = {"text": row["qry_text"], "image": root / row["qry_img_path"] if row["qry_img_path"] else None}
                keys = list(dict.fromkeys(zip(row["tgt_text"], row["tgt_img_path"], strict=True)))
                items = [{"text": t, "image": root / i} for t, i in keys]
                q = model.encode_queries([query], budget=budget, batch_size=batch_size)
                c = model.encode_candidates(items, budget=budget, batch_size=batch_size)
                scores = maxsim(q, c)[0]
                hits += int((scores >= scores[0]).sum().item() == 1)
            out[(name, str(budget))] = hits / len(records)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="metaembed checkpoint (default: a tiny random Qwen2-VL)")
    parser.add_argument("--datasets", type=int, default=2)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--pool", type=int, default=40, help="distinct images a dataset's lists draw from")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    import transformers

    from metaembed import MetaEmbedModel

    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model:
            model = MetaEmbedModel.from_pretrained(args.model)
        else:
            from metaembed.model.tiny import make_tiny_backbone

            torch.manual_seed(args.seed)
            model = MetaEmbedModel.from_backbone(make_tiny_backbone(root / "backbone"))
        data = root / "data"
        rows = make_data(data, args.datasets, args.queries, args.candidates, args.pool, args.seed)
        budgets = list(Budget.LADDER)

        ours = Counting(model)
        start = time.perf_counter()
        result = evaluate_mmeb(ours, load_datasets(data), budgets, batch_size=args.batch_size)
        ours_s = time.perf_counter() - start

        theirs = Counting(model)
        start = time.perf_counter()
        reference = naive(theirs, rows, data, budgets, args.batch_size)
        naive_s = time.perf_counter() - start

    agree = sum(result.value(name, budget) == value for (name, budget), value in reference.items())
    print(f"data: {args.datasets} datasets × {args.queries} queries × {args.candidates} candidates "
          f"(pool {args.pool}), {len(budgets)} budgets, torch threads {torch.get_num_threads()}")  # fmt: skip
    print("\n| runner | items encoded | seconds |")
    print("|---|---|---|")
    print(f"| one pass, every budget (metaembed eval) | {ours.items:,} | {ours_s:.2f} |")
    print(f"| naive: re-encode per budget and per query | {theirs.items:,} | {naive_s:.2f} |")
    print(f"\nencodes saved: {theirs.items / ours.items:.1f}× fewer items; wall time ratio {naive_s / ours_s:.1f}×")
    print(f"Precision@1 identical on {agree}/{len(reference)} (dataset, budget) cells")
    print(f"runner's runtime counters: {result.encodes}")


if __name__ == "__main__":
    main()
