"""The fast MaxSim engine against the float64 definition: every dtype, budget, layout and chunking."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaembed import Budget, maxsim
from metaembed.index.kernels import maxsim_grouped
from metaembed.quantize import round_trip_int8

BOUNDS = (0, 1, 4, 8, 16, 64)


def reference(queries: torch.Tensor, candidates: torch.Tensor, budget: Budget) -> torch.Tensor:
    """sum_i max_j <q_i, c_j> in float64, one query at a time."""
    q, c = queries[:, : budget.r_q].double(), candidates[:, : budget.r_c].double()
    return torch.stack([torch.einsum("id,njd->nij", qi, c).amax(dim=2).sum(dim=1) for qi in q])


def unit(shape, gen):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def quantise(c: torch.Tensor):
    scale = (c.abs().amax(dim=-1) / 127).float()
    codes = torch.round(c / scale[..., None].double()).clamp(-127, 127).to(torch.int8)
    return codes, scale, codes.double() * scale[..., None].double()


def split(x: torch.Tensor, bounds=BOUNDS) -> list[torch.Tensor]:
    return [x[:, a:b].contiguous() for a, b in itertools.pairwise(bounds)]


def check(got: torch.Tensor, expected: torch.Tensor, dtype: str, r_q: int) -> None:
    assert got.dtype == torch.float32 and got.shape == expected.shape
    if dtype == "bf16":  # fp32 dot products of bf16 values (expected on the rounded inputs): a few ulps each
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=r_q * 2**-14)
    else:
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * r_q)


@pytest.mark.parametrize("budget", [*Budget.LADDER, Budget(3, 5), Budget(16, 20), Budget(5, 64)], ids=str)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("nq", [1, 9])
def test_grouped_every_dtype_and_budget_matches_float64(budget, dtype, nq):
    gen = torch.Generator().manual_seed(hash((str(budget), dtype, nq)) % 2**31)
    q, c = unit((nq, 16, 96), gen), unit((300, 64, 96), gen)
    q32 = q.float()
    if dtype == "int8":
        codes, scale, dequantised = quantise(c)
        groups, scales = split(codes), split(scale)
        expected = reference(round_trip_int8(q32), dequantised, budget)  # the query quantised like the codes
    else:
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        stored = c.to(torch_dtype)
        groups, scales = split(stored), None
        check(
            maxsim(q32.to(torch_dtype), stored, budget),
            reference(q32.to(torch_dtype), stored, budget),
            dtype,
            budget.r_q,
        )
        # grouped scoring runs the GEMM in the stored dtype's compute dtype: bf16 rounds the queries, fp16 widens
        expected = reference(q32.to(torch_dtype) if dtype == "bf16" else q32, stored, budget)
    check(maxsim_grouped(q32, groups, budget, scales), expected, dtype, budget.r_q)
    check(maxsim_grouped(q32, groups, budget, scales, chunk_size=7), expected, dtype, budget.r_q)


def test_float64_inputs_score_in_float64():
    gen = torch.Generator().manual_seed(3)
    q, c = unit((2, 4, 16), gen), unit((50, 8, 16), gen)
    got = maxsim(q, c, "4x8")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference(q, c, Budget(4, 8)), rtol=1e-12, atol=1e-12)


def test_mixed_dtype_groups_and_partial_last_group():
    gen = torch.Generator().manual_seed(4)
    q, c = unit((3, 16, 32), gen), unit((120, 64, 32), gen)
    codes, scale, dequantised = quantise(c)
    groups = [c[:, :1].float(), c[:, 1:4].float(), codes[:, 4:64]]
    scales = [None, None, scale[:, 4:64]]
    for budget in (Budget(2, 3), Budget(5, 6), Budget(16, 64)):
        got = maxsim_grouped(q.float(), groups, budget, scales, chunk_size=13)
        # each group meets the query as it stores its vectors: fp32 as it is, int8 quantised like the codes
        q32, q8 = q[:, : budget.r_q].float().double(), round_trip_int8(q[:, : budget.r_q].float()).double()
        best = torch.einsum("qid,njd->qnij", q32, c[:, : min(4, budget.r_c)].float().double()).amax(dim=3)
        if budget.r_c > 4:
            best = best.maximum(torch.einsum("qid,njd->qnij", q8, dequantised[:, 4 : budget.r_c]).amax(dim=3))
        torch.testing.assert_close(got.double(), best.sum(dim=2), rtol=1e-5, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    nq=st.integers(1, 5),
    n=st.integers(1, 80),
    r_q_total=st.integers(1, 12),
    cuts=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    dim=st.integers(1, 40),
    chunk=st.one_of(st.none(), st.integers(1, 90)),
    dtype=st.sampled_from(["fp32", "int8", "bf16"]),
    data=st.data(),
)
def test_grouped_property_any_layout(nq, n, r_q_total, cuts, dim, chunk, dtype, data):
    bounds = tuple(itertools.accumulate([0, *cuts]))
    r_c_total = bounds[-1]
    r_q = data.draw(st.integers(1, r_q_total))
    r_c = data.draw(st.integers(1, r_c_total))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    # unnormalised: scores of either sign and varied magnitude
    q = torch.randn(nq, r_q_total, dim, generator=gen, dtype=torch.float64) * 3
    c = torch.randn(n, r_c_total, dim, generator=gen, dtype=torch.float64)
    budget = Budget(r_q, r_c)
    if dtype == "int8":
        codes, scale, dequantised = quantise(c)
        got = maxsim_grouped(q.float(), split(codes, bounds), budget, split(scale, bounds), chunk_size=chunk)
        expected = reference(round_trip_int8(q.float()), dequantised, budget)
    elif dtype == "bf16":
        stored = c.bfloat16()
        got = maxsim_grouped(q.bfloat16(), split(stored, bounds), budget, chunk_size=chunk)
        expected = reference(q.bfloat16(), stored, budget)
        bound = r_q * 2**-8 * (expected.abs().max().item() + 3 * dim)  # bf16 rounding of dots of size ~|q||c|
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=bound)
        return
    else:
        got = maxsim_grouped(q.float(), split(c.float(), bounds), budget, chunk_size=chunk)
        expected = reference(q.float(), c.float(), budget)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4 * r_q)
