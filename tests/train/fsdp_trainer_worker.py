"""Worker for the FSDP trainer tests (torchrun, 2 gloo processes): the tiny recipe under ``train.strategy=fsdp``
stopped after 2 of 4 steps and resumed, then the model's encodings computed while it is still sharded.

Rank 0 writes the resumed run's loss history, its whole trainable tensors and the encodings of ``QUERIES`` and
``CANDIDATES``. The uninterrupted run it is compared with is the same recipe through ``accelerate launch``.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[2]
RECIPE = ROOT / "recipes" / "tiny-cpu.yaml"
QUERIES = ["a red circle", "Find me an image of a blue square."]
CANDIDATES = [{"image": ROOT / "recipes" / "data" / "shapes" / "images" / "red_circle.png"}, "a green triangle"]


def overrides(backbone: str, output_dir: Path) -> list[str]:
    """The FSDP run of the tests: LoRA with dropout (per-rank RNG state matters on resume), gradient
    checkpointing and GradCache chunks, four steps with a checkpoint every two."""
    datasets = json.dumps(
        [
            {
                "path": str(RECIPE.parent / "data" / "shapes" / f"shapes_{task}.jsonl"),
                "image_root": str(RECIPE.parent / "data" / "shapes"),
            }
            for task in ("t2i", "i2t")
        ]
    )
    return [
        f"model.backbone={backbone}",
        f"train.output_dir={output_dir}",
        f"data.datasets={datasets}",
        "train.strategy=fsdp",
        "train.gradient_checkpointing=true",
        "train.cache_chunk_size=4",
        "lora.dropout=0.1",
        "train.max_steps=4",
        "train.save_steps=2",
        "train.log_steps=1",
    ]


def main(backbone: str, output_dir: Path, result: Path) -> None:
    from metaembed.train.recipe import load_recipe
    from metaembed.train.trainer import MetaEmbedTrainer

    recipe = load_recipe(RECIPE, overrides(backbone, output_dir))
    first = MetaEmbedTrainer(recipe)
    first.train(stop_after=2)
    del first
    gc.collect()  # free the first run's FSDP state while the process group is alive
    trainer = MetaEmbedTrainer(recipe)
    trainer.train(resume="latest")
    trainable = trainer.strategy.full_tensors(trainer.trainable)
    encodings = {
        "query": trainer.model.encode_queries(QUERIES),  # a sharded model: every rank encodes the same items
        "candidate": trainer.model.encode_candidates(CANDIDATES),
    }
    if trainer.accelerator.is_main_process:
        losses = [row["loss"] for row in trainer.history]
        torch.save({"losses": losses, "trainable": trainable, "encodings": encodings}, result)
    trainer.accelerator.wait_for_everyone()
    trainer.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
