"""``budget="auto"`` on the embedded index: the extremes equal fixed searches, the costs add up, bad input fails."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest
import torch

from metaembed import Budget
from metaembed.auto_budget import AutoBudget, AutoBudgetError
from metaembed.errors import BudgetError, InputError, ShapeError
from metaembed.index import create_index, open_index
from metaembed.index.adaptive import rerank_slots

H = runpy.run_path(str(Path(__file__).with_name("helpers.py")))
embeddings, assert_same_results = H["embeddings"], H["assert_same_results"]
D = 16
ITEM = {b: b.r_c * D * 4 for b in Budget.LADDER}  # fp32 bytes of one item at each budget


@pytest.fixture
def index(tmp_path):
    """300 fp32 items in two segments, two of them deleted (298 live)."""
    c = embeddings(300, 64, D, seed=21)
    with create_index(tmp_path / "ix", D, 64, dtype="fp32") as ix:
        ix.add([f"i{j}" for j in range(200)], c[:200])
        ix.add([f"i{j}" for j in range(200, 300)], c[200:])
        ix.delete(["i7", "i260"])
        yield ix


def test_auto_that_always_escalates_over_every_row_equals_the_fixed_ceiling(index):
    q = embeddings(6, 16, D, seed=22)
    auto = index.search(q, AutoBudget(math.inf, top_m=300), k=10)
    assert_same_results(auto, index.search(q, "16x64", k=10))
    assert auto.budgets == ["16x64"] * 6 and auto.escalations == [4] * 6 and auto.escalated_fraction == 1.0
    later = sum(ITEM[b] for b in Budget.LADDER[1:])
    assert auto.bytes_read == [300 * ITEM[Budget(1, 1)] + 298 * later] * 6  # the scan reads deleted rows too


def test_auto_that_never_escalates_equals_the_fixed_cheap_budget(index):
    q = embeddings(6, 16, D, seed=23)
    auto = index.search(q, AutoBudget(0.0, cheap=Budget(2, 4)), k=10)
    fixed = index.search(q, "2x4", k=10)
    assert auto.ids == fixed.ids and torch.equal(auto.scores, fixed.scores)
    assert auto.budgets == ["2x4"] * 6 and auto.bytes_read == [300 * ITEM[Budget(2, 4)]] * 6
    assert auto.escalated_fraction == 0.0


def test_a_middle_threshold_escalates_some_queries_and_their_results_are_at_their_budget(index):
    q = embeddings(20, 16, D, seed=24)
    policy = AutoBudget(0.02, top_m=12)
    auto = index.search(q, policy, k=5)
    assert 0 < auto.escalated_fraction < 1, auto.escalations
    for i, budget in enumerate(auto.budgets):
        expected = index.search(q[i : i + 1], budget, k=len(index))  # every live item at that budget
        by_id = dict(zip(expected.ids[0], expected.scores[0].tolist(), strict=True))
        torch.testing.assert_close(auto.scores[i], torch.tensor([by_id[j] for j in auto.ids[i]]), rtol=0, atol=1e-5)
        assert auto.scores[i].tolist() == sorted(auto.scores[i].tolist(), reverse=True)


def test_two_stage_auto_at_full_recall_equals_exhaustive_auto(index):
    pytest.importorskip("faiss")
    q = embeddings(4, 16, D, seed=25)
    policy = AutoBudget(0.02, top_m=12)
    two = index.search(q, policy, k=5, two_stage=True, candidates=300)
    one = index.search(q, policy, k=5)
    assert_same_results(two, one)
    assert two.budgets == one.budgets
    assert [b - e for b, e in zip(two.bytes_read, one.bytes_read, strict=True)] == [-2 * ITEM[Budget(1, 1)]] * 4


def test_the_string_auto_uses_the_policy_stored_beside_the_index(index):
    q = embeddings(3, 16, D, seed=26)
    with pytest.raises(AutoBudgetError, match="plan calibrate"):
        index.search(q, "auto", k=5)
    policy = AutoBudget(0.02, top_m=12)
    policy.save(index.path)
    stored = index.search(q, "auto", k=5)
    assert stored.ids == index.search(q, policy, k=5).ids and stored.policy == policy
    with open_index(index.path, read_only=True) as reader:
        assert reader.search(q, "Auto", k=5).ids == stored.ids


def test_rerank_slots_ranks_a_given_candidate_list(index):
    q = embeddings(1, 16, D, seed=27)
    slots = torch.tensor([3, 150, 201, 40, 299, 0])
    outcome = rerank_slots(index, q, slots, AutoBudget(math.inf, top_m=6), k=6)
    ids = [f"i{s}" for s in slots.tolist()]
    fixed, _ = index.get(ids)
    reference = torch.einsum("id,njd->nij", q[0].double(), fixed.double()).amax(-1).sum(-1)
    assert outcome.rows.tolist() == slots[torch.argsort(reference, descending=True)].tolist()
    assert outcome.bytes_read == 6 * sum(ITEM.values())


def test_bad_auto_searches_fail_with_the_reason(index, tmp_path):
    q = embeddings(2, 16, D, seed=28)
    with pytest.raises(InputError, match="k must be"):
        index.search(q, AutoBudget(0.1), k=0)
    with pytest.raises(ShapeError):
        index.search(embeddings(2, 16, D + 1, seed=1), AutoBudget(0.1), k=3)
    with pytest.raises(BudgetError, match="16x64"):
        index.search(q[:, :8], AutoBudget(0.1), k=3)  # 8 query vectors cannot reach the 16x64 ceiling
    with create_index(tmp_path / "small", D, 16, dtype="fp32") as small:
        small.add(["a"], embeddings(1, 16, D, seed=2))
        with pytest.raises(BudgetError, match="16x64"):
            small.search(q, AutoBudget(0.1), k=1)
        assert small.search(q, AutoBudget(0.1, ceiling=Budget(8, 16)), k=1).ids == [["a"], ["a"]]


def test_bf16_auto_over_two_segments_scores_as_the_fixed_budgets(tmp_path):
    """The rescorer rounds a bf16 index's query once and scores rows of several segments in place: the scores
    are those of a fixed search, bit for bit, and a candidate list in any order gets its own scores back."""
    c = embeddings(120, 64, D, seed=31)
    with create_index(tmp_path / "bf", D, 64, dtype="bf16") as ix:
        ix.add([f"i{j}" for j in range(70)], c[:70])
        ix.add([f"i{j}" for j in range(70, 120)], c[70:])
        q = embeddings(3, 16, D, seed=32)
        auto = ix.search(q, AutoBudget(math.inf, cheap=Budget(2, 4), top_m=120), k=8)
        fixed = ix.search(q, "16x64", k=8)
        assert auto.ids == fixed.ids and torch.equal(auto.scores, fixed.scores)
        slots = torch.tensor([119, 3, 70, 69, 100, 0, 41])
        outcome = rerank_slots(ix, q[:1], slots, AutoBudget(math.inf, top_m=7), k=7)
        every = ix.search(q[:1], "16x64", k=120)
        by_id = dict(zip(every.ids[0], every.scores[0].tolist(), strict=True))
        assert outcome.scores.tolist() == [by_id[f"i{s}"] for s in outcome.rows.tolist()]
        assert sorted(outcome.rows.tolist()) == sorted(slots.tolist())


def test_a_bf16_segment_scores_a_row_list_in_place_as_its_copied_rows(tmp_path):
    """Rescoring reads a bf16 segment's listed rows where they lie (no copy, one kernel view per budget): the scores
    of the gathered rows, bit for bit, at every budget; a row outside the segment is refused, not read."""
    from metaembed.index.kernels import maxsim_grouped

    with create_index(tmp_path / "bf", D, 64, dtype="bf16") as ix:
        ix.add([f"i{j}" for j in range(40)], embeddings(40, 64, D, seed=41))
        segment = ix.segments[0]
        q = embeddings(1, 16, D, seed=42).to(torch.bfloat16)
        rows = torch.tensor([39, 2, 2, 17, 0])
        for budget in Budget.LADDER:
            groups, scales = segment.read(budget, rows)
            assert torch.equal(segment.score(q, budget, rows), maxsim_grouped(q, groups, budget, scales))
            assert segment.kernel_view(budget) is segment.kernel_view(budget)
        with pytest.raises(IndexError):
            segment.score(q, Budget(2, 4), torch.tensor([3, 40]))
