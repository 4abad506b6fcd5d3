"""Worker for the 2-process gloo test (started by torchrun); also run in-process for the reference.

Every rank builds the same tiny model (same seed), takes its shard of a fixed global batch, and runs
the MMR loss uncached and cached (GradCache, one item per chunk) under DDP; rank 0 writes the loss
(averaged over ranks) and the parameter gradients.
"""

from __future__ import annotations

import gc
import sys

import torch

QUERIES = ["a red bicycle", "two dogs on a beach", "quarterly revenue table", "a cat on a chair"]
POSITIVES = ["bike photo", "dogs running", "page 3 revenue", "cat sitting"]
NEGATIVES = ["a car", "a horse", "page 9 costs", "a chair"]


def build(backbone: str):
    from metaembed import MetaEmbedModel
    from metaembed.train.loss import MatryoshkaMultiVectorLoss

    torch.manual_seed(0)
    model = MetaEmbedModel.from_backbone(backbone)
    return model, MatryoshkaMultiVectorLoss(model)


def shard_batch(model, rank: int, world: int, chunk: int | None):
    per = len(QUERIES) // world
    rows = slice(rank * per, (rank + 1) * per)
    queries, candidates = QUERIES[rows], POSITIVES[rows] + NEGATIVES[rows]
    size = chunk or len(candidates)
    return {
        "query": [model.processor(queries[i : i + size], "query") for i in range(0, len(queries), size)],
        "candidate": [model.processor(candidates[i : i + size], "candidate") for i in range(0, len(candidates), size)],
        "num_negatives": 1,
    }


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run(backbone: str, rank: int = 0, world: int = 1) -> dict:
    import torch.distributed as dist

    from metaembed.train.gradcache import cached_loss_backward

    model, loss_fn = build(backbone)
    module = loss_fn
    if world > 1:
        module = torch.nn.parallel.DistributedDataParallel(loss_fn, find_unused_parameters=True)
    out = {}
    for mode in ("uncached", "cached"):
        model.zero_grad(set_to_none=True)
        if mode == "uncached":
            loss = module(shard_batch(model, rank, world, None))
            loss.backward()
            loss = loss.detach()
        else:
            no_sync = module.no_sync if world > 1 else None
            batch = shard_batch(model, rank, world, 1)
            loss = cached_loss_backward(module, loss_fn, batch, device=torch.device("cpu"), no_sync=no_sync)
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        out[mode] = {"loss": loss, "grads": grads(model)}
    del module
    gc.collect()  # free DDP's reducer (it sits in reference cycles) while the process group still exists
    return out


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = run(sys.argv[1], dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        torch.save(result, sys.argv[2])
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()
