"""Exact MaxSim over a prefix-grouped ("vector-major") candidate layout.

An index stores candidate vectors in groups of consecutive vector positions — by default [0,1), [1,4),
[4,8), [8,16), [16,64) — each group one contiguous ``(N, n_g, D)`` array, so a budget ``r_c`` reads only
the groups that hold its first ``r_c`` vectors. int8 groups carry a per-vector fp32 scale ``(N, n_g)``.

This is the reference implementation (correct, chunked, simple); faster kernels must keep its
signature and match it in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metaembed.budget import Budget
from metaembed.errors import ShapeError
from metaembed.scoring import check_embeddings, compute_dtype

_CHUNK_ELEMENTS = 1 << 22


def maxsim_grouped(
    queries: torch.Tensor,
    groups: Sequence[torch.Tensor],
    budget: Budget,
    scales: Sequence[torch.Tensor | None] | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """MaxSim of ``queries (nq, R_q, D)`` against candidates stored as consecutive vector groups.

    Args:
        queries: query embeddings; the first ``budget.r_q`` vectors are used.
        groups: ``groups[g]`` is ``(N, n_g, D)``; together they hold vectors 0..Σn_g of every item, in order.
        budget: ``(r_q, r_c)``; the first ``r_c`` stored vectors take part.
        scales: per-group ``(N, n_g)`` dequantisation scales for int8 groups (``None`` entries elsewhere).

    Returns:
        ``(nq, N)`` float32 scores, equal to ``maxsim(queries, concat(groups, dim=1), budget)``.
    """
    if not groups:
        raise ShapeError("groups is empty: an index stores at least one vector group")
    check_embeddings(queries, "queries")
    n, dim = groups[0].shape[0], groups[0].shape[2]
    stored = sum(g.shape[1] for g in groups)
    budget.validate(queries.shape[1], stored)
    scales = list(scales) if scales is not None else [None] * len(groups)
    if len(scales) != len(groups):
        raise ShapeError(f"got {len(scales)} scale entries for {len(groups)} groups")
    for i, group in enumerate(groups):
        if group.ndim != 3 or group.shape[0] != n or group.shape[2] != queries.shape[2]:
            raise ShapeError(f"group {i} must be (N={n}, n_g, D={queries.shape[2]}), got {tuple(group.shape)}")

    q = queries[:, : budget.r_q]
    nq, r_q = q.shape[0], q.shape[1]
    best = torch.full((n, nq, r_q), float("-inf"), dtype=torch.float32, device=q.device)
    start = 0
    for group, scale in zip(groups, scales, strict=True):
        take = min(group.shape[1], budget.r_c - start)
        if take <= 0:
            break
        dtype = torch.float32 if group.dtype == torch.int8 else compute_dtype(group.dtype, group.device)
        q_matrix = q.reshape(nq * r_q, dim).to(dtype).T.contiguous()
        rows = chunk_size or max(1, _CHUNK_ELEMENTS // (take * nq * r_q))
        for lo in range(0, n, rows):
            block = group[lo : lo + rows, :take].to(dtype)
            if scale is not None:
                block = block * scale[lo : lo + rows, :take, None].to(dtype)
            sims = (block.reshape(-1, dim) @ q_matrix).view(block.shape[0], take, nq, r_q).amax(dim=1)
            torch.maximum(best[lo : lo + rows], sims.float(), out=best[lo : lo + rows])
        start += group.shape[1]
    return best.sum(dim=-1).T.contiguous()
