"""The planner on synthetic curves whose answer is known, its inputs' checks, and the CLI around it."""

from __future__ import annotations

import json

import pytest

from metaembed import Budget
from metaembed.cli import main
from metaembed.eval.report import EvalResult
from metaembed.plan.measurements import PlanError, Setting, cost_rows_from_bench, load_quality
from metaembed.plan.planner import Target, make_plan, markdown, predict

D = 8
# quality rises with the budget except 8x16, which is worse than 4x8 and slower: never on the frontier
QUALITY = {"1x1": 0.40, "2x4": 0.60, "4x8": 0.70, "8x16": 0.65, "16x64": 0.74}
# one query's latency at N = 1,000 (bf16); int8 is slower to score but half the bytes
P50 = {"1x1": 0.1, "2x4": 0.4, "4x8": 0.8, "8x16": 1.6, "16x64": 6.4}


def write_quality(path, values=QUALITY, datasets=None):
    scores = [dict(task="t", budget=b, metric="precision_at_1", value=v) for b, v in values.items()]
    groups = [dict(group="overall", budget=b, metric="precision_at_1", value=v) for b, v in values.items()]
    EvalResult(
        "mmeb", {"name": "synthetic"}, "precision_at_1", list(values), D, datasets or [{"name": "t"}], scores, groups
    ).to_json(path)
    return str(path)


def bench_rows(dtype="bf16", n=1000, slower=1.0):
    return [
        {
            "budget": b,
            "dtype": dtype,
            "n": n,
            "dim": D,
            "latency_ms": slower * p,
            "latency_ms_p99": 2 * slower * p,
            "queries": 1,
        }
        for b, p in P50.items()
    ]


@pytest.fixture
def quality(tmp_path):
    return load_quality([write_quality(tmp_path / "q.json")])


def test_latency_target_picks_the_best_quality_that_fits_and_says_why(quality):
    costs = cost_rows_from_bench(bench_rows(), "bench.json")
    plan = make_plan(quality, costs, n=2000, dim=D, target=Target(max_latency_ms=2.0))  # ×2 at N = 2,000
    assert str(plan.recommended.setting) == "4x8 bf16 exhaustive"  # 1.6 ms; 16x64 needs 12.8
    assert plan.recommended.p50_ms == pytest.approx(1.6) and plan.recommended.p99_ms == pytest.approx(3.2)
    assert "16x64 bf16 exhaustive" in plan.why and "12.80 ms" in plan.why
    assert [str(o.setting.budget) for o in plan.options if o.frontier] == ["1x1", "2x4", "4x8", "16x64"]
    assert plan.recommended.index_bytes == 2000 * 8 * D * 2
    p99 = make_plan(quality, costs, n=2000, dim=D, target=Target(max_latency_ms=2.0, stat="p99"))
    assert str(p99.recommended.setting.budget) == "2x4"  # its p99 is 1.6 ms; 4x8's is 3.2


def test_quality_floor_picks_the_fastest_setting_that_reaches_it(quality):
    costs = cost_rows_from_bench(bench_rows(), "bench.json")
    plan = make_plan(quality, costs, n=1000, dim=D, target=Target(min_quality=0.65))
    assert str(plan.recommended.setting.budget) == "4x8"  # 8x16 also reaches 65 % but is slower
    plan = make_plan(quality, costs, n=1000, dim=D, target=Target(min_quality=0.72))
    assert str(plan.recommended.setting.budget) == "16x64"
    with pytest.raises(PlanError, match=r"no setting meets quality ≥ 80 %.*16x64"):
        make_plan(quality, costs, n=1000, dim=D, target=Target(min_quality=0.8))


def test_memory_targets_and_assumed_int8_quality(quality, tmp_path):
    costs = cost_rows_from_bench(bench_rows() + bench_rows("int8", slower=1.5), "bench.json")
    per_item = Target(max_bytes_per_item=100)  # 4x8 takes 128 B in bf16, 8·(8 + 4) = 96 B in int8
    plan = make_plan(quality, costs, n=1000, dim=D, target=per_item)
    assert str(plan.recommended.setting) == "2x4 bf16 exhaustive"  # int8's quality is only assumed
    assert any("int8 storage not measured" in note for note in plan.notes)
    trusting = make_plan(quality, costs, n=1000, dim=D, target=per_item, allow_assumed=True)
    assert str(trusting.recommended.setting) == "4x8 int8 exhaustive"
    measured = load_quality([write_quality(tmp_path / "q.json"), "int8=" + write_quality(tmp_path / "i.json")])
    plan = make_plan(measured, costs, n=1000, dim=D, target=Target(max_index_bytes=1000 * 8 * (D + 4)))
    assert str(plan.recommended.setting) == "4x8 int8 exhaustive" and plan.recommended.quality_measured


def test_costs_scale_with_n_from_the_nearest_measurement():
    rows = cost_rows_from_bench(bench_rows(n=1000) + bench_rows(n=100_000, slower=0.5), "b.json")
    p50, p99, source = predict(rows, Setting(Budget(4, 8), "bf16"), n=50_000, dim=D)
    assert p50 == pytest.approx(0.4 * 0.5) and p99 == pytest.approx(0.8 * 0.5) and "scaled ×0.5" in source
    assert predict(rows, Setting(Budget(4, 8), "bf16"), n=50_000, dim=D + 1) is None


@pytest.mark.parametrize(
    "target, message",
    [
        ({}, "give exactly one target"),
        ({"max_latency_ms": 1.0, "min_quality": 0.5}, "got max_latency_ms, min_quality"),
        ({"max_latency_ms": -1.0}, "must be a positive number"),
        ({"max_latency_ms": 1.0, "stat": "p90"}, "p50 or p99"),
    ],
)
def test_bad_targets_are_refused(target, message):
    with pytest.raises(PlanError, match=message):
        Target(**target)


def test_bad_inputs_are_refused(tmp_path):
    q = write_quality(tmp_path / "q.json")
    with pytest.raises(PlanError, match="two quality files measure budget 1x1"):
        load_quality([q, q])
    with pytest.raises(PlanError, match="unknown tag"):
        load_quality(["fp8=" + q])
    with pytest.raises(PlanError, match="does not exist"):
        load_quality([str(tmp_path / "missing.json")])
    with pytest.raises(PlanError, match="lacks a field"):
        cost_rows_from_bench([{"budget": "1x1"}], "b.json")
    with pytest.raises(PlanError, match="not `metaembed bench scoring"):
        cost_rows_from_bench({"rows": []}, "b.json")
    with pytest.raises(PlanError, match="no setting has both"):
        make_plan(load_quality([q]), cost_rows_from_bench(bench_rows(), "b"), 10, D + 1, Target(max_latency_ms=1))


def test_cli_json_table_plot_and_errors(tmp_path, capsys):
    q = write_quality(tmp_path / "q.json")
    (tmp_path / "bench.json").write_text(json.dumps(bench_rows()))
    argv = ["plan", "--quality", q, "--cost", str(tmp_path / "bench.json"), "--n", "1000", "--dim", str(D)]
    assert (
        main(
            [
                *argv,
                "--max-latency-ms",
                "1",
                "--json",
                "--plot",
                str(tmp_path / "p.png"),
                "--out",
                str(tmp_path / "plan.json"),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["recommended"]["name"] == "4x8 bf16 exhaustive" and printed == json.loads(
        (tmp_path / "plan.json").read_text()
    )
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert main([*argv, "--min-quality", "60"]) == 0
    table = capsys.readouterr().out
    assert "| 2x4 bf16 exhaustive | 60.0 | 0.40 | 0.80 |" in table and "recommended: 2x4 bf16 exhaustive" in table
    for extra, message in [
        ([], "give exactly one target"),
        (["--max-index-gb", "0"], "positive number"),
        (["--max-latency-ms", "0.01"], "no setting meets"),
    ]:
        assert main([*argv, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["plan", "--max-latency-ms", "1"]) == 2
    assert "metaembed plan: error: give --quality" in capsys.readouterr().err


def test_cli_measures_costs_now_for_an_index(tmp_path, capsys):
    from metaembed.index import create_index

    with create_index(tmp_path / "ix", D, 64, dtype="bf16") as index:
        import torch

        index.add([f"i{j}" for j in range(500)], torch.nn.functional.normalize(torch.randn(500, 64, D), dim=-1))
    q = write_quality(tmp_path / "q.json")
    assert (
        main(
            ["plan", "--quality", q, "--index", str(tmp_path / "ix"), "--repeats", "3", "--min-quality", "70", "--json"]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["n"] == 500 and plan["dim"] == D and plan["recommended"]["name"].endswith("bf16 exhaustive")
    assert all(o["p50_ms"] > 0 and "measured now (N = 500, 3 runs)" in o["cost_source"] for o in plan["options"])
    assert main(["plan", "--quality", q, "--index", str(tmp_path / "ix"), "--n", "5", "--min-quality", "70"]) == 2
    assert "not both" in capsys.readouterr().err


def test_markdown_marks_assumed_quality(quality):
    costs = cost_rows_from_bench(bench_rows() + bench_rows("int8"), "b")
    text = markdown(make_plan(quality, costs, 1000, D, Target(max_latency_ms=1.0)))
    assert "| 4x8 int8 exhaustive | 70.0 (assumed) |" in text and "note: 1x1 int8 exhaustive" in text
