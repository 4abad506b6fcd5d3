"""Property test: for random shapes, dtypes, budgets and k, search equals the float64 MaxSim reference."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaembed import Budget
from metaembed.index import create_index
from metaembed.index.layout import quantize_int8, stored_values
from metaembed.scoring import maxsim_reference


@st.composite
def cases(draw):
    n = draw(st.integers(1, 40))
    r_c = draw(st.sampled_from([1, 3, 4, 9, 16, 20]))
    r_q = draw(st.integers(1, 6))
    dim = draw(st.integers(1, 12))
    budget = Budget(draw(st.integers(1, r_q)), draw(st.integers(1, r_c)))
    return (
        n,
        r_c,
        r_q,
        dim,
        budget,
        draw(st.integers(1, 50)),
        draw(st.sampled_from(["fp32", "int8"])),
        draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_search_matches_reference(case):
    n, r_c, r_q, dim, budget, k, dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    c, q = torch.randn(n, r_c, dim, generator=gen), torch.randn(3, r_q, dim, generator=gen)
    with tempfile.TemporaryDirectory() as tmp, create_index(Path(tmp) / "ix", dim, r_c, dtype=dtype) as ix:
        half = n // 2
        if half:
            ix.add([f"a{j}" for j in range(half)], c[:half])
        ix.add([f"a{j}" for j in range(half, n)], c[half:])
        res = ix.search(q, budget, k=k)
    ref_c = c.double()
    if dtype == "int8":
        codes, scale = quantize_int8(c)
        ref_c = codes.double() * scale[..., None].double()
    ref = maxsim_reference(stored_values(q, dtype), ref_c, budget)  # queries are scored as items are stored
    assert res.scores.shape == (3, min(k, n))
    torch.testing.assert_close(res.scores.double(), ref.topk(min(k, n), dim=1).values, rtol=1e-5, atol=1e-4)
    for i, row in enumerate(res.ids):
        got = ref[i, [int(x[1:]) for x in row]]
        torch.testing.assert_close(res.scores[i].double(), got, rtol=1e-5, atol=1e-4)
