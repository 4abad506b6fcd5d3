"""Worker for the 2-process gloo tests (started by torchrun); also run in-process for the references.

Every rank builds the same tiny model (same seed), takes its shard of a fixed global batch, and runs the
MMR loss uncached and cached (GradCache, one item per chunk) in two set-ups:

- ``ddp``: full fine-tuning, the loss module wrapped in DDP;
- ``fsdp``: LoRA (random A and B, so every adapter tensor gets a gradient) with gradient checkpointing and
  a projection to 32 dimensions, the model sharded by ``metaembed.train.strategy.shard_model``;
- ``fsdp-bf16``: the same in bf16 — sharded: FSDP's bf16 weights and fp32 gradient reduction; one process:
  bf16 autocast, as an unsharded run computes.

Rank 0 writes, per set-up and mode, the loss (averaged over ranks) and the whole parameter gradients.
"""

from __future__ import annotations

import contextlib
import gc
import sys

import torch

QUERIES = ["a red bicycle", "two dogs on a beach", "quarterly revenue table", "a cat on a chair"]
POSITIVES = ["bike photo", "dogs running", "page 3 revenue", "cat sitting"]
NEGATIVES = ["a car", "a horse", "page 9 costs", "a chair"]
SETUPS = ("ddp", "fsdp", "fsdp-bf16")


def build(backbone: str, setup: str = "ddp"):
    from metaembed import MetaEmbedModel
    from metaembed.train.loss import MatryoshkaMultiVectorLoss

    torch.manual_seed(0)
    model = MetaEmbedModel.from_backbone(backbone, dim=32 if setup.startswith("fsdp") else None)
    if setup.startswith("fsdp"):
        model.add_lora(r=4, alpha=8, dropout=0.0, init_lora_weights=False)
        model.backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # gradient checkpointing acts in training mode only
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
    """Whole gradients (an FSDP shard is gathered: every rank calls this in the same order)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            grad = parameter.grad.detach()
            out[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).clone()
    return out


def run(backbone: str, setup: str = "ddp", rank: int = 0, world: int = 1) -> dict:
    import torch.distributed as dist

    from metaembed.train.strategy import shard_model

    model, loss_fn = build(backbone, setup)
    module, no_sync = loss_fn, None
    if world > 1 and setup == "ddp":
        module = torch.nn.parallel.DistributedDataParallel(loss_fn, find_unused_parameters=True)
        no_sync = module.no_sync
    elif world > 1:
        shard_model(model, "cpu", "bf16" if setup == "fsdp-bf16" else "no")
    out = {}
    for mode in ("uncached", "cached"):
        model.zero_grad(set_to_none=True)
        bf16_autocast = setup == "fsdp-bf16" and world == 1
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16_autocast else contextlib.nullcontext():
            loss = _loss_backward(module, loss_fn, model, mode, rank, world, no_sync)
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        out[mode] = {"loss": loss, "grads": grads(model)}
    del module, model, loss_fn
    gc.collect()  # free DDP's reducer / FSDP's state (reference cycles) while the process group still exists
    return out


def _loss_backward(module, loss_fn, model, mode: str, rank: int, world: int, no_sync) -> torch.Tensor:
    from metaembed.train.gradcache import cached_loss_backward

    if mode == "uncached":
        loss = module(shard_batch(model, rank, world, None))
        loss.backward()
        return loss.detach()
    batch = shard_batch(model, rank, world, 1)
    return cached_loss_backward(module, loss_fn, batch, device=torch.device("cpu"), no_sync=no_sync)


if __name__ == "__main__":
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = {setup: run(sys.argv[1], setup, dist.get_rank(), dist.get_world_size()) for setup in SETUPS}
    if dist.get_rank() == 0:
        torch.save(result, sys.argv[2])
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()
