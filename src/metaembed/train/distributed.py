"""Cross-rank helpers: a differentiable all-gather of candidate embeddings (queries stay local).

Each rank scores its own queries against the positives of every rank, as the reference trainer does
(``do_gather``). The gather must carry gradient back to the rank that produced each candidate: the
backward sums every rank's gradient for the whole gathered tensor (all-reduce) and keeps its own slice.
An all-reduce works on every backend (gloo has no reduce-scatter), so CPU tests and NCCL runs share it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = world()
        ctx.size = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``tensor`` concatenated along dim 0 (equal sizes per rank), and this rank's offset.

    Differentiable: the gradient of every rank's loss with respect to this rank's rows flows back here.
    With DDP averaging gradients over W ranks, each rank's loss being the mean over its local queries
    makes the result the gradient of the mean over all W·B queries (what one process on the global batch
    computes). Without a process group it returns the tensor unchanged.
    """
    rank, size = world()
    if size == 1:
        return tensor, 0
    return _GatherWithGrad.apply(tensor), rank * tensor.shape[0]
