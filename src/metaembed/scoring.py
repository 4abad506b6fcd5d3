"""Exact budgeted MaxSim.

``score(q, c) = Σ_{i<r_q} max_{j<r_c} <q_i, c_j>`` — a sum over the first ``r_q`` query vectors of the
best match among the first ``r_c`` candidate vectors. Items are dense ``(R, D)`` tensors (no ragged
token lists, no masks), so scoring a chunk of candidates is one GEMM followed by a max and a sum.

Two entry points:

* :func:`maxsim` — inference: queries ``(nq, R_q, D)`` × candidates ``(N, R_c, D)`` → ``(nq, N)``,
  chunked over candidates so memory stays bounded; bf16 and int8 candidates run on the fused kernel where the CPU
  has AVX512-BF16 and -VNNI (:mod:`metaembed.fused`). Falls back to the differentiable form when gradients are
  needed.
* :func:`token_similarities` + :func:`maxsim_from_similarities` — training: compute all token
  similarities once, then score any number of budgets by slicing (the MMR loss needs five).

:func:`maxsim_reference` is the definition written plainly in float64: the oracle every fast path (this
engine, the fused kernel, the index, two-stage search, evaluation, the service) is tested against.
"""

from __future__ import annotations

import torch

from metaembed import fused
from metaembed.budget import Budget
from metaembed.errors import ShapeError
from metaembed.quantize import round_trip_int8

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
    """The dtype the GEMM engine computes in: the candidates' (the big operand), widened where it must be.

    On CPU, bf16 and fp16 are widened to fp32 (chunk by chunk, in a cache-resident buffer): a torch bf16 GEMM
    rounds every dot product to bf16 (and oneDNN picks its blocking by shape), so a query's scores would change
    with the number of queries sharing the call. One-query and batch bf16 scoring normally runs on the fused
    kernel (:mod:`metaembed.fused`) instead; this widening is the fallback where it is not built or the CPU
    lacks AVX512-BF16 / -VNNI. On CUDA bf16 stays bf16 (cuBLAS rounds each dot product to bf16).
    """
    if device.type == "cpu" and candidates_dtype in (torch.float16, torch.bfloat16):
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
        chunk_size: candidates scored per step; default keeps each step's similarity block cache-sized.

    Returns:
        ``(nq, N)`` float32 scores (float64 for float64 inputs). With bf16 candidates the queries are rounded to bf16
        and every dot product is accumulated in fp32 on CPU, so a query's scores do not depend on how many queries
        share the call (:func:`score_blocks` says how exactly, per engine).

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
    with torch.no_grad():
        return score_blocks(q, [(c, None)], chunk_size=chunk_size)


# Candidate vectors per step: 32k vectors (24 MB of bf16 at D = 384) amortise the per-call cost of a GEMM
# while the step's similarity block (query vectors × 32k) stays cache-sized for one query.
_TARGET_VECTORS = 1 << 15
# Bytes of a chunk widened to the compute dtype (int8, and bf16 / fp16 on CPU, → fp32): 4 MiB stays in cache
# (L2 + a slice of L3) while keeping per-call overhead small (the sizes tried: docs/kernels.md).
_WIDEN_BYTES = 1 << 22


def score_blocks(
    queries: torch.Tensor,
    blocks: list[tuple[torch.Tensor, torch.Tensor | None]],
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The exact MaxSim engine behind :func:`maxsim` and ``maxsim_grouped``.

    ``queries (nq, r_q, D)`` are all used; ``blocks`` is a list of ``(vectors (N, t_b, D), scale (N, t_b) | None)``
    that together hold each candidate's first ``Σ t_b`` vectors, in order (int8 blocks carry a per-vector scale).
    Returns float32 scores (float64 when a block is float64). No input checks here.

    Queries are scored as the candidates are stored: rounded to bf16 against bf16 blocks, quantised per vector to
    int8 against int8 blocks with scales (:mod:`metaembed.quantize`), in every engine. bf16 blocks, or int8 blocks
    with their scales, on a CPU with AVX512-BF16 and -VNNI go to the fused kernel (:mod:`metaembed.fused`): every
    dot product is accumulated in the same order whatever the batch (int8: exactly, in integers), so a query's
    scores are bit-identical alone and inside any batch. Everything else runs torch GEMMs: candidates in row
    chunks; within a chunk every block runs one GEMM into a preallocated buffer, the max over its vectors is taken
    in place and folded into a running best, and the sum over query vectors goes straight into the ``(nq, N)``
    output. bf16 / fp16 (CPU)
    and int8 chunks are widened to fp32 inside a reused, cache-resident buffer, so these scores are fp32 dot products
    too: equal between batch sizes within fp32 rounding (~1e-6 relative), top-k identical except for items whose
    scores tie that closely.
    On CUDA, bf16 GEMMs round each dot product to bf16 and carry no such guarantee.
    """
    if fused.supports(queries, blocks):
        return fused.fused_scores(queries, blocks)
    nq, r_q, dim = queries.shape
    n = blocks[0][0].shape[0]
    device = queries.device
    dtypes = [torch.float32 if v.dtype == torch.int8 else compute_dtype(v.dtype, device) for v, _ in blocks]
    best_dtype = dtypes[0] if len(set(dtypes)) == 1 else torch.float32
    out_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    m = nq * r_q
    flat_queries = queries.reshape(m, dim)
    # queries as each block's GEMM reads them: against bf16 blocks rounded to bf16, against int8 codes with scales
    # (an index's) quantised to int8 per vector (metaembed.quantize), as the fused kernel reads them
    q_of = {}
    for (v, scale), dt in zip(blocks, dtypes, strict=True):
        key = (v.dtype, dt, scale is not None)
        if key in q_of:  # blocks of one kind share their queries (an index has up to five groups)
            continue
        if v.dtype == torch.int8 and scale is not None:
            q_of[key] = round_trip_int8(flat_queries).to(dt).contiguous()
        else:
            rounded = flat_queries.to(torch.bfloat16) if v.dtype == torch.bfloat16 else flat_queries
            q_of[key] = rounded.to(dt).contiguous()
    total = sum(v.shape[1] for v, _ in blocks)
    widest = max(v.shape[1] for v, _ in blocks)
    rows = chunk_size or max(1, min(_TARGET_VECTORS // total, _CHUNK_ELEMENTS // (m * widest)))
    widened = [v.shape[1] * dt.itemsize for (v, _), dt in zip(blocks, dtypes, strict=True) if v.dtype != dt]
    if widened and chunk_size is None:
        # keep the widened copy of a chunk in cache: spilling it to DRAM costs more traffic than the narrow read
        rows = min(rows, max(1, _WIDEN_BYTES // (max(widened) * dim)))
    rows = min(rows, n)
    scores = torch.empty(nq, n, dtype=out_dtype, device=device)
    # Reused buffers: the similarity block per dtype, the running best, widening buffers.
    sims_buf: dict[torch.dtype, torch.Tensor] = {}
    wide_buf: dict[torch.dtype, torch.Tensor] = {}
    best_buf = torch.empty(m * rows, dtype=best_dtype, device=device)
    tmp_buf = torch.empty(m * rows, dtype=best_dtype, device=device) if len(blocks) > 1 else None
    for dt in set(dtypes):
        sims_buf[dt] = torch.empty(m * rows * widest, dtype=dt, device=device)
    for (vectors, _), dt in zip(blocks, dtypes, strict=True):
        if vectors.dtype != dt and dt not in wide_buf:
            wide_buf[dt] = torch.empty(rows * widest * dim, dtype=dt, device=device)

    for lo in range(0, n, rows):
        k = min(rows, n - lo)
        best = best_buf[: m * k].view(k, m)
        for b, ((vectors, scale), dt) in enumerate(zip(blocks, dtypes, strict=True)):
            t = vectors.shape[1]
            flat = vectors[lo : lo + k].reshape(k * t, dim)
            if flat.dtype != dt:
                flat = wide_buf[dt][: k * t * dim].view(k * t, dim).copy_(flat)
            target = best if b == 0 else tmp_buf[: m * k].view(k, m)
            # one vector per candidate in this block: the GEMM writes straight into the running best
            direct = t == 1 and dt == best_dtype
            sims = target if direct else sims_buf[dt][: m * k * t].view(k * t, m)
            torch.matmul(flat, q_of[(vectors.dtype, dt, scale is not None)].T, out=sims)
            if scale is not None:
                sims.mul_(scale[lo : lo + k].reshape(k * t, 1).to(dt))
            # candidates on the left: the max over a candidate's vectors is an elementwise max of contiguous rows
            grouped = sims.view(k, t, m)
            if direct:
                pass
            elif t == 1:
                target.copy_(grouped.squeeze(1))
            elif dt == best_dtype:
                torch.amax(grouped, dim=1, out=target)
            else:
                target.copy_(grouped.amax(dim=1))
            if b > 0:
                torch.maximum(best, target, out=best)
        scores[:, lo : lo + k] = best.view(k, nq, r_q).sum(dim=2, dtype=out_dtype).T
    return scores


def maxsim_reference(
    queries: torch.Tensor, candidates: torch.Tensor, budget: Budget | str | tuple[int, int] | None = None
) -> torch.Tensor:
    """``Σ_{i<r_q} max_{j<r_c} <q_i, c_j>`` in float64 with one einsum — slow, obviously correct, for tests.

    Shares no code with :func:`maxsim` (no chunking, no fused kernel, no dtype policy), so a bug there
    cannot hide in the expected values. Returns ``(nq, N)`` float64.
    """
    if budget is None:
        r_q, r_c = queries.shape[1], candidates.shape[1]
    else:
        budget = Budget.parse(budget)
        r_q, r_c = budget.r_q, budget.r_c
    q, c = queries[:, :r_q].double(), candidates[:, :r_c].double()
    return torch.einsum("qid,njd->qnij", q, c).amax(dim=3).sum(dim=2)


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
