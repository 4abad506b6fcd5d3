from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metaembed import Budget, BudgetError


def test_ladder_is_the_papers_five():
    assert [(b.r_q, b.r_c) for b in Budget.LADDER] == [(1, 1), (2, 4), (4, 8), (8, 16), (16, 64)]


@pytest.mark.parametrize("spec", ["16x64", "16,64", " 16 X 64 ", "(16, 64)", "16×64", (16, 64), [16, 64]])
def test_parse_accepts_common_spellings(spec):
    assert Budget.parse(spec) == Budget(16, 64)


@given(st.integers(1, 10_000), st.integers(1, 10_000))
def test_parse_round_trips_str(r_q, r_c):
    budget = Budget(r_q, r_c)
    assert Budget.parse(str(budget)) == budget


@pytest.mark.parametrize(
    "spec", ["", "16x", "x64", "16x64x2", "a,b", "-1x4", "0x4", "4x0", (1, 2, 3), 3.5, True, "0", 0]
)
def test_parse_rejects_garbage_with_a_clear_message(spec):
    with pytest.raises(BudgetError, match=r"budget|r_q|r_c"):
        Budget.parse(spec)


@pytest.mark.parametrize(("spec", "expected"), [(8, Budget(8, 8)), ("8", Budget(8, 8)), (" 1 ", Budget(1, 1))])
def test_one_number_is_that_many_vectors_on_each_side(spec, expected):
    assert Budget.parse(spec) == expected


def test_constructor_rejects_non_ints():
    with pytest.raises(BudgetError, match="r_q must be an int"):
        Budget(1.5, 2)
    with pytest.raises(BudgetError, match="r_c must be an int"):
        Budget(1, True)


def test_validate_against_model_sizes():
    assert Budget(16, 64).validate(16, 64) == Budget(16, 64)
    with pytest.raises(BudgetError, match=r"allowed: 1 ≤ r_q ≤ 16, 1 ≤ r_c ≤ 64"):
        Budget(17, 64).validate(16, 64)
    with pytest.raises(BudgetError, match="65 candidate vectors"):
        Budget(1, 65).validate(16, 64)


def test_parse_many():
    assert Budget.parse_many(None) == list(Budget.LADDER)
    assert Budget.parse_many("ladder") == list(Budget.LADDER)
    assert Budget.parse_many("1x1 4,8;16x64") == [Budget(1, 1), Budget(4, 8), Budget(16, 64)]


def test_cost_formulas_match_the_paper_table():
    # Paper Table 3: 7B (D = 3584), N = 100,000, bf16 index.
    n, d = 100_000, 3584
    assert Budget(1, 1).flops(n, d) == 716_800_000
    assert round(Budget(16, 64).flops(n, d) / 1e9, 2) == 734.00
    assert round(Budget(16, 64).index_bytes(n, d, 2) / 2**30, 2) == 42.72
    assert round(Budget(8, 16).index_bytes(n, d, 2) / 2**30, 2) == 10.68
