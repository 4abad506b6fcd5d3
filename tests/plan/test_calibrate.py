"""Calibrating the auto budget: the sweep predicts what the policy then does, the choice meets its target,
the test-split check runs the same code through an index, and the CLI ties them together."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from metaembed import Budget
from metaembed.auto_budget import AutoBudget, escalate
from metaembed.cli import main
from metaembed.plan.auto_eval import evaluate_policy
from metaembed.plan.calibrate import CalibrationError, choose, correct_at_1, query_tables, sweep
from metaembed.plan.encoded import EncodedTask
from metaembed.scoring import maxsim


def synthetic_task(name: str, seed: int, queries: int = 40, candidates: int = 30, dim: int = 16) -> EncodedTask:
    """Each query is a noisy copy of some vectors of its gold candidate: more vectors find it more often."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.nn.functional.normalize(torch.randn(candidates, 64, dim, generator=gen), dim=-1)
    gold = torch.randint(0, candidates, (queries,), generator=gen)
    picks = torch.randint(0, 64, (queries, 16), generator=gen)
    q = c[gold[:, None], picks] + 1.2 * torch.randn(queries, 16, dim, generator=gen)
    q = torch.nn.functional.normalize(q, dim=-1)
    lists = []
    for i in range(queries):
        others = torch.randperm(candidates, generator=gen)
        lists.append(torch.cat([gold[i : i + 1], others[others != gold[i]][:20]]))
    return EncodedTask(name, q, c, torch.arange(queries), lists)


@pytest.fixture(scope="module")
def tasks():
    return [synthetic_task("a", 1, queries=24), synthetic_task("b", 2, queries=24)]


def _precision(task: EncodedTask, policy: AutoBudget) -> tuple[float, float]:
    """Run the policy with real MaxSim on each query's candidates: precision@1 and bytes read."""
    right, spent = [], []
    size = {b: b.r_c * 16 * 2 for b in Budget.LADDER}
    for record, rows in enumerate(task.candidate_lists):
        q = task.queries[int(task.query_of[record])][None]

        local = torch.arange(len(rows))
        pool = task.candidates[rows]

        def local_score(budget: Budget, r: torch.Tensor, q=q, pool=pool) -> torch.Tensor:
            return maxsim(q.double(), pool[r].double(), budget)[0].float()

        outcome = escalate(
            policy,
            local,
            local_score(policy.cheap, local),
            local_score,
            size.__getitem__,
            k=2,
            bytes_read=len(rows) * size[policy.cheap],
        )
        right.append(correct_at_1(outcome.rows, outcome.scores, 0))
        spent.append(outcome.bytes_read)
    return float(np.mean(right)), float(np.sum(spent))


def test_the_sweep_predicts_what_the_policy_does(tasks):
    points, ceiling = sweep(tasks, top_m=(4, 30))
    assert {p.policy.steps()[0] for p in points} == {Budget(1, 1), Budget(2, 4)}
    rng = np.random.default_rng(0)
    for point in [points[i] for i in rng.choice(len(points), 6, replace=False)]:
        measured = [_precision(task, point.policy) for task in tasks]
        assert [m[0] for m in measured] == pytest.approx(point.quality, abs=1e-9), point.policy
        ceiling_bytes = sum(len(r) for t in tasks for r in t.candidate_lists) * 64 * 16 * 2
        assert sum(m[1] for m in measured) / ceiling_bytes == pytest.approx(point.cost)
    everything = [
        p for p in points if p.policy.threshold == math.inf and p.policy.top_m == 30 and len(p.policy.steps()) == 2
    ]
    assert everything and all(p.quality == pytest.approx(ceiling) for p in everything)


def test_the_ceiling_quality_and_the_choice_meet_the_target(tasks):
    points, ceiling = sweep(tasks)
    for task, value in zip(tasks, ceiling, strict=True):
        table = query_tables(task, [Budget(16, 64)])
        assert value == pytest.approx(np.mean([float((t[0, 1:] < t[0, 0]).all()) for t in table]))
    for within in (0.0, 0.05):
        best = choose(points, ceiling, within)
        assert all(q >= c - within - 1e-9 for q, c in zip(best.quality, ceiling, strict=True))
        assert best.cost == min(
            p.cost for p in points if all(q >= c - within - 1e-9 for q, c in zip(p.quality, ceiling, strict=True))
        )
    loose = choose(points, ceiling, 0.05, per_task=False)
    assert loose.cost <= choose(points, ceiling, 0.05).cost
    with pytest.raises(CalibrationError, match="no threshold reaches"):
        choose([p for p in points if p.policy.threshold == 0.0], [1.1, 1.1], 0.0)
    with pytest.raises(CalibrationError, match="≥ 0 points"):
        choose(points, ceiling, -0.01)


def test_correct_at_1_never_gives_a_tie_to_the_gold():
    assert correct_at_1(torch.tensor([0, 3]), torch.tensor([2.0, 1.0]), 0)
    assert not correct_at_1(torch.tensor([0, 3]), torch.tensor([2.0, 2.0]), 0)
    assert not correct_at_1(torch.tensor([3, 0]), torch.tensor([2.0, 1.0]), 0)
    assert correct_at_1(torch.tensor([0]), torch.tensor([2.0]), 0)


def test_the_test_split_check_runs_through_an_index(tasks, tmp_path):
    small = [synthetic_task("c", 3, queries=10), synthetic_task("d", 4, queries=10)]
    _, ceiling = sweep(small, top_m=(30,))
    always = AutoBudget(math.inf, cheap=Budget(2, 4), top_m=30)
    result = evaluate_policy(small, always, tmp_path, dtype="fp32", repeats=1)
    for task_result, value in zip(result["tasks"], ceiling, strict=True):
        fixed = task_result["settings"]["16x64"]
        auto = task_result["settings"]["auto"]
        assert fixed["precision_at_1"] == pytest.approx(value)  # fp32 storage: the same ranking as fp32 tables
        assert auto["precision_at_1"] == pytest.approx(value) and auto["escalated_fraction"] == 1.0
        assert fixed["mean_bytes"] == 21 * 64 * 16 * 4
    assert result["verdict"]["overall_points_vs_ceiling"] == pytest.approx(0.0)
    never = evaluate_policy(small[:1], AutoBudget(0.0), tmp_path, dtype="fp32", repeats=1)
    settings = never["tasks"][0]["settings"]
    assert settings["auto"]["precision_at_1"] == settings["1x1"]["precision_at_1"]
    assert settings["auto"]["mean_bytes"] == settings["1x1"]["mean_bytes"] and never["verdict"]["bytes_ratio"] == 1 / 64
    assert not any(tmp_path.iterdir())  # the temporary indexes are gone


def _mmeb_folder(path, seed: int, count: int = 6) -> None:
    """A text-only MMEB-style task: each query names one of the documents."""
    words = ["apple", "river", "stone", "cloud", "violin", "tiger", "lamp", "ocean", "maple", "engine"]
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    rows = []
    for i in range(count):
        gold = f"notes about the {words[(seed + i) % 10]} and the {words[(seed + 3 * i) % 10]}"
        others = [f"notes about the {words[j]} and the {words[(j + 5) % 10]}" for j in rng.choice(10, 4, replace=False)]
        others = [o for o in others if o != gold]
        rows.append(
            {
                "qry_text": f"find the {words[(seed + i) % 10]}",
                "qry_img_path": "",
                "tgt_text": [gold, *others],
                "tgt_img_path": [""] * (1 + len(others)),
            }
        )
    (path / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_calibrates_on_dev_stores_the_policy_and_evaluates_on_test(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from metaembed.index import create_index

    monkeypatch.setenv("METAEMBED_CACHE", str(tmp_path / "cache"))
    _mmeb_folder(tmp_path / "dev", 1)
    _mmeb_folder(tmp_path / "test", 2)
    create_index(tmp_path / "ix", 16, 64).close()
    model = ["--model", str(tiny_checkpoint)]
    out = tmp_path / "policy.json"
    assert (
        main(
            [
                "plan",
                "calibrate",
                *model,
                "--data",
                str(tmp_path / "dev"),
                "--within",
                "0",
                "--out",
                str(out),
                "--save-to",
                str(tmp_path / "ix"),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    policy = AutoBudget.load(out)
    assert AutoBudget.load(tmp_path / "ix") == policy and "auto budget:" in printed and "| words |" in printed
    dev = policy.calibration["dev"]
    assert dev["auto_precision_at_1"]["words"] >= dev["ceiling_precision_at_1"]["words"]
    assert policy.calibration["data"][0]["name"] == "words"
    assert list((tmp_path / "cache" / "encodings").rglob("*.safetensors"))  # kept for the next run
    result = tmp_path / "test.json"
    assert (
        main(
            [
                "plan",
                "evaluate",
                *model,
                "--data",
                str(tmp_path / "test"),
                "--policy",
                str(out),
                "--repeats",
                "1",
                "--out",
                str(result),
                "--plot",
                str(tmp_path / "auto.png"),
                "--plot-tasks",
                "words",
            ]
        )
        == 0
    )
    assert "| words |" in capsys.readouterr().out and (tmp_path / "auto.png").stat().st_size > 10_000
    assert json.loads(result.read_text())["verdict"]["ceiling"] == "16x64"
    assert main(["plan", "evaluate", *model, "--data", str(tmp_path / "dev"), "--policy", str(out)]) == 2
    assert "calibrated on ['words']" in capsys.readouterr().err
    assert main(["plan", "calibrate", *model, "--data", str(tmp_path / "dev")]) == 2
    assert "say where the policy goes" in capsys.readouterr().err
