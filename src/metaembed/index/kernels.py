"""Exact MaxSim over a prefix-grouped ("vector-major") candidate layout.

An index stores candidate vectors in groups of consecutive vector positions — by default [0,1), [1,4),
[4,8), [8,16), [16,64) — each group one contiguous ``(N, n_g, D)`` array, so a budget ``r_c`` reads only
the groups that hold its first ``r_c`` vectors. int8 groups carry a per-vector fp32 scale ``(N, n_g)``.

Scoring runs on :func:`metaembed.scoring.score_blocks`: per chunk of items, one GEMM per group into a reused
buffer, the max over the group's vectors in place, a running best across groups, the sum over query vectors
straight into the output. bf16 groups, and int8 groups with their scales, on an AVX512-BF16 / -VNNI CPU go to the
fused kernel instead (bf16: fp32 accumulation; int8: exact integer dot products against the query quantised like the
codes; batch-independent; :mod:`metaembed.fused`). Elsewhere int8 groups are widened to fp32 inside a
cache-resident buffer against the same quantised query and their scales applied to the similarities, so both engines
score int8 the same up to fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metaembed.budget import Budget
from metaembed.errors import ShapeError
from metaembed.scoring import check_embeddings, score_blocks


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
    n = groups[0].shape[0]
    stored = sum(g.shape[1] for g in groups)
    budget.validate(queries.shape[1], stored)
    scales = list(scales) if scales is not None else [None] * len(groups)
    if len(scales) != len(groups):
        raise ShapeError(f"got {len(scales)} scale entries for {len(groups)} groups")
    for i, group in enumerate(groups):
        if group.ndim != 3 or group.shape[0] != n or group.shape[2] != queries.shape[2]:
            raise ShapeError(f"group {i} must be (N={n}, n_g, D={queries.shape[2]}), got {tuple(group.shape)}")

    blocks = []
    start = 0
    for group, scale in zip(groups, scales, strict=True):
        take = min(group.shape[1], budget.r_c - start)
        if take <= 0:
            break
        if scale is not None and tuple(scale.shape[:2]) != (n, group.shape[1]):
            raise ShapeError(
                f"scale of a (N={n}, {group.shape[1]}, D) group must be (N, {group.shape[1]}), got {tuple(scale.shape)}"
            )
        if take < group.shape[1]:  # a whole group is passed as it is: a view per call is dispatch time, no work
            group, scale = group[:, :take], None if scale is None else scale[:, :take]
        blocks.append((group, scale))
        start += group.shape[1]
    if budget.r_q < queries.shape[1]:
        queries = queries[:, : budget.r_q]
    with torch.no_grad():
        return score_blocks(queries, blocks, chunk_size=chunk_size).float()
