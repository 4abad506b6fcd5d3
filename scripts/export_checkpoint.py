"""Write a training checkpoint (``RUN/checkpoint-N``, of a DDP or an FSDP run) as a loadable model directory,
e.g. to evaluate a run stopped before its end:  python scripts/export_checkpoint.py runs/NAME 200 runs/NAME/step-200"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from metaembed.train.build import trained_model
from metaembed.train.recipe import load_recipe
from metaembed.train.trainer import TRAINABLE_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run's output_dir (holds recipe.yaml and checkpoint-N/)")
    parser.add_argument("step", type=int)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    saved = load_file(args.run / f"checkpoint-{args.step}" / TRAINABLE_FILE)
    model = trained_model(load_recipe(args.run / "recipe.yaml"), args.run, saved)
    print(f"wrote {model.save_pretrained(args.out)} ({len(saved)} trained tensors from step {args.step})")


if __name__ == "__main__":
    main()
