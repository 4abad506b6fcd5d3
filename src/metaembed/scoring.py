"""Exact budgeted MaxSim.

``score(q, c) = Σ_{i<r_q} max_{j<r_c} <q_i, c_j>`` — a sum over the first ``r_q`` query vectors of the
best match among the first ``r_c`` candidate vectors. Items are dense ``(R, D)`` tensors (no ragged
token lists, no masks), so scoring a chunk of candidates is one GEMM followed by a max and a sum.

Two entry points:

* :func:`maxsim` — inference: queries ``(nq, R_q, D)`` × candidates ``(N, R_c, D)`` → ``(nq, N)``,
  chunked over candidates so memory stays bounded; runs bf16 on the CPU's AMX units when the
  candidates are bf16. Falls back to the differentiable form when gradients are needed.
* :func:`token_similarities` + :func:`maxsim_from_similarities` — training: compute all token
  similarities once, then score any number of budgets by slicing (the MMR loss needs five).
"""

from __future__ import annotations

import torch

from metaembed.budget import Budget
from metaembed.errors import ShapeError

# Elements of the (chunk·r_c, nq·r_q) similarity block scored per step: 4M floats = 16 MB, small
# enough to stay in cache-friendly territory, large enough that GEMM call overhead is negligible.
_CHUNK_ELEMENTS = 1 << 22


def check_embeddings(tensor: torch.Tensor, name: str, num_vectors: int | None = None, dim: int | None = None) -> None:
    """Raise ShapeError unless ``tensor`` is a non-empty floating ``(n, R, D)`` batch (with R, D if given)."""
    if not isinstance(tensor, torch.Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor of shape (n, R, D), got {type(tensor).__name__}")
    if tensor.ndim != 3:
        raise ShapeError(f"{name} must have shape (n, R, D) (3 dims), got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ShapeError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if tensor.shape[0] == 0:
        raise ShapeError(f"{name} is empty: shape {tuple(tensor.shape)}; pass at least one item")
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise ShapeError(f"{name} has no vectors or no dimensions: shape {tuple(tensor.shape)}")
    if num_vectors is not None and tensor.shape[1] != num_vectors:
        raise ShapeError(f"{name} must have R = {num_vectors} vectors per item, got {tensor.shape[1]}")
    if dim is not None and tensor.shape[2] != dim:
        raise ShapeError(f"{name} must have D = {dim}, got {tensor.shape[2]}")


def _resolve(queries: torch.Tensor, candidates: torch.Tensor, budget: Budget | str | tuple | None) -> Budget:
    check_embeddings(queries, "queries")
    check_embeddings(candidates, "candidates", dim=queries.shape[2])
    if budget is None:
        return Budget(queries.shape[1], candidates.shape[1])
    return Budget.parse(budget).validate(queries.shape[1], candidates.shape[1])


def compute_dtype(candidates_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the GEMM runs in: the candidates' (they are the big operand), except fp16 on CPU.

    CPUs without AMX-FP16 run fp16 GEMMs no faster than fp32 and with fp16 rounding, so fp16 is
    widened to fp32 there; bf16 stays bf16 because AMX-BF16 makes it ~6× faster than fp32.
    """
    if candidates_dtype == torch.float16 and device.type == "cpu":
        return torch.float32
    return candidates_dtype


def maxsim(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    budget: Budget | str | tuple[int, int] | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Budgeted MaxSim scores of every query against every candidate.

    Args:
        queries: ``(nq, R_q, D)`` query embeddings.
        candidates: ``(N, R_c, D)`` candidate embeddings, same D and device.
        budget: ``(r_q, r_c)`` prefix lengths; ``None`` uses all vectors.
        chunk_size: candidates scored per step; default keeps the similarity block near 16 MB.

    Returns:
        ``(nq, N)`` float32 scores (float64 for float64 inputs). With bf16 candidates the GEMM output is bf16 (each dot
        product carries bf16 rounding, ~2⁻⁹ relative); the sum over query vectors is fp32.

    Example:
        >>> q, c = torch.randn(2, 16, 8), torch.randn(5, 64, 8)
        >>> maxsim(q, c, "4x8").shape
        torch.Size([2, 5])
    """
    budget = _resolve(queries, candidates, budget)
    q = queries[:, : budget.r_q]
    c = candidates[:, : budget.r_c]
    if torch.is_grad_enabled() and (q.requires_grad or c.requires_grad):
        scores = maxsim_from_similarities(token_similarities(q, c))
        return scores if scores.dtype == torch.float64 else scores.float()

    nq, r_q, dim = q.shape
    n, r_c = c.shape[0], c.shape[1]
    dtype = compute_dtype(c.dtype, c.device)
    q_matrix = q.reshape(nq * r_q, dim).to(dtype).T.contiguous()  # (D, nq·r_q)
    rows = chunk_size or max(1, _CHUNK_ELEMENTS // (r_c * nq * r_q))
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scores = torch.empty(n, nq, dtype=out_dtype, device=q.device)
    for start in range(0, n, rows):
        block = c[start : start + rows].to(dtype)
        sims = block.reshape(-1, dim) @ q_matrix  # (rows·r_c, nq·r_q)
        best = sims.view(block.shape[0], r_c, nq, r_q).amax(dim=1)  # (rows, nq, r_q)
        torch.sum(best, dim=-1, dtype=out_dtype, out=scores[start : start + rows])
    return scores.T.contiguous()


def token_similarities(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """All vector-pair dot products ``(nq, N, R_q, R_c)``; differentiable. Slice it per budget."""
    check_embeddings(queries, "queries")
    check_embeddings(candidates, "candidates", dim=queries.shape[2])
    return torch.einsum("qid,njd->qnij", queries, candidates)


def maxsim_from_similarities(similarities: torch.Tensor, budget: Budget | str | tuple | None = None) -> torch.Tensor:
    """MaxSim scores ``(..., )`` from token similarities ``(..., R_q, R_c)`` at a budget; differentiable."""
    if similarities.ndim < 2:
        raise ShapeError(f"similarities must end in (R_q, R_c), got shape {tuple(similarities.shape)}")
    if budget is not None:
        budget = Budget.parse(budget).validate(similarities.shape[-2], similarities.shape[-1])
        similarities = similarities[..., : budget.r_q, : budget.r_c]
    return similarities.amax(dim=-1).sum(dim=-1)
