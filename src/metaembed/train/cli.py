"""``metaembed train RECIPE.yaml [section.key=value …] [--resume latest|DIR]``."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a MetaEmbed model (MMR loss, LoRA) from a YAML recipe",
        description=(
            "Train from a recipe (see recipes/). Overrides are section.key=value with YAML values, e.g. "
            "train.max_steps=100 loss.variant=nommr. Multi-GPU: torchrun --nproc-per-node N -m metaembed.cli train …"
        ),
    )
    parser.add_argument("recipe", help="recipe YAML file (recipes/tiny-cpu.yaml, recipes/metaembed-7b.yaml, …)")
    # REMAINDER so options may follow the overrides too; run() picks --resume/--quiet out of them
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="section.key=value overrides")
    parser.add_argument(
        "--resume", metavar="latest|DIR", default=None, help="continue from the newest checkpoint (or a given one)"
    )
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    parser.set_defaults(func=run, prepare_process=_prepare_process)


def _prepare_process() -> None:
    """Run by the ``metaembed`` command before anything else (not when ``main([...])`` is called as a library)."""
    from metaembed.train.memory import restart_with_huge_pages

    restart_with_huge_pages()  # large blocks on huge pages: far fewer page faults per step (train/memory.py)


def run(args: argparse.Namespace) -> int:
    import logging

    from metaembed.train.memory import limit_heap_fragmentation
    from metaembed.train.recipe import load_recipe
    from metaembed.train.trainer import MetaEmbedTrainer

    overrides, args = _split_options(list(args.overrides), args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "accelerate", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    recipe = load_recipe(args.recipe, overrides)
    limit_heap_fragmentation()  # resident memory otherwise grows for the whole run (train/memory.py)
    trainer = MetaEmbedTrainer(recipe)
    try:
        final = trainer.train(resume=args.resume)
    finally:
        trainer.close()
    if os.environ.get("RANK", "0") == "0":
        print(final)
    return 0


def _split_options(tokens: list[str], args: argparse.Namespace) -> tuple[list[str], argparse.Namespace]:
    from metaembed.train.loss import TrainConfigError

    overrides = []
    while tokens:
        token = tokens.pop(0)
        if token == "--quiet":
            args.quiet = True
        elif token == "--resume":
            if not tokens:
                raise TrainConfigError("--resume needs a value: latest or a checkpoint directory")
            args.resume = tokens.pop(0)
        elif token.startswith("--resume="):
            args.resume = token.split("=", 1)[1]
        elif token.startswith("-"):
            raise TrainConfigError(f"unknown option {token!r}; options: --resume latest|DIR, --quiet")
        else:
            overrides.append(token)
    return overrides, args
