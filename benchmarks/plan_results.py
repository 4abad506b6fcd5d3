"""The tables of docs/planner.md, from the stored JSON (nothing is measured here).

    PYTHONPATH=src python benchmarks/plan_results.py

Reads docs/results/auto-budget/{auto_budget,test}.json (``metaembed plan calibrate`` / ``plan evaluate``),
docs/results/multi-warm300-mmr/mmeb.json (``metaembed eval mmeb`` of the same checkpoint, fp32 scores) and
docs/results/planner*/{plan,check}.json (``benchmarks/planner_check.py``) and prints the markdown blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

from metaembed.auto_budget import AutoBudget
from metaembed.plan.cli import auto_table

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
SHIPPED_EVAL = RESULTS / "multi-warm300-mmr" / "mmeb.json"  # models/metaembed-mini-multi, fp32 scores


def calibration_block(policy_path: Path) -> str:
    policy = AutoBudget.load(policy_path)
    dev = policy.calibration["dev"]
    lines = [
        f"policy: {' → '.join(str(b) for b in policy.steps())}, top_m {policy.top_m}, margin rank "
        f"{policy.margin_rank}, threshold {policy.threshold:.4f} ({policy.calibration['target']}; searched "
        f"{policy.calibration['searched']['points']:,} points)",
        "",
        f"| dev task | {policy.ceiling} P@1 % | auto P@1 % |",
        "|---|---|---|",
    ]
    for name, value in dev["ceiling_precision_at_1"].items():
        lines.append(f"| {name} | {100 * value:.1f} | {100 * dev['auto_precision_at_1'][name]:.1f} |")
    lines.append(
        f"\ndev cost: {100 * dev['bytes_ratio']:.1f} % of {policy.ceiling}'s bytes, "
        f"{100 * dev['escalated_fraction']:.1f} % of queries escalated"
    )
    return "\n".join(lines)


def test_block(result_path: Path) -> str:
    result = json.loads(result_path.read_text())
    verdict, overall = result["verdict"], result["overall"]
    machine = result["machine_before"]
    fixed = " · ".join(
        f"{name} {100 * v['precision_at_1']:.1f} % / {v['mean_ms']:.3f} ms"
        for name, v in overall.items()
        if name != "auto"
    )
    return "\n".join(
        [
            auto_table(result),
            "",
            f"fixed budgets (mean P@1 / mean ms per query): {fixed}",
            f"auto: {100 * overall['auto']['precision_at_1']:.1f} % / {overall['auto']['mean_ms']:.3f} ms; "
            f"mean bytes {overall['auto']['mean_bytes']:,.0f} vs {overall[verdict['ceiling']]['mean_bytes']:,.0f}",
            f"machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, load "
            f"average {machine['load_average']} before and {result['machine_after']['load_average']} after; "
            f"{result['repeats']} timed runs per query and setting (median), {result['dtype']} index",
        ]
    )


def storage_block(result_path: Path, fp32_path: Path) -> str:
    """bf16 index (plan evaluate) against fp32 scores (metaembed eval mmeb) for the same tasks, per budget."""
    from metaembed.eval.report import EvalResult

    result, fp32 = json.loads(result_path.read_text()), EvalResult.load(fp32_path)
    names = [t["task"] for t in result["tasks"]]
    lines = ["| budget | fp32 scores (eval mmeb) | bf16 index (plan evaluate) |", "|---|---|---|"]
    for budget in fp32.budgets:
        reference = sum(fp32.value(n, budget) for n in names) / len(names)
        lines.append(f"| {budget} | {100 * reference:.2f} | {100 * result['overall'][budget]['precision_at_1']:.2f} |")
    return "\n".join(lines)


def check_block(folder: Path) -> str:
    check = json.loads((folder / "check.json").read_text())
    plan = json.loads((folder / "plan.json").read_text())
    machine = check["machine"]
    lines = [
        f"`{check['command']}`",
        "",
        f"target: {plan['target']['text']} at N = {check['n']:,}, D = {check['dim']} → **{check['pick']}**",
        "",
        "| setting | quality % | p50 ms | p99 ms | index GB | frontier |",
        "|---|---|---|---|---|---|",
    ]
    for option in plan["options"]:
        mark = "yes" if option["frontier"] else ""
        lines.append(
            f"| {option['name']} | {100 * option['quality']:.1f} | {option['p50_ms']:.2f} | {option['p99_ms']:.2f} "
            f"| {option['index_bytes'] / 1e9:.3f} | {mark} |"
        )
    lines += [
        "",
        f"predicted p50 {check['predicted']['p50_ms']:.1f} ms (p99 {check['predicted']['p99_ms']:.1f}); measured "
        f"on the index p50 {check['measured']['p50_ms']:.1f} ms (p99 {check['measured']['p99_ms']:.1f}) over "
        f"{check['measured']['runs']} queries: measured / predicted = {check['p50_measured_over_predicted']:.2f}",
        f"load average {machine['before_bench']['load_average']} before the bench, "
        f"{machine['after_index_search']['load_average']} after the index search; torch threads "
        f"{check['torch_threads']} on {machine['before_bench']['cores']} cores ({machine['before_bench']['cpu']})",
    ]
    return "\n".join(lines)


def main() -> None:
    folder = RESULTS / "auto-budget"
    print("## auto: calibration on dev\n")
    print(calibration_block(folder / "auto_budget.json"))
    print("\n## auto: test split\n")
    print(test_block(folder / "test.json"))
    print("\n## storage: mean P@1 % over the same tasks\n")
    print(storage_block(folder / "test.json", SHIPPED_EVAL))
    for check in sorted(RESULTS.glob("planner*/check.json")):
        print(f"\n## planner check: {check.parent.name}\n")
        print(check_block(check.parent))


if __name__ == "__main__":
    main()
