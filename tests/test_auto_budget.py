"""The auto-budget policy: validation, storage, the margin, and the escalation walk against references."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metaembed import Budget
from metaembed.auto_budget import AutoBudget, AutoBudgetError, escalate, is_auto, levels, normalised_margin
from metaembed.errors import BudgetError
from metaembed.scoring import maxsim, maxsim_from_similarities, token_similarities


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"threshold": -0.1}, "threshold must be ≥ 0"),
        ({"threshold": float("nan")}, "threshold must be a number"),
        ({"threshold": "0.1"}, "threshold must be a number"),
        ({"top_m": 0}, "top_m must be an int ≥ 1"),
        ({"margin_rank": 1}, "margin_rank must be an int ≥ 2"),
        ({"cheap": Budget(3, 3)}, "cheap budget 3x3 is not on the ladder"),
        ({"cheap": Budget(8, 16), "ceiling": Budget(2, 4)}, "larger than the ceiling"),
        ({"ladder": (Budget(2, 4), Budget(1, 1))}, "must grow"),
    ],
)
def test_bad_policies_are_refused_with_the_reason(changes, message):
    with pytest.raises(AutoBudgetError, match=message):
        AutoBudget(**{"threshold": 0.1, **changes})
    assert issubclass(AutoBudgetError, BudgetError)


def test_steps_run_from_cheap_to_ceiling_along_the_ladder():
    assert AutoBudget(0.1, cheap=Budget(2, 4), ceiling=Budget(8, 16)).steps() == [
        Budget(2, 4),
        Budget(4, 8),
        Budget(8, 16),
    ]
    assert AutoBudget(0.1, cheap=Budget(4, 8), ceiling=Budget(4, 8)).steps() == [Budget(4, 8)]
    assert is_auto("auto") and is_auto(" AUTO ") and is_auto(AutoBudget(0.0))
    assert not is_auto("16x64") and not is_auto(Budget(1, 1)) and not is_auto(None)


def test_policy_round_trips_through_json_and_is_found_beside_an_index_or_model(tmp_path):
    policy = AutoBudget(math.inf, cheap=Budget(2, 4), top_m=8, margin_rank=3, calibration={"target": "x"})
    saved = policy.save(tmp_path)
    assert json.loads(saved.read_text())["threshold"] == "inf"
    loaded = AutoBudget.load(tmp_path)
    assert loaded == policy and loaded.calibration == {"target": "x"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert AutoBudget.find(empty, tmp_path) == policy  # the first folder holding one wins
    with pytest.raises(AutoBudgetError, match=r"none in .*empty"):
        AutoBudget.find(empty)
    saved.write_text("{not json")
    with pytest.raises(AutoBudgetError, match="cannot read"):
        AutoBudget.load(saved)
    saved.write_text(json.dumps({"format": "metaembed-auto-budget", "threshold": 0.1}))
    with pytest.raises(AutoBudgetError, match="incomplete"):
        AutoBudget.load(saved)
    with pytest.raises(AutoBudgetError, match="not a directory"):
        policy.save(saved)


def test_normalised_margin_matches_a_float64_reference():
    scores = torch.randn(50, generator=torch.Generator().manual_seed(1))
    ordered = sorted(scores.double().tolist(), reverse=True)
    for rank in (2, 3, 10):
        expected = (ordered[0] - ordered[rank - 1]) / 4
        assert normalised_margin(scores, Budget(4, 8), rank) == pytest.approx(expected, rel=1e-6)
    assert normalised_margin(scores[:1], Budget(4, 8), 2) == math.inf


def _tensor_scorer(query: torch.Tensor, candidates: torch.Tensor):
    def score(budget: Budget, rows: torch.Tensor) -> torch.Tensor:
        return maxsim(query, candidates[rows], budget)[0]

    return score


def _reference_order(query: torch.Tensor, candidates: torch.Tensor, budget: Budget) -> list[int]:
    sims = token_similarities(query.double(), candidates.double())
    return torch.argsort(maxsim_from_similarities(sims, budget)[0], descending=True).tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_extreme_thresholds_give_the_cheap_and_the_ceiling_rankings(seed):
    q, c = _unit(1, 16, 24, seed=seed), _unit(120, 64, 24, seed=seed + 10)
    score, rows = _tensor_scorer(q, c), torch.arange(120)
    item = {b: b.r_c * 24 * 4 for b in Budget.LADDER}
    for threshold, budget in ((0.0, Budget(1, 1)), (math.inf, Budget(16, 64))):
        policy = AutoBudget(threshold, top_m=120)
        outcome = escalate(policy, rows, score(policy.cheap, rows), score, item.__getitem__, k=10)
        assert outcome.budget == budget
        assert outcome.rows.tolist() == _reference_order(q, c, budget)[:10]
    always = escalate(AutoBudget(math.inf, top_m=7), rows, score(Budget(1, 1), rows), score, item.__getitem__, k=5)
    assert always.escalations == 4 and always.rows.numel() == 5
    assert always.bytes_read == 7 * sum(item[b] for b in Budget.LADDER[1:])  # the cheap stage is the caller's


def test_escalation_stops_at_the_first_level_whose_margin_reaches_the_threshold():
    # a score table per budget: row 0 leads by 0.1 per query vector at 2x4 and by 0.5 at 8x16
    table = {
        Budget(1, 1): torch.tensor([1.0, 1.0, 0.5, 0.2]),
        Budget(2, 4): torch.tensor([2.0, 1.8, 1.0, 0.0]),
        Budget(4, 8): torch.tensor([4.0, 3.8, 1.0, 0.0]),
        Budget(8, 16): torch.tensor([8.0, 4.0, 1.0, 0.0]),
        Budget(16, 64): torch.tensor([16.0, 15.0, 1.0, 0.0]),
    }

    def score(budget: Budget, rows: torch.Tensor) -> torch.Tensor:
        return table[budget][rows]

    walk = list(levels(AutoBudget(1.0, top_m=3), torch.arange(4), table[Budget(1, 1)], score, lambda b: b.r_c, k=1))
    assert [round(m, 6) for m, _ in walk] == [0.0, 0.1, 0.05, 0.5, math.inf]
    assert [o.bytes_read for _, o in walk] == [0, 12, 36, 84, 276]
    for threshold, level in ((0.0, 0), (0.1, 1), (0.3, 3), (0.6, 4)):
        outcome = escalate(
            AutoBudget(threshold, top_m=3), torch.arange(4), table[Budget(1, 1)], score, lambda b: b.r_c, k=1
        )
        assert outcome.escalations == level and outcome.budget == Budget.LADDER[level]
        assert outcome.rows.tolist() == [0]


def test_the_shipped_multi_aspect_model_carries_a_policy_for_its_own_weights():
    from pathlib import Path

    from metaembed.eval.common import fingerprint

    model = Path(__file__).resolve().parents[1] / "models" / "metaembed-mini-multi"
    policy = AutoBudget.find(model)
    config = json.loads((model / "config.json").read_text())
    policy.validate(config["num_query_tokens"], config["num_candidate_tokens"])
    # a retrained model needs a new calibration: the policy names the weights it was fitted for
    assert policy.calibration["model"]["fingerprint"] == fingerprint(sorted(model.glob("*.safetensors")))
