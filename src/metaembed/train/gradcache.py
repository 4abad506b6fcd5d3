"""Cached mini-batches (GradCache, Gao et al. 2021): a large contrastive batch in bounded memory.

1. Embed every chunk without a graph (recording the RNG state each chunk saw).
2. Compute the loss on the detached embeddings and backpropagate to them only: the embedding gradients.
3. Re-run each chunk with a graph under its recorded RNG state (so dropout repeats exactly) and
   backpropagate ``<embedding, its gradient>``: parameter gradients equal the uncached loss's.

Memory holds one chunk's activations at a time, plus the embeddings of the whole batch. Under DDP all
chunks but the last run in ``no_sync`` so gradients are all-reduced once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch


class RandState:
    """The CPU (and current accelerator) RNG state at creation; ``with state:`` replays it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def cached_loss_backward(
    module: torch.nn.Module,
    loss_fn,
    batch: dict,
    *,
    device: torch.device,
    backward: Callable[[torch.Tensor], None] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Run forward + backward of the MMR loss chunk by chunk; returns the (detached) loss.

    Args:
        module: what embeds a chunk: ``module(inputs, side)`` — the (possibly DDP-wrapped)
            :class:`~metaembed.train.loss.MatryoshkaMultiVectorLoss`.
        loss_fn: the unwrapped loss (its ``compute`` turns embeddings into the loss).
        batch: ``{"query": [chunks], "candidate": [chunks], "num_negatives": k, "negative_mask": …}``.
        backward: how to backpropagate a scalar (``accelerator.backward``); default ``Tensor.backward``.
        no_sync: a context manager factory suppressing DDP gradient sync (``accelerator.no_sync``-like).
    """
    backward = backward or (lambda tensor: tensor.backward())
    plan: list[tuple[str, dict, RandState]] = []
    embeddings: dict[str, list[torch.Tensor]] = {"query": [], "candidate": []}
    with torch.no_grad():
        for side in ("query", "candidate"):
            for chunk in _chunks(batch[side]):
                state = RandState(device)
                embeddings[side].append(module(chunk, side))
                plan.append((side, chunk, state))
    detached = {side: torch.cat(parts).detach().requires_grad_() for side, parts in embeddings.items()}
    loss = loss_fn.compute(
        detached["query"], detached["candidate"], batch.get("num_negatives", 0), batch.get("negative_mask")
    )
    loss.backward()  # to the embeddings only (they are leaves); no parameter is touched here
    grads = {side: tensor.grad.split([part.shape[0] for part in embeddings[side]]) for side, tensor in detached.items()}
    position = {"query": 0, "candidate": 0}
    for i, (side, chunk, state) in enumerate(plan):
        grad = grads[side][position[side]]
        position[side] += 1
        sync = contextlib.nullcontext() if (no_sync is None or i == len(plan) - 1) else no_sync()
        with sync, state.replay():
            chunk_embeddings = module(chunk, side)
            backward((chunk_embeddings * grad).sum())
    return loss.detach()


def _chunks(inputs: dict | Sequence[dict]) -> Sequence[dict]:
    return [inputs] if isinstance(inputs, dict) else inputs
