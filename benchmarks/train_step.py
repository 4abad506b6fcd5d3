"""Seconds per training step and peak memory: tiny recipe, 'small' (mini backbone) and gemma-mini configs.

Each (config, mode) runs in its own process (a clean peak-RSS reading) through the real trainer step:
data draw + collate + forward + MMR loss + backward + AdamW. Modes: fp32; bf16 autocast (AMX on recent
Xeons); cached (bf16 + GradCache chunks of 8); gc (bf16 + gradient checkpointing). Prints a table and
each mode's time ratio to fp32 of the same config. Timings on a shared machine are noisy: it reports the
median and the min-max spread over the measured steps. ``--encode N`` also times ``encode`` (batches of 32,
eval mode, in the mode's precision) on N text queries and N distinct images as candidates (so the vision
tower runs for each image), after the training steps. The gemma configs need the ``gemma`` extra.

    PYTHONPATH=src python benchmarks/train_step.py                    # tiny and small, all modes
    PYTHONPATH=src python benchmarks/train_step.py --configs small --modes bf16 --steps 5 --threads 2
    PYTHONPATH=src python benchmarks/train_step.py --configs gemma-own gemma-own-256 --modes bf16 --encode 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny-cpu.yaml"
SHAPES = ROOT / "recipes" / "data" / "shapes"
GEMMA = ["train.batch_size=32", "lora.r=16", "lora.alpha=32", "model.meta_layout=own", "model.max_text_tokens=64"]
CONFIGS = {
    "tiny": ["train.batch_size=4"],
    "small": ["model.backbone=mini", "train.batch_size=32", "lora.r=16", "lora.alpha=16"],
    "small-own": ["model.backbone=mini", "train.batch_size=32", "lora.r=16", "lora.alpha=16", "model.meta_layout=own"],
    # Gemma 3 270M decoder with recipes/gemma-mini.yaml's settings, 128 and 256 px images
    "gemma-own": ["model.backbone=gemma-mini:128", *GEMMA],
    "gemma-own-256": ["model.backbone=gemma-mini:256", *GEMMA],
}
MODES = {
    "fp32": ["train.mixed_precision=no"],
    "bf16": ["train.mixed_precision=bf16"],
    "cached": ["train.mixed_precision=bf16", "train.cache_chunk_size=8"],
    "gc": ["train.mixed_precision=bf16", "train.gradient_checkpointing=true"],
}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _encode_rates(model, count: int, bf16: bool) -> tuple[float, float]:
    """Items per second for ``count`` text queries and ``count`` distinct noise images as candidates."""
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    texts = [f"Find me an everyday image of shape number {i} in a warm colour." for i in range(count)]
    images = [
        Image.fromarray(torch.randint(0, 256, (96, 96, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(count)
    ]
    rates = []
    for items, side in ((texts, "query"), (images, "candidate")):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            start = time.perf_counter()
            model.encode(items, side, batch_size=32)
            rates.append(count / (time.perf_counter() - start))
    return rates[0], rates[1]


def run_one(config: str, mode: str, steps: int, threads: int, encode: int = 0) -> dict:
    import torch

    from metaembed.train.recipe import load_recipe
    from metaembed.train.trainer import MetaEmbedTrainer

    torch.set_num_threads(threads)
    datasets = json.dumps(
        [
            {"name": "t2i", "path": str(SHAPES / "shapes_t2i.jsonl"), "image_root": str(SHAPES)},
            {"name": "i2t", "path": str(SHAPES / "shapes_i2t.jsonl"), "image_root": str(SHAPES)},
        ]
    )
    with tempfile.TemporaryDirectory() as out:
        recipe = load_recipe(
            RECIPE,
            [
                f"train.output_dir={out}",
                f"data.datasets={datasets}",
                f"train.threads={threads}",
                "lora.dropout=0.0",
                *CONFIGS[config],
                *MODES[mode],
            ],
        )
        trainer = MetaEmbedTrainer(recipe)
        trainer.module.train()
        before = _rss_mib()
        trainer._train_step()  # warm-up: image feature cache, allocator, oneDNN kernels
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer._train_step()
            times.append(time.perf_counter() - start)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rates = _encode_rates(trainer.model, encode, mode != "fp32") if encode else (float("nan"),) * 2
    return {
        "config": config,
        "mode": mode,
        "batch": recipe.train.batch_size,
        "s_per_step": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "peak_rss_mib": round(peak),
        "train_rss_mib": round(peak - before),
        "encode_queries_per_s": rates[0],
        "encode_candidates_per_s": rates[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encode", type=int, default=0, metavar="N", help="also time encode on N items per side")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.steps, args.threads, args.encode)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    load = os.getloadavg()[0]
    print(
        f"# {os.cpu_count()} CPUs, load average {load:.1f} at start, {args.threads} torch thread(s), "
        f"{args.steps} measured steps after 1 warm-up"
    )
    print(
        f"{'config':<13} {'mode':<7} {'batch':>5} {'s/step':>8} {'min-max':>13} {'vs fp32':>7} "
        f"{'peak RSS MiB':>12} {'train MiB':>9}" + ("  encode q/s  c/s" if args.encode else "")
    )
    for config in args.configs:
        base = None
        for mode in args.modes:
            done = subprocess.run(
                [sys.executable, __file__, "--one", config, mode, "--steps", str(args.steps),
                 "--threads", str(args.threads), "--encode", str(args.encode)],
                env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode:
                print(f"{config:<13} {mode:<7} FAILED: {done.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            base = row["s_per_step"] if mode == "fp32" else base
            ratio = f"{row['s_per_step'] / base:.2f}" if base else "–"
            print(f"{config:<13} {mode:<7} {row['batch']:>5} {row['s_per_step']:>8.2f} "
                  f"{row['min']:>6.2f}-{row['max']:<6.2f} {ratio:>7} {row['peak_rss_mib']:>12} "
                  f"{row['train_rss_mib']:>9}" + (f"  {row['encode_queries_per_s']:>10.1f} "
                  f"{row['encode_candidates_per_s']:>4.1f}" if args.encode else ""), flush=True)  # fmt: skip
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
