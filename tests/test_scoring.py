from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaembed import Budget, BudgetError, ShapeError, maxsim, maxsim_from_similarities, token_similarities
from metaembed.quantize import round_trip_int8
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


# bf16 and fp16 inputs are multiplied and accumulated in fp32 on CPU (the fused kernel or widened GEMMs).
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
        # fp32 accumulation of D products of unit vectors' bf16 values: a few ulps per dot product, r_q summed
        torch.testing.assert_close(scores.double(), expected, rtol=0, atol=budget.r_q * dim * 2**-23 + 1e-6)
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


def _alone_and_batched(queries: torch.Tensor, score) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Scores of every query alone, and of each prefix batch ``queries[:b]`` for b = 1..len(queries)."""
    alone = torch.cat([score(queries[i : i + 1]) for i in range(len(queries))])
    return alone, [score(queries[:b]) for b in range(1, len(queries) + 1)]


def _assert_batch_independent(alone: torch.Tensor, batches: list[torch.Tensor], k: int) -> None:
    for batch in batches:
        b = batch.shape[0]
        torch.testing.assert_close(batch, alone[:b], rtol=0, atol=1e-5)
        assert torch.equal(batch.topk(k).indices, alone[:b].topk(k).indices), f"top-{k} differs in a batch of {b}"


@pytest.mark.parametrize("engine", ["default", "torch GEMMs"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
def test_a_query_scores_the_same_alone_and_in_batches_of_1_to_32(engine, dtype, monkeypatch):
    if engine == "torch GEMMs":
        monkeypatch.setenv("METAEMBED_FUSED", "0")
    gen = torch.Generator().manual_seed(11)
    queries, candidates = unit((32, 16, 96), gen), unit((401, 64, 96), gen, dtype)
    budget = Budget(8, 16)
    alone, batches = _alone_and_batched(queries, lambda q: maxsim(q, candidates, budget))
    _assert_batch_independent(alone, batches, k=10)
    read = queries.to(dtype) if dtype == torch.bfloat16 else queries  # queries meeting bf16 are rounded to bf16
    expected = reference_maxsim(read, candidates, budget)
    torch.testing.assert_close(alone.double(), expected, rtol=0, atol=budget.r_q * 96 * 2**-23 + 1e-6)


def test_int8_index_groups_score_the_same_alone_and_in_batches_of_1_to_32():
    from metaembed.index.kernels import maxsim_grouped

    gen = torch.Generator().manual_seed(12)
    queries = unit((32, 16, 64), gen)
    groups = [torch.randint(-127, 128, (300, width, 64), dtype=torch.int8, generator=gen) for width in (1, 3, 4)]
    scales = [torch.rand(300, width, generator=gen) / 127 for width in (1, 3, 4)]
    budget = Budget(4, 8)
    alone, batches = _alone_and_batched(queries, lambda q: maxsim_grouped(q, groups, budget, scales))
    _assert_batch_independent(alone, batches, k=10)
    dequantised = torch.cat([g.double() * s.double()[..., None] for g, s in zip(groups, scales, strict=True)], dim=1)
    expected = reference_maxsim(round_trip_int8(queries), dequantised, budget)  # queries quantised like the codes
    torch.testing.assert_close(alone.double(), expected, rtol=1e-5, atol=1e-5)


def test_queries_merged_by_the_service_batcher_rank_as_they_do_alone(tiny_model):
    """Query embeddings from the service's encode batcher (requests merged into shared forward passes), scored
    one request at a time and as one batch of 32: same top-10 ids, same scores."""
    from metaembed.model.items import Item
    from metaembed.serve.batcher import EncodeBatcher

    texts = [f"query {i}: a picture of {'a cat' if i % 3 else 'a red house'} number {i}" for i in range(32)]
    sizes: list[int] = []
    batcher = EncodeBatcher(
        tiny_model, max_batch_items=32, max_batch_wait_ms=200, on_batch=lambda n, s: sizes.append(n)
    )
    try:  # submit only queues: 32 one-item requests wait together and the worker merges them
        futures = [batcher.submit([Item(text=text)], "query") for text in texts]
        queries = torch.cat([future.result(60).embeddings for future in futures])
    finally:
        batcher.close()
    assert max(sizes) > 1  # requests did share forward passes
    gen = torch.Generator().manual_seed(13)
    candidates = unit((500, 64, queries.shape[2]), gen, torch.bfloat16)
    for budget in (Budget(4, 8), Budget(16, 64)):
        alone = torch.cat([maxsim(q[None], candidates, budget) for q in queries])
        _assert_batch_independent(alone, [maxsim(queries, candidates, budget)], k=10)
        expected = reference_maxsim(queries.to(torch.bfloat16), candidates, budget)
        torch.testing.assert_close(alone.double(), expected, rtol=0, atol=budget.r_q * queries.shape[2] * 2**-23 + 1e-6)
