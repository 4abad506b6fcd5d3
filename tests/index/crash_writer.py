"""A writer that a crash test SIGKILLs: it logs each operation before calling it and ACKs after it returns.

Usage: python crash_writer.py INDEX_DIR DTYPE RUN SEED. Output lines (flushed one by one):
``READY`` then repeatedly ``BEGIN add id,id,...`` / ``BEGIN delete id,...`` / ``BEGIN compact`` followed by ``ACK``.
"""

from __future__ import annotations

import random
import runpy
import sys
from pathlib import Path

import torch

from metaembed.index import create_index, open_index

item_embedding = runpy.run_path(str(Path(__file__).with_name("helpers.py")))["item_embedding"]
R, D = 16, 8


def main() -> None:
    path, dtype, run, seed = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = random.Random(seed)
    ix = open_index(path) if (path / "MANIFEST").exists() else create_index(path, D, R, dtype=dtype)
    live = list(ix.ids())
    print("READY", flush=True)
    counter = 0
    while True:
        roll = rng.random()
        if roll < 0.15 and live:
            victims = rng.sample(live, min(len(live), rng.randint(1, 5)))
            print("BEGIN delete " + ",".join(victims), flush=True)
            ix.delete(victims)
            live = [i for i in live if i not in set(victims)]
        elif roll < 0.2:
            print("BEGIN compact", flush=True)
            ix.compact()
        else:
            ids = [f"r{run}-{counter + j}" for j in range(rng.randint(1, 20))]
            counter += len(ids)
            batch = torch.stack([item_embedding(i, R, D) for i in ids])
            print("BEGIN add " + ",".join(ids), flush=True)
            ix.add(ids, batch, [{"id": i} for i in ids])
            live.extend(ids)
        print("ACK", flush=True)


if __name__ == "__main__":
    main()
