"""Tables, claim checks and plots for docs/results.md from the stored evaluation results.

Reads ``docs/results/mmeb-<method>/mmeb.json`` (MMEB protocol: each query among its own 101 candidates)
and ``docs/results/index-<method>.json`` (test-split retrieval through the on-disk index) for each method,
prints markdown tables (tasks × budgets, Precision@1 in %) and checks the paper's three claims for each
Meta-Token family: the paper's read-out (mmr / nommr) and the mean-anchored one (anchor-mmr / anchor-nommr).

    python benchmarks/mini_results.py [--results docs/results] [--plot docs/results/mmeb-quality.png]
"""

from __future__ import annotations

import argparse
from itertools import pairwise
from pathlib import Path

from metaembed.eval.report import EvalResult, plot_results

FAMILIES = (("mmr", "nommr"), ("anchor-mmr", "anchor-nommr"))  # (MMR run, its NoMMR run with the same settings)
METHODS = (*(m for family in FAMILIES for m in family), "single-last", "single-mean")


def table(results: dict[str, EvalResult], metric: str) -> str:
    first = next(iter(results.values()))
    budgets, tasks = max((r.budgets for r in results.values()), key=len), first.task_names
    lines = ["| task | method | " + " | ".join(budgets) + " |", "|---|---|" + "---|" * len(budgets)]
    for task in [*tasks, "mean"]:
        for method, result in results.items():
            cells = []
            for budget in budgets:
                if budget not in result.budgets:
                    cells.append("–")
                    continue
                if task == "mean":
                    value = result.group_value("overall", budget, metric)
                else:
                    value = result.value(task, budget, metric)
                cells.append(f"{100 * value:.1f}")
            lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claims(results: dict[str, EvalResult], metric: str, mmr_name: str, nommr_name: str) -> list[str]:
    mmr = results[mmr_name]
    out = []
    for task in mmr.task_names:
        values = [mmr.value(task, b, metric) for b in mmr.budgets]
        rising = all(b >= a for a, b in pairwise(values))
        out.append(f"- {mmr_name} rises monotonically on {task}: {'yes' if rising else 'NO'} ({_pcts(values)})")
    single = max(results[m].group_value("overall", "1x1", metric) for m in ("single-last", "single-mean"))
    full = mmr.group_value("overall", mmr.budgets[-1], metric)
    out.append(
        f"- {mmr_name} at {mmr.budgets[-1]} − best single-vector: {100 * (full - single):+.1f} points "
        f"({100 * full:.1f} vs {100 * single:.1f}; target ≥ +3)"
    )
    low, no_mmr = mmr.group_value("overall", "1x1", metric), results[nommr_name].group_value("overall", "1x1", metric)
    out.append(
        f"- {mmr_name} at 1x1 − {nommr_name} at 1x1: {100 * (low - no_mmr):+.1f} points "
        f"({100 * low:.1f} vs {100 * no_mmr:.1f}; target ≥ +5)"
    )
    return out


def all_claims(results: dict[str, EvalResult], metric: str, families) -> str:
    return "\n".join(line for family in families for line in claims(results, metric, *family))


def _pcts(values: list[float]) -> str:
    return " → ".join(f"{100 * v:.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="docs/results")
    parser.add_argument("--suffix", default="", help="runs named <method><suffix>, e.g. -500 for the 500-step runs")
    parser.add_argument("--plot", default="docs/results/mmeb-quality.png")
    args = parser.parse_args()
    root = Path(args.results)
    present = [m for m in METHODS if (root / f"index-{m}{args.suffix}.json").is_file()]
    families = [f for f in FAMILIES if all(m in present for m in f)]
    mmeb = {m: EvalResult.load(root / f"mmeb-{m}{args.suffix}" / "mmeb.json") for m in present}
    index = {m: EvalResult.load(root / f"index-{m}{args.suffix}.json") for m in present}
    print("## MMEB protocol: Precision@1 (%) of each query among its own 101 candidates\n")
    print(table(mmeb, "precision_at_1"))
    print("\n" + all_claims(mmeb, "precision_at_1", families))
    print("\n## Test-split retrieval through the index: Precision@1 (%) over all of a task's candidates\n")
    print(table(index, "precision_at_1"))
    print("\n" + all_claims(index, "precision_at_1", families))
    print("\n## Test-split retrieval: Recall@5 (%)\n")
    print(table(index, "recall_at_5"))
    if args.plot:
        runs = f" (runs *{args.suffix})" if args.suffix else ""
        title = f"metaembed-mini, MMEB protocol: mean P@1 over 4 tasks{runs}"
        plot_results(list(mmeb.values()), args.plot, title=title)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
