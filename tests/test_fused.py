"""The fused bf16 / int8 MaxSim kernel against the float64 definition (it runs where AVX512-BF16 and -VNNI do)."""

from __future__ import annotations

import itertools
import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaembed import Budget, fused, maxsim
from metaembed.index.kernels import maxsim_grouped
from metaembed.quantize import quantize_int8, round_trip_int8
from metaembed.scoring import score_blocks


def _cpu_runs_the_kernel() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and all(f" {flag}" in cpuinfo.read_text() for flag in ("avx512_bf16", "avx512_vnni"))


def _c_compiler() -> str | None:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(compiler)


def test_the_kernel_is_in_use_wherever_it_can_be():
    """Where the CPU runs AVX512-BF16 and -VNNI and a C compiler exists, setup must have built the kernel: a missing
    kernel is a failure here, not a module of skipped tests."""
    if os.environ.get("METAEMBED_FUSED") == "0":
        pytest.skip("METAEMBED_FUSED=0: the kernel is switched off on purpose")
    if not (_cpu_runs_the_kernel() and _c_compiler()):
        pytest.skip(f"no AVX512-BF16 + VNNI CPU or no C compiler here: {fused.status()}")
    assert fused.available(), f"this CPU runs AVX512-BF16 + VNNI and {_c_compiler()} exists, but: {fused.status()}"


needs_kernel = pytest.mark.skipif(not fused.available(), reason=f"fused kernel: {fused.status()}")

BOUNDS = (0, 1, 4, 8, 16, 64)


def reference(queries: torch.Tensor, candidates: torch.Tensor, budget: Budget) -> torch.Tensor:
    """sum_i max_j <q_i, c_j> in float64 on the bf16-rounded inputs (the kernel reads bf16 and sums in fp32)."""
    q = queries[:, : budget.r_q].to(torch.bfloat16).double()
    c = candidates[:, : budget.r_c].to(torch.bfloat16).double()
    return torch.einsum("qid,njd->qnij", q, c).amax(dim=3).sum(dim=2)


def grouped_blocks(candidates: torch.Tensor, r_c: int) -> list[tuple[torch.Tensor, None]]:
    """The index layout: contiguous prefix groups, each sliced to the vectors the budget takes (strided views)."""
    return [
        (candidates[:, a:b].contiguous()[:, : min(b, r_c) - a], None) for a, b in itertools.pairwise(BOUNDS) if a < r_c
    ]


def fp32_tolerance(expected: torch.Tensor, dim: int) -> float:
    # fp32 accumulation of D products of bf16 values: a few ulps of the largest partial sums
    return float(expected.abs().max()) * dim * 2**-22 + 1e-6


@needs_kernel
@pytest.mark.parametrize("budget", Budget.LADDER, ids=str)
@pytest.mark.parametrize(("nq", "n", "dim"), [(1, 1, 32), (1, 1000, 384), (2, 257, 100), (3, 700, 47)])
def test_every_ladder_budget_matches_float64(budget, nq, n, dim):
    gen = torch.Generator().manual_seed(hash((str(budget), nq, n, dim)) % 2**31)
    queries = torch.randn(nq, 16, dim, generator=gen)
    candidates = torch.randn(n, 64, dim, generator=gen).to(torch.bfloat16)
    expected = reference(queries, candidates, budget)
    blocks = grouped_blocks(candidates, budget.r_c)
    got = fused.fused_scores(queries[:, : budget.r_q], blocks)
    assert got.shape == (nq, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=fp32_tolerance(expected, dim))


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(
    nq=st.integers(1, 4),
    n=st.integers(1, 600),
    r_q=st.integers(1, 16),
    r_c=st.integers(1, 64),
    dim=st.integers(1, 130),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_shape_any_thread_split_matches_float64(nq, n, r_q, r_c, dim, threads, seed):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(nq, r_q, dim, generator=gen) * 3  # scores of either sign, varied magnitude
    candidates = torch.randn(n, 64, dim, generator=gen).to(torch.bfloat16)
    budget = Budget(r_q, r_c)
    expected = reference(queries, candidates, budget)
    fused._MIN_PAIRS_PER_THREAD, saved = 1, fused._MIN_PAIRS_PER_THREAD  # split even small N across threads
    try:
        got = fused.fused_scores(queries, grouped_blocks(candidates, r_c), threads=threads)
    finally:
        fused._MIN_PAIRS_PER_THREAD = saved
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=fp32_tolerance(expected, dim))


@needs_kernel
def test_one_query_through_maxsim_and_the_index_kernel_uses_it():
    gen = torch.Generator().manual_seed(3)
    q, c = torch.randn(1, 16, 64, generator=gen), torch.randn(300, 64, 64, generator=gen).to(torch.bfloat16)
    want = fused.fused_scores(q[:, :8], [(c[:, :16], None)])
    assert torch.equal(maxsim(q, c, "8x16"), want)
    groups = [c[:, a:b].contiguous() for a, b in itertools.pairwise(BOUNDS)]
    torch.testing.assert_close(maxsim_grouped(q, groups, Budget(8, 16)), want, rtol=1e-6, atol=1e-5)


@needs_kernel
def test_switch_off_falls_back_to_torch_gemms(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    q, c = torch.randn(1, 4, 32, generator=gen), torch.randn(50, 8, 32, generator=gen).to(torch.bfloat16)
    blocks = [(c, None)]
    assert fused.supports(q, blocks)
    monkeypatch.setenv("METAEMBED_FUSED", "0")
    assert not fused.supports(q, blocks)
    expected = reference(q, c, Budget(4, 8))
    # the fallback widens bf16 to fp32: fp32 dot products of the same bf16 values
    torch.testing.assert_close(score_blocks(q, blocks).double(), expected, rtol=0, atol=fp32_tolerance(expected, 32))


@pytest.mark.parametrize("case", ["fp32 candidates", "int8 scales", "vectors not rows", "too many vectors per query"])
@needs_kernel
def test_inputs_it_does_not_take_go_to_the_gemm_path(case):
    q = torch.randn(1, 4, 32)
    c = torch.randn(10, 8, 32).to(torch.bfloat16)
    blocks = [(c, None)]
    if case == "fp32 candidates":
        blocks = [(c.float(), None)]
    elif case == "int8 scales":
        blocks = [(c, torch.ones(10, 8))]
    elif case == "too many vectors per query":
        q = torch.randn(1, fused.MAX_QUERY_VECTORS + 1, 32)  # more vectors per query than its running maxima hold
    else:
        blocks = [(c.transpose(1, 2).contiguous().transpose(1, 2), None)]  # D is not the contiguous dim
    assert not fused.supports(q, blocks)


@needs_kernel
@pytest.mark.parametrize("dim", [8, 100, 384, 2048])
@pytest.mark.parametrize("r_q", [1, 2, 3, 4, 5, 8, 16])
def test_a_query_scores_bit_identically_alone_and_in_any_batch(r_q, dim):
    """Alone a query runs 1x16 / 2x8 / 4x4 tiles, in a batch of 70 the stepped 4x4 tiles, split into kernel calls
    of at most MAX_QUERY_VECTORS: every dot product is still accumulated in the same order."""
    gen = torch.Generator().manual_seed(r_q * 10_000 + dim)
    queries = torch.randn(70, r_q, dim, generator=gen)
    candidates = torch.randn(37, 64, dim, generator=gen).to(torch.bfloat16)
    blocks = grouped_blocks(candidates, 13)
    batch = fused.fused_scores(queries, blocks, threads=1)
    assert torch.equal(batch, fused.fused_scores(queries, blocks, threads=2))  # split across threads from r_q = 2
    for i in (0, 1, 33, 69):
        assert torch.equal(batch[i : i + 1], fused.fused_scores(queries[i : i + 1], blocks))
    for b in (2, 5, 64):
        assert torch.equal(batch[:b], fused.fused_scores(queries[:b], blocks))
    expected = reference(queries, candidates, Budget(r_q, 13))
    torch.testing.assert_close(batch.double(), expected, rtol=0, atol=fp32_tolerance(expected, dim))


@needs_kernel
@pytest.mark.parametrize("dim", [8, 384])
def test_a_budget_of_a_full_tensor_reads_it_in_place_and_scores_as_its_dense_prefix(dim):
    gen = torch.Generator().manual_seed(dim)
    queries = torch.randn(3, 16, dim, generator=gen)
    full = torch.randn(301, 64, dim, generator=gen).to(torch.bfloat16)
    for budget in Budget.LADDER:
        prefix = full[:, : budget.r_c]
        assert fused.supports(queries[:, : budget.r_q], [(prefix, None)])  # items 64 rows apart: no copy
        got = maxsim(queries, full, budget)
        assert torch.equal(got, maxsim(queries, prefix.contiguous(), budget))
        expected = reference(queries, full, budget)
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=fp32_tolerance(expected, dim))


_FORK_INPUTS: list = []


def _score_fork_inputs() -> list[float]:
    # only the kernel runs in the child: torch's own OpenMP ops are not fork-safe once the parent used them
    q, c = _FORK_INPUTS
    return fused.fused_scores(q, [(c, None)], threads=2).flatten().tolist()


@needs_kernel
def test_a_forked_child_scores_with_its_own_threads():
    import multiprocessing

    gen = torch.Generator().manual_seed(5)
    _FORK_INPUTS[:] = [torch.randn(1, 2, 32, generator=gen), torch.randn(9000, 4, 32, generator=gen).to(torch.bfloat16)]
    want = _score_fork_inputs()  # the parent's thread pool exists now; a child inherits it without its threads
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_score_fork_inputs).get(timeout=30) == want


@needs_kernel
@pytest.mark.parametrize(
    ("nq", "r_q", "r_c", "n", "dim"),
    [
        (4, 16, 64, 131, 384),  # 64 query vectors: four runs of 16; N spans several chunks
        (10, 7, 13, 150, 47),  # 70 vectors: a short last run and group; r_c not a multiple of 4 (padded); odd D
        (20, 5, 14, 70, 33),  # 14 vectors per item: the last tile repeats two
        (32, 16, 64, 150, 100),  # 512 vectors: blocks of 64 items, the last one short
        (64, 1, 64, 9, 2048),  # one item's vectors fill the L2 chunk alone
        (40, 2, 4, 257, 64),  # the 1- and 3-vector groups tiled together
    ],
)
def test_batches_take_items_one_at_a_time_and_match_float64(nq, r_q, r_c, n, dim):
    """64 or more query vectors per call run the item-at-a-time order (running maxima in registers, items and
    query vectors blocked for the caches): every edge of its blocking against the float64 reference, and every
    query bit-identical to the same query scored alone (the streaming order)."""
    gen = torch.Generator().manual_seed(nq * 1_000 + r_q * 100 + r_c + dim)
    queries = torch.randn(nq, r_q, dim, generator=gen) * 2
    candidates = torch.randn(n, 64, dim, generator=gen).to(torch.bfloat16)
    blocks = grouped_blocks(candidates, r_c)
    got = fused.fused_scores(queries, blocks, threads=1)
    expected = reference(queries, candidates, Budget(r_q, r_c))
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=fp32_tolerance(expected, dim))
    for i in {0, nq // 2, nq - 1}:
        assert torch.equal(got[i : i + 1], fused.fused_scores(queries[i : i + 1], blocks, threads=1))
    strided = fused.fused_scores(queries, [(candidates[:, :r_c], None)], threads=2)  # items 64 vectors apart
    assert torch.equal(strided, got)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    nq=st.integers(1, 32),
    r_q=st.integers(1, 16),
    r_c=st.integers(1, 64),
    n=st.integers(1, 200),
    dim=st.integers(1, 100),
    seed=st.integers(0, 2**31 - 1),
)
def test_batches_of_1_to_32_queries_match_float64(nq, r_q, r_c, n, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(nq, r_q, dim, generator=gen)
    candidates = torch.randn(n, 64, dim, generator=gen).to(torch.bfloat16)
    expected = reference(queries, candidates, Budget(r_q, r_c))
    got = fused.fused_scores(queries, grouped_blocks(candidates, r_c))
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=fp32_tolerance(expected, dim))
    assert torch.equal(got[-1:], fused.fused_scores(queries[-1:], grouped_blocks(candidates, r_c)))


@needs_kernel
@pytest.mark.parametrize(
    ("nq", "r_q", "r_c", "dim", "threads"),
    [
        (1, 16, 64, 384, 1),
        (1, 2, 4, 47, 1),
        (1, 1, 1, 33, 2),
        (2, 3, 13, 101, 2),
        (1, 8, 16, 200, 1),
        (4, 16, 64, 9, 3),
    ],
)
def test_a_row_list_scores_as_its_gathered_rows_bit_for_bit(nq, r_q, r_c, dim, threads):
    """Rows named by an index list, read in place: the scores of the same rows copied out first, bit for bit, and of
    the float64 definition; unsorted and repeated indices each get their own column. (4 x 16 query vectors x 64
    item vectors takes the item-at-a-time order.)"""
    gen = torch.Generator().manual_seed(hash((nq, r_q, r_c, dim)) % 2**31)
    queries = torch.randn(nq, r_q, dim, generator=gen) * 3
    candidates = torch.randn(500, 64, dim, generator=gen).to(torch.bfloat16)
    rows = torch.cat([torch.randperm(500, generator=gen)[:90], torch.tensor([7, 499, 7, 0, 0])])
    blocks = grouped_blocks(candidates, r_c)
    gathered = [(v.index_select(0, rows), None) for v, _ in blocks]
    fused._MIN_PAIRS_PER_THREAD, saved = 1, fused._MIN_PAIRS_PER_THREAD  # split even a short list across threads
    try:
        got = fused.fused_scores(queries, blocks, threads=threads, rows=rows)
        prepared = fused.fused_scores(queries, fused.prepare(blocks), threads=threads, rows=rows)
    finally:
        fused._MIN_PAIRS_PER_THREAD = saved
    assert got.shape == (nq, rows.numel())
    assert torch.equal(got, fused.fused_scores(queries, gathered)) and torch.equal(prepared, got)
    expected = reference(queries, candidates[rows], Budget(r_q, r_c))
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=fp32_tolerance(expected, dim))
    assert torch.equal(got[:, -5], got[:, -3]) and torch.equal(got[:, -2], got[:, -1])


@needs_kernel
def test_a_row_list_out_of_range_or_not_integer_is_refused_before_the_kernel_reads():
    candidates = torch.randn(20, 8, 16).to(torch.bfloat16)
    queries, blocks = torch.randn(1, 2, 16), [(candidates, None)]
    for bad in (torch.tensor([0, 20]), torch.tensor([-1, 3])):
        with pytest.raises(IndexError, match=r"\[0, 20\)"):
            fused.fused_scores(queries, blocks, rows=bad)
    with pytest.raises(TypeError, match="integer"):
        fused.fused_scores(queries, blocks, rows=torch.tensor([1.0]))
    assert fused.fused_scores(queries, blocks, rows=torch.tensor([], dtype=torch.long)).shape == (1, 0)
    assert fused.prepare([(candidates.float(), None)]) is None
    assert fused.prepare([(candidates, torch.ones(20, 8))]) is None


# int8: stored codes with per-vector scales, the query quantised the same way (metaembed.quantize).


def int8_blocks(candidates: torch.Tensor, r_c: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The index's int8 layout: codes and fp32 scales per prefix group, each sliced to the vectors the budget takes."""
    codes, scale = quantize_int8(candidates)
    return [
        (codes[:, a:b].contiguous()[:, : min(b, r_c) - a], scale[:, a:b].contiguous()[:, : min(b, r_c) - a])
        for a, b in itertools.pairwise(BOUNDS)
        if a < r_c
    ]


def int8_reference(queries: torch.Tensor, candidates: torch.Tensor, budget: Budget) -> torch.Tensor:
    """sum_i max_j <q_i, c_j> in float64 on the quantised-then-dequantised query and candidates."""
    q = round_trip_int8(queries[:, : budget.r_q]).double()
    c = round_trip_int8(candidates[:, : budget.r_c]).double()
    return torch.einsum("qid,njd->qnij", q, c).amax(dim=3).sum(dim=2)


def int8_tolerance(expected: torch.Tensor) -> float:
    # the integer dot products are exact: one rounding each to fp32 when converted, scaled and summed
    return float(expected.abs().max()) * 2**-20 + 1e-6


@needs_kernel
@pytest.mark.parametrize("budget", Budget.LADDER, ids=str)
@pytest.mark.parametrize(("nq", "n", "dim"), [(1, 1, 32), (1, 1000, 384), (2, 257, 100), (3, 700, 47), (1, 50, 2048)])
def test_int8_every_ladder_budget_matches_float64_and_the_query_rounding_bound(budget, nq, n, dim):
    gen = torch.Generator().manual_seed(hash(("int8", str(budget), nq, n, dim)) % 2**31)
    queries = torch.randn(nq, 16, dim, generator=gen) * 2
    candidates = torch.randn(n, 64, dim, generator=gen)
    blocks = int8_blocks(candidates, budget.r_c)
    assert fused.supports(queries, blocks)
    got = fused.fused_scores(queries[:, : budget.r_q], blocks)
    expected = int8_reference(queries, candidates, budget)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=int8_tolerance(expected))
    # against the unrounded query: each query vector's max moves by at most scale_q / 2 * max_j sum_d |c_jd|
    c = round_trip_int8(candidates[:, : budget.r_c]).double()
    exact_query = torch.einsum("qid,njd->qnij", queries[:, : budget.r_q].double(), c).amax(dim=3).sum(dim=2)
    _, q_scale = quantize_int8(queries[:, : budget.r_q])
    bound = torch.einsum("qi,n->qn", q_scale.double() / 2, c.abs().sum(dim=2).amax(dim=1))
    assert ((got.double() - exact_query).abs() <= bound + int8_tolerance(expected)).all()


@needs_kernel
@pytest.mark.parametrize("dim", [8, 100, 384, 2048])
@pytest.mark.parametrize("r_q", [1, 2, 3, 5, 8, 12, 16])
def test_int8_a_query_scores_bit_identically_alone_in_any_batch_thread_split_and_row_list(r_q, dim):
    gen = torch.Generator().manual_seed(r_q * 1000 + dim)
    queries = torch.randn(70, r_q, dim, generator=gen)
    candidates = torch.randn(37, 64, dim, generator=gen)
    blocks = int8_blocks(candidates, 13)
    batch = fused.fused_scores(queries, blocks, threads=1)
    assert torch.equal(batch, fused.fused_scores(queries, blocks, threads=2))
    for i in (0, 33, 69):
        assert torch.equal(batch[i : i + 1], fused.fused_scores(queries[i : i + 1], blocks))
    for b in (2, 64):
        assert torch.equal(batch[:b], fused.fused_scores(queries[:b], blocks))
    rows = torch.tensor([36, 0, 5, 5, 17])
    gathered = [(v.index_select(0, rows), s.index_select(0, rows)) for v, s in blocks]
    assert torch.equal(fused.fused_scores(queries, blocks, rows=rows), fused.fused_scores(queries, gathered))
    expected = int8_reference(queries, candidates, Budget(r_q, 13))
    torch.testing.assert_close(batch.double(), expected, rtol=0, atol=int8_tolerance(expected))


@needs_kernel
def test_int8_a_budget_of_full_codes_reads_them_in_place_and_an_index_scores_with_the_kernel(tmp_path):
    from metaembed.index import create_index

    gen = torch.Generator().manual_seed(5)
    queries, candidates = torch.randn(2, 16, 96, generator=gen), torch.randn(120, 64, 96, generator=gen)
    codes, scale = quantize_int8(candidates)
    with create_index(tmp_path / "ix", 96, 64, dtype="int8") as ix:
        ix.add([str(i) for i in range(120)], candidates)
        for budget in Budget.LADDER:
            prefix = [(codes[:, : budget.r_c], scale[:, : budget.r_c])]  # items 64 rows apart: no copy
            got = fused.fused_scores(queries[:, : budget.r_q], prefix)
            dense = [(codes[:, : budget.r_c].contiguous(), scale[:, : budget.r_c].contiguous())]
            assert torch.equal(got, fused.fused_scores(queries[:, : budget.r_q], dense))
            assert ix._segments[0].kernel_view(budget).int8  # a shortlist's rescoring reads int8 rows in place
            found = ix.search(queries, budget, k=5)
            top = got.topk(5, dim=1)
            assert found.ids == [[str(i) for i in row] for row in top.indices.tolist()]
            torch.testing.assert_close(found.scores, top.values, rtol=0, atol=int8_tolerance(top.values))


@needs_kernel
def test_int8_blocks_it_does_not_take():
    codes, scale = quantize_int8(torch.randn(10, 8, 32))
    bf16 = torch.randn(10, 8, 32).to(torch.bfloat16)
    q = torch.randn(1, 4, 32)
    assert fused.supports(q, [(codes, scale)])
    assert not fused.supports(q, [(codes, None)])  # codes without scales
    assert not fused.supports(q, [(codes, scale.double())])
    assert not fused.supports(q, [(codes, scale[:, :4])])  # scales of another shape
    assert not fused.supports(q, [(bf16[:, :1], None), (codes[:, 1:], scale[:, 1:])])  # bf16 and int8 mixed
