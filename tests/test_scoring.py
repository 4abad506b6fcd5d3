from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaembed import Budget, BudgetError, ShapeError, maxsim, maxsim_from_similarities, token_similarities
from metaembed.scoring import maxsim_reference


def reference_maxsim(queries: torch.Tensor, candidates: torch.Tensor, budget: Budget) -> torch.Tensor:
    """The library's oracle; :func:`test_the_oracle_is_the_definition` checks it against scalar loops."""
    return maxsim_reference(queries, candidates, budget)


def test_the_oracle_is_the_definition():
    gen = torch.Generator().manual_seed(7)
    q, c = torch.randn(2, 3, 5, generator=gen), torch.randn(4, 6, 5, generator=gen)
    for budget in (Budget(1, 1), Budget(2, 4), Budget(3, 6)):
        want = [
            [
                sum(
                    max(float(q[a, i].double() @ c[n, j].double()) for j in range(budget.r_c))
                    for i in range(budget.r_q)
                )
                for n in range(4)
            ]
            for a in range(2)
        ]
        torch.testing.assert_close(maxsim_reference(q, c, budget), torch.tensor(want, dtype=torch.float64))
    assert maxsim_reference(q, c).shape == (2, 4) and maxsim_reference(q, c, "2x4").dtype == torch.float64


def unit(shape, generator, dtype=torch.float32):
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


# bf16 GEMMs round each dot product to 8 mantissa bits; fp16 inputs are widened to fp32 on CPU.
FP32 = dict(rtol=1e-5, atol=1e-5)
TOLERANCE = {torch.float32: FP32, torch.float16: FP32}


@pytest.mark.parametrize("budget", Budget.LADDER, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("nq", "n", "dim"), [(1, 37, 8), (3, 300, 64), (5, 1000, 384)])
def test_maxsim_matches_float64_reference(budget, dtype, nq, n, dim):
    gen = torch.Generator().manual_seed(hash((str(budget), str(dtype), nq, n, dim)) % 2**31)
    queries, candidates = unit((nq, 16, dim), gen, dtype), unit((n, 64, dim), gen, dtype)
    expected = reference_maxsim(queries, candidates, budget)  # on the rounded inputs
    scores = maxsim(queries, candidates, budget)
    assert scores.shape == (nq, n) and scores.dtype == torch.float32
    if dtype == torch.bfloat16:
        # each max carries one bf16 rounding of a |value| <= 1: <= 2^-8 each, r_q of them summed
        torch.testing.assert_close(scores.double(), expected, rtol=0, atol=budget.r_q * 2**-8)
    else:
        torch.testing.assert_close(scores.double(), expected, **TOLERANCE[dtype])


@settings(max_examples=40, deadline=None)
@given(
    nq=st.integers(1, 4),
    n=st.integers(1, 50),
    r_q_total=st.integers(1, 8),
    r_c_total=st.integers(1, 12),
    dim=st.integers(1, 24),
    chunk=st.integers(1, 60),
    data=st.data(),
)
def test_maxsim_property_any_shape_and_chunking(nq, n, r_q_total, r_c_total, dim, chunk, data):
    r_q = data.draw(st.integers(1, r_q_total))
    r_c = data.draw(st.integers(1, r_c_total))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    # not normalised, not zero: scores of either sign and varied magnitude
    queries = torch.randn(nq, r_q_total, dim, generator=gen) * 3
    candidates = torch.randn(n, r_c_total, dim, generator=gen)
    budget = Budget(r_q, r_c)
    expected = reference_maxsim(queries, candidates, budget)
    got = maxsim(queries, candidates, budget, chunk_size=chunk)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_default_budget_uses_every_vector():
    gen = torch.Generator().manual_seed(0)
    q, c = torch.randn(2, 3, 5, generator=gen), torch.randn(4, 7, 5, generator=gen)
    torch.testing.assert_close(maxsim(q, c).double(), reference_maxsim(q, c, Budget(3, 7)), **FP32)


def test_score_is_a_sum_not_a_mean():
    q = torch.zeros(1, 16, 4)
    q[0, :, 0] = 1.0
    c = torch.zeros(1, 64, 4)
    c[0, :, 0] = 1.0
    assert maxsim(q, c, "16x64").item() == pytest.approx(16.0)
    assert maxsim(q, c, "1x1").item() == pytest.approx(1.0)


def test_differentiable_form_matches_and_gives_gradients():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 16, 8, generator=gen, requires_grad=True)
    c = torch.randn(5, 64, 8, generator=gen, requires_grad=True)
    scores = maxsim(q, c, "4x8")
    torch.testing.assert_close(scores.double(), reference_maxsim(q.detach(), c.detach(), Budget(4, 8)), **FP32)
    scores.sum().backward()
    assert q.grad is not None and q.grad[:, :4].abs().sum() > 0
    assert q.grad[:, 4:].abs().sum() == 0  # vectors outside the budget get no gradient
    assert c.grad[:, 8:].abs().sum() == 0


def test_token_similarities_slice_to_every_budget():
    gen = torch.Generator().manual_seed(2)
    q, c = torch.randn(2, 16, 6, generator=gen), torch.randn(3, 64, 6, generator=gen)
    sims = token_similarities(q, c)
    assert sims.shape == (2, 3, 16, 64)
    for budget in Budget.LADDER:
        torch.testing.assert_close(
            maxsim_from_similarities(sims, budget).double(), reference_maxsim(q, c, budget), **FP32
        )


@pytest.mark.parametrize(
    ("queries", "candidates", "message"),
    [
        (torch.zeros(16, 8), torch.zeros(3, 64, 8), r"queries must have shape \(n, R, D\)"),
        (torch.zeros(1, 16, 8), torch.zeros(3, 64, 8, 1), r"candidates must have shape \(n, R, D\)"),
        (torch.zeros(1, 16, 8), torch.zeros(3, 64, 9), "candidates must have D = 8"),
        (torch.zeros(0, 16, 8), torch.zeros(3, 64, 8), "queries is empty"),
        (torch.zeros(1, 16, 8), torch.zeros(0, 64, 8), "candidates is empty"),
        (torch.zeros(1, 16, 8, dtype=torch.int64), torch.zeros(3, 64, 8), "float32, bfloat16 or float16"),
        ([[0.0]], torch.zeros(3, 64, 8), "must be a torch.Tensor"),
    ],
)
def test_bad_shapes_raise_specific_errors(queries, candidates, message):
    with pytest.raises(ShapeError, match=message):
        maxsim(queries, candidates)


def test_budget_beyond_stored_vectors_is_rejected():
    with pytest.raises(BudgetError, match="only 16 query and 8 candidate vectors"):
        maxsim(torch.zeros(1, 16, 4), torch.zeros(2, 8, 4), "16x64")
