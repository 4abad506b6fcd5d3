"""Memory per GPU of the 3B / 7B / 32B recipes under DDP and FSDP: the table in docs/train.md.

Computed, not measured: ``metaembed.train.footprint`` counts parameters, gradients, AdamW moments and the
activations autograd keeps, from the Qwen2.5-VL config numbers written into it (no hub access). Each recipe
is sized as written (batch, LoRA, dtype, gradient checkpointing) with the whole batch in one graph and with
GradCache chunks; ``--tokens`` is the content length of an item (text plus visual tokens: an image of p
pixels is p / 28² tokens), to which the template and the appended Meta Tokens are added.

    PYTHONPATH=src python benchmarks/train_memory.py                       # 8 GPUs, 512 tokens, chunks of 16
    PYTHONPATH=src python benchmarks/train_memory.py --gpus 16 --tokens 1024 --chunk 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

from metaembed.train.footprint import GIB, RunShape, estimate
from metaembed.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("metaembed-3b.yaml", "metaembed-7b.yaml", "metaembed-32b.yaml")


def table(gpus: int, tokens: int, chunk: int) -> str:
    rows = [
        f"| recipe | strategy | weights | gradients | AdamW | activations, whole batch | total | "
        f"activations, chunks of {chunk} | total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in RECIPES:
        whole = RunShape.from_recipe(load_recipe(ROOT / "recipes" / name, ["train.cache_chunk_size=null"]), tokens)
        cached = RunShape.from_recipe(load_recipe(ROOT / "recipes" / name, [f"train.cache_chunk_size={chunk}"]), tokens)
        for strategy in ("ddp", "fsdp"):
            a, b = estimate(whole, strategy, gpus), estimate(cached, strategy, gpus)
            cells = [a.weights, a.gradients, a.optimizer, a.activations, a.total, b.activations, b.total]
            rows.append(f"| {name} | {strategy} | " + " | ".join(f"{value / GIB:.2f}" for value in cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the run (FSDP shards over all of them)")
    parser.add_argument("--tokens", type=int, default=512, help="content tokens per query and per candidate")
    parser.add_argument("--chunk", type=int, default=16, help="GradCache items per chunk for the second estimate")
    args = parser.parse_args()
    print(f"GiB per GPU, {args.gpus} GPUs, {args.tokens} content tokens per item\n")
    print(table(args.gpus, args.tokens, args.chunk))


if __name__ == "__main__":
    main()
