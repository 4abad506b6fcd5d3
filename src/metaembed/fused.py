"""The fused MaxSim kernel (``_fused_maxsim.c``): used when it was built and the CPU runs AVX512-BF16 and -VNNI.

It reads every candidate vector once and folds its dot products with all query vectors into a running max per
item — no similarity block is written and read back — so one query streams the index near memory bandwidth,
where library GEMMs with a 1-16 column side reach a fraction of it.

Accuracy, per candidate dtype:

* bf16: the query is rounded to bf16 and every dot product accumulated in fp32 (the GEMM path on CUDA rounds each
  one to bf16).
* int8 (codes with a per-vector scale, as the index stores them): each query vector is quantised the same way
  (``scale = max|q| / 127``, :func:`metaembed.quantize.quantize_int8`) and the dot products of the codes are exact
  integers, scaled in fp32. Against the dequantised candidates the error of a dot product is at most
  ``scale_q / 2 · Σ|c|`` — the query's rounding — and ranking quality is measured in docs/kernels.md. Half the
  bytes of bf16 and twice the multiply-adds per instruction, so int8 scores faster than bf16 at every budget.

:func:`score_blocks` in :mod:`metaembed.scoring` calls :func:`fused_scores` when :func:`supports` says the
inputs fit; set ``METAEMBED_FUSED=0`` to score with torch GEMMs only (the benchmarks compare the two).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from metaembed.native import load_library
from metaembed.quantize import quantize_int8

# Query vectors one kernel call takes (its running maxima must fit its buffer); larger batches are scored in
# groups of whole queries, which changes nothing in any query's scores (each dot product is accumulated alone).
MAX_QUERY_VECTORS = 1024
# Item × query-vector pairs per thread below which splitting the work across threads costs more than it saves
# (4,096 items for one query vector; a batch of 32 × 16 query vectors splits from 8 items per thread).
_MIN_PAIRS_PER_THREAD = 4096

_p = ctypes.c_void_p
_i64 = ctypes.c_int64


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = load_library("metaembed._fused_maxsim")
    if lib is None or not lib.metaembed_fused_supported():
        return None
    lib.metaembed_maxsim_bf16.restype = ctypes.c_int
    lib.metaembed_maxsim_bf16.argtypes = [_p, _i64, _i64, _i64, _i64, _p, _p, _p, _i64, _i64, _p, _i64]
    lib.metaembed_maxsim_bf16_rows.restype = ctypes.c_int
    lib.metaembed_maxsim_bf16_rows.argtypes = [_p, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _i64, _i64, _p, _i64]
    lib.metaembed_maxsim_int8.restype = ctypes.c_int
    # queries, their offsets and scales; nq, r_q, dim, nblocks; bases, scale bases, takes, strides, scale strides,
    # row list; lo, hi; scores, n
    lib.metaembed_maxsim_int8.argtypes = [_p, _p, _p, *[_i64] * 4, *[_p] * 6, _i64, _i64, _p, _i64]
    return lib


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="metaembed-maxsim")


# A forked child inherits the pool object but not its threads: it must start its own.
os.register_at_fork(after_in_child=_pool.cache_clear)


def available() -> bool:
    """True when the kernel is built, this CPU runs AVX512-BF16 and -VNNI, and ``METAEMBED_FUSED`` is not ``0``."""
    return os.environ.get("METAEMBED_FUSED", "1") != "0" and _library() is not None


@contextlib.contextmanager
def disabled():
    """Score with torch GEMMs inside the block (sets ``METAEMBED_FUSED=0`` for the process; for benchmarks)."""
    saved = os.environ.get("METAEMBED_FUSED")
    os.environ["METAEMBED_FUSED"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["METAEMBED_FUSED"]
        else:
            os.environ["METAEMBED_FUSED"] = saved


def status() -> str:
    """One line on whether scoring uses the kernel, and why not."""
    if importlib.util.find_spec("metaembed._fused_maxsim") is None:
        return "not built (no C compiler at install time?): scoring uses torch GEMMs"
    if _library() is None:
        return "built, but this CPU lacks AVX512-BF16 or AVX512-VNNI: scoring uses torch GEMMs"
    if not available():
        return "switched off by METAEMBED_FUSED=0"
    return "in use (AVX512-BF16, AVX512-VNNI)"


def _kind(blocks: list[tuple[torch.Tensor, torch.Tensor | None]]) -> str | None:
    """``"bf16"`` (bf16 blocks, no scales) or ``"int8"`` (int8 blocks, each with its fp32 ``(N, t)`` scales) on the
    CPU, each item's vectors rows of D contiguous values (items may lie any stride apart): the layouts the kernel
    reads. None for anything else."""
    kinds = set()
    for vectors, scale in blocks:
        if vectors.device.type != "cpu" or vectors.stride(2) != 1:
            return None
        if vectors.shape[1] > 1 and vectors.stride(1) != vectors.shape[2]:
            return None
        if vectors.dtype == torch.bfloat16 and scale is None:
            kinds.add("bf16")
        elif vectors.dtype == torch.int8 and _readable_scale(scale, vectors):
            kinds.add("int8")
        else:
            return None
    return kinds.pop() if len(kinds) == 1 else None


def _readable_scale(scale: torch.Tensor | None, vectors: torch.Tensor) -> bool:
    return (
        scale is not None
        and scale.dtype == torch.float32
        and scale.device.type == "cpu"
        and tuple(scale.shape) == tuple(vectors.shape[:2])
        and (scale.shape[1] == 1 or scale.stride(1) == 1)
    )


def supports(queries: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor | None]] | Blocks) -> bool:
    """Whether :func:`fused_scores` takes these inputs and is the faster path for them.

    Candidate blocks on the CPU, all bf16 without scales or all int8 with their per-vector scales, each item's
    vectors rows of D contiguous values (items may lie any stride apart), and at most :data:`MAX_QUERY_VECTORS`
    vectors per query. Any number of queries: the kernel gives every query the same scores alone and in a batch, so
    all bf16 and int8 CPU scoring goes through it.
    """
    if queries.device.type != "cpu" or queries.shape[1] > MAX_QUERY_VECTORS:
        return False
    if not isinstance(blocks, Blocks) and _kind(blocks) is None:
        return False
    return available()


@dataclass(frozen=True, eq=False)
class Blocks:
    """Blocks as the kernel reads them, checked and laid out once (see :func:`prepare`)."""

    tensors: tuple[torch.Tensor, ...]  # holds the memory the addresses point into (vectors, then int8 scales)
    n: int
    dim: int
    int8: bool
    bases: ctypes.Array
    takes: ctypes.Array
    strides: ctypes.Array
    scale_bases: ctypes.Array | None
    scale_strides: ctypes.Array | None


def prepare(blocks: list[tuple[torch.Tensor, torch.Tensor | None]]) -> Blocks | None:
    """The kernel's view of ``blocks``, or None where it cannot read them (not bf16 or int8 with scales on the CPU,
    rows not contiguous). Stored groups never move, so a caller that scores them again and again (rescoring a few rows
    at each level of ``budget="auto"``) prepares them once: the checks and the address arrays cost more than the
    kernel call on a handful of rows."""
    kind = _kind(blocks) if blocks else None
    if kind is None:
        return None
    vectors = [v for v, _ in blocks]
    scales = [s for _, s in blocks] if kind == "int8" else []
    count = len(vectors)
    return Blocks(
        (*vectors, *scales),
        vectors[0].shape[0],
        vectors[0].shape[2],
        kind == "int8",
        (ctypes.c_void_p * count)(*(v.data_ptr() for v in vectors)),
        (ctypes.c_int64 * count)(*(v.shape[1] for v in vectors)),
        (ctypes.c_int64 * count)(*(v.stride(0) for v in vectors)),
        (ctypes.c_void_p * count)(*(s.data_ptr() for s in scales)) if scales else None,
        (ctypes.c_int64 * count)(*(s.stride(0) for s in scales)) if scales else None,
    )


def _check_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """``rows`` as the kernel reads them (int64, contiguous, CPU), or an error naming what is wrong: the kernel
    reads wherever an index points, so an index out of range must never reach it."""
    if not isinstance(rows, torch.Tensor) or rows.ndim != 1 or rows.dtype.is_floating_point or rows.is_complex():
        raise TypeError(f"rows must be a 1-D integer tensor of item indices, got {getattr(rows, 'shape', rows)!r}")
    if rows.device.type != "cpu":
        raise ValueError(f"rows must be on the CPU (the fused kernel runs there), got {rows.device}")
    rows = rows.to(torch.int64).contiguous()
    values = rows.numpy()
    if values.size and values.view(np.uint64).max() >= n:  # one pass: a negative index reads as a huge one
        low, high = int(values.min()), int(values.max())
        raise IndexError(f"rows must lie in [0, {n}) (the blocks hold {n} items), got indices {low}..{high}")
    return rows


def fused_scores(
    queries: torch.Tensor,
    blocks: list[tuple[torch.Tensor, torch.Tensor | None]] | Blocks,
    threads: int | None = None,
    *,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(nq, N)`` fp32 MaxSim scores of all ``queries (nq, r_q, D)`` vectors against the blocks' vectors.

    ``blocks`` as in :func:`metaembed.scoring.score_blocks` (bf16 without scales, or int8 with them; check
    :func:`supports` first), or
    :func:`prepare`'s view of them. With ``rows`` (1-D integer indices into the blocks' items, any order, repeats
    allowed) only those items are scored, read where they lie: ``(nq, len(rows))`` scores, bit-identical to scoring
    the blocks' ``index_select(0, rows)`` copies. Disjoint item ranges run on ``threads`` threads (default
    ``torch.get_num_threads()``); each range is scored for groups of whole queries of at most
    :data:`MAX_QUERY_VECTORS` vectors per kernel call.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the fused MaxSim kernel is not available on this machine (see metaembed.fused)")
    nq, r_q, dim = queries.shape
    if r_q > MAX_QUERY_VECTORS:
        raise ValueError(f"the fused kernel takes at most {MAX_QUERY_VECTORS} vectors per query, got {r_q}")
    view = blocks if isinstance(blocks, Blocks) else prepare(blocks)
    if view is None:
        raise ValueError(
            "the fused kernel reads CPU blocks whose rows are contiguous: all bf16 without scales, or all int8 with "
            "fp32 (N, t) scales"
        )
    if view.dim != dim:
        raise ValueError(f"queries have D = {dim}, the blocks D = {view.dim}")
    flat = queries.reshape(nq * r_q, dim)
    if view.int8:
        q, q_scales = quantize_int8(flat)
        q_offsets = q.sum(dim=1, dtype=torch.int32).mul_(128)  # VPDPBUSD reads the stored codes as code + 128
    else:
        q = flat.to(torch.bfloat16).contiguous()
    if rows is None:
        n, index = view.n, None
    else:
        index = _check_rows(rows, view.n)
        n = index.numel()
    scores = torch.empty(nq, n, dtype=torch.float32)
    if n == 0:
        return scores

    per_call = MAX_QUERY_VECTORS // r_q
    blocks_args = (len(view.takes), view.bases, view.takes, view.strides)

    def run(lo: int, hi: int) -> None:
        for first in range(0, nq, per_call):
            count, v = min(per_call, nq - first), first * r_q
            query = q.data_ptr() + v * dim * q.element_size()
            out = scores.data_ptr() + first * n * scores.element_size()
            if view.int8:
                code = lib.metaembed_maxsim_int8(
                    query, q_offsets.data_ptr() + 4 * v, q_scales.data_ptr() + 4 * v, count, r_q, dim,
                    len(view.takes), view.bases, view.scale_bases, view.takes, view.strides, view.scale_strides,
                    None if index is None else index.data_ptr(), lo, hi, out, n,
                )  # fmt: skip
            elif index is None:
                code = lib.metaembed_maxsim_bf16(query, count, r_q, dim, *blocks_args, lo, hi, out, n)
            else:
                code = lib.metaembed_maxsim_bf16_rows(
                    query, count, r_q, dim, *blocks_args, index.data_ptr(), lo, hi, out, n
                )
            if code != 0:
                raise MemoryError("the fused MaxSim kernel could not allocate its running-max buffer")

    workers = max(1, min(threads or torch.get_num_threads(), n, n * nq * r_q // _MIN_PAIRS_PER_THREAD))
    if workers == 1:
        run(0, n)
        return scores
    step = -(-n // workers)
    ranges = [(lo, min(n, lo + step)) for lo in range(0, n, step)]
    for future in [_pool().submit(run, lo, hi) for lo, hi in ranges]:
        future.result()  # the GIL is released inside the kernel: ranges run in parallel
    return scores
