"""Tables and target checks for the multi-aspect results in docs/results.md, from the stored JSON only.

Reads ``docs/results/multi-<label>/`` for each run (written by ``scripts/eval_multi_aspect.sh MODEL LABEL``):
``mmeb.json`` (MMEB protocol, P@1), ``vidore.json`` (full corpus, nDCG@5), ``dev/mmeb.json`` (the dev split,
for choosing between models) and ``spread.json`` (mean pairwise cosine of an item's vectors). Prints markdown:
one table per protocol (multi-aspect tasks × runs × budgets, then the single-aspect mean), the dev table,
the spread, and every target with its margin.

    python benchmarks/multi_aspect_results.py --mmr slots-mmr --nommr slots-nommr \
        --singles single-mean single-last --others shipped [--plot docs/results/multi-aspect-quality.png]
    python benchmarks/multi_aspect_results.py --summary warm-div-mmr warm-div-w3-mmr …   (one row per run)
    python benchmarks/multi_aspect_results.py --card models/metaembed-mini-multi LABEL   (its model card's table)
"""

from __future__ import annotations

import argparse
import json
from itertools import pairwise
from pathlib import Path

from metaembed.eval.report import EvalResult, mean, plot_results

SHEETS_PREFIX = "sheets_"
MULTI_PREFIXES = (SHEETS_PREFIX, "stdlib_")
SINGLE_ASPECT = ("openclipart_t2i", "openclipart_i2t", "emoji_t2i", "emoji_i2t")
SHIPPED_SINGLE_ASPECT_16X64 = 25.9  # the previous shipped model, MMEB protocol, mean over the 4 tasks


def load(root: Path, label: str, name: str) -> EvalResult | None:
    path = root / f"multi-{label}" / name
    return EvalResult.load(path) if path.is_file() else None


def multi_tasks(result: EvalResult) -> list[str]:
    return [t for t in result.task_names if t.startswith(MULTI_PREFIXES)]


def value(result: EvalResult, task: str, budget: str, metric: str) -> float | None:
    if budget not in result.budgets:
        budget = result.budgets[-1] if len(result.budgets) == 1 else budget  # single vector: its one budget
    return 100 * result.value(task, budget, metric) if budget in result.budgets else None


def task_mean(result: EvalResult, tasks: list[str], budget: str, metric: str) -> float | None:
    values = [value(result, t, budget, metric) for t in tasks if t in result.task_names]
    return mean(values) if values and None not in values and len(values) == len(tasks) else None


def table(results: dict[str, EvalResult], metric: str, budgets: list[str]) -> str:
    tasks = multi_tasks(next(iter(results.values())))
    head = "| task | run | " + " | ".join(budgets) + " |"
    lines = [head, "|---|---|" + "---|" * len(budgets)]
    rows = [*tasks, "multi-aspect mean", "sheets mean"]
    if any(set(SINGLE_ASPECT) <= set(r.task_names) for r in results.values()):
        rows.append("single-aspect mean (OpenClipArt, emoji)")
    for row in rows:
        chosen = {
            "multi-aspect mean": tasks,
            "sheets mean": [t for t in tasks if t.startswith(SHEETS_PREFIX)],
            "single-aspect mean (OpenClipArt, emoji)": list(SINGLE_ASPECT),
        }.get(row, [row])
        for label, result in results.items():
            cells = [task_mean(result, chosen, b, metric) for b in budgets]
            if all(c is None for c in cells):
                continue
            text = ["–" if c is None else f"{c:.1f}" for c in cells]
            lines.append(f"| {row} | {label} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def checks(results: dict[str, EvalResult], metric: str, args) -> list[str]:
    """Each target for the MMR run, with its margin (positive = met)."""
    mmr = results[args.mmr]
    budgets = mmr.budgets
    tasks = multi_tasks(mmr)
    sheets = [t for t in tasks if t.startswith(SHEETS_PREFIX)]
    out = []
    for task in tasks:
        values = [value(mmr, task, b, metric) for b in budgets]
        worst = min(b - a for a, b in pairwise(values))
        out.append(f"- rises on {task} (each step ≥ previous − 0.5): {'met' if worst >= -0.5 else 'MISSED'} "
                   f"({' → '.join(f'{v:.1f}' for v in values)}; worst step {worst:+.1f})")  # fmt: skip
    gain_sheets = task_mean(mmr, sheets, budgets[-1], metric) - task_mean(mmr, sheets, budgets[0], metric)
    gain_all = task_mean(mmr, tasks, budgets[-1], metric) - task_mean(mmr, tasks, budgets[0], metric)
    out.append(f"- sheets {budgets[-1]} − {budgets[0]}: {gain_sheets:+.1f} (target ≥ +15)")
    out.append(f"- multi-aspect mean {budgets[-1]} − {budgets[0]}: {gain_all:+.1f} (target ≥ +5)")
    singles = [s for s in args.singles if s in results]
    if singles:
        for name, chosen, target in (("sheets", sheets, 15), ("multi-aspect mean", tasks, 5)):
            best = max(singles, key=lambda s: task_mean(results[s], chosen, "1x1", metric))
            margin = task_mean(mmr, chosen, budgets[-1], metric) - task_mean(results[best], chosen, "1x1", metric)
            out.append(f"- {name}: MMR {budgets[-1]} − best single-vector ({best}): {margin:+.1f} (target ≥ +{target})")
    if args.nommr in results:
        nommr = results[args.nommr]
        margin = task_mean(mmr, tasks, "1x1", metric) - task_mean(nommr, tasks, "1x1", metric)
        out.append(f"- multi-aspect mean: MMR 1x1 − NoMMR 1x1: {margin:+.1f} (target ≥ +5)")
    single = task_mean(mmr, list(SINGLE_ASPECT), budgets[-1], metric)
    if single is not None and metric == "precision_at_1":
        margin = single - SHIPPED_SINGLE_ASPECT_16X64
        out.append(f"- single-aspect MMEB P@1 at {budgets[-1]}: {single:.1f} vs the previous model's "
                   f"{SHIPPED_SINGLE_ASPECT_16X64} ({margin:+.1f}; target ≥ 0)")  # fmt: skip
    return out


def summary(root: Path, labels: list[str]) -> str:
    """One row per run, MMEB protocol: the sheets ladder's ends, its worst step, the means and the spread."""
    head = ("| run | sheets 1x1 | sheets 16x64 | gain | worst ladder step (any task) | multi-aspect 16x64 "
            "| single-aspect 16x64 | dev multi-aspect 16x64 | page spread |")  # fmt: skip
    lines = [head, "|---|" + "---|" * 8]
    budgets = ["1x1", "2x4", "4x8", "8x16", "16x64"]
    for label in labels:
        test, dev = load(root, label, "mmeb.json"), load(root, label, "dev/mmeb.json")
        if test is None:
            raise SystemExit(f"no docs/results/multi-{label}/mmeb.json")
        tasks = multi_tasks(test)
        sheets = [t for t in tasks if t.startswith(SHEETS_PREFIX)]
        worst = min(b - a for t in tasks for a, b in pairwise([value(test, t, x, "precision_at_1") for x in budgets]))
        low, high = (task_mean(test, sheets, b, "precision_at_1") for b in ("1x1", "16x64"))
        single = task_mean(test, list(SINGLE_ASPECT), "16x64", "precision_at_1")
        dev_mean = task_mean(dev, multi_tasks(dev), "16x64", "precision_at_1") if dev else None
        spread_file = root / f"multi-{label}" / "spread.json"
        spread = json.loads(spread_file.read_text())["candidate_pairwise_cosine"] if spread_file.is_file() else None
        cells = [low, high, high - low, worst, task_mean(test, tasks, "16x64", "precision_at_1"), single, dev_mean]
        text = ["–" if c is None else f"{c:+.1f}" if i in (2, 3) else f"{c:.1f}" for i, c in enumerate(cells)]
        lines.append(f"| {label} | " + " | ".join(text) + f" | {'–' if spread is None else f'{spread:.3f}'} |")
    return "\n".join(lines)


def card_quality(root: Path, label: str) -> dict[str, dict[str, float]]:
    """The model card's budget table (fractions, as the service shows them) from one run's stored results."""
    test, corpus = load(root, label, "mmeb.json"), load(root, label, "vidore.json")
    if test is None or corpus is None:
        raise SystemExit(f"no docs/results/multi-{label}/mmeb.json and vidore.json")
    sheets = [t for t in multi_tasks(test) if t.startswith(SHEETS_PREFIX)]
    columns = {  # card column → (results, tasks, metric)
        "OpenClipArt+emoji MMEB P@1": (test, list(SINGLE_ASPECT), "precision_at_1"),
        "sheets MMEB P@1": (test, sheets, "precision_at_1"),
        "sheets nDCG@5 (full corpus)": (corpus, sheets, "ndcg_at_5"),
        "stdlib MMEB P@1": (test, ["stdlib_sections"], "precision_at_1"),
    }
    quality: dict[str, dict[str, float]] = {}
    for budget in test.budgets:
        for column, (result, tasks, metric) in columns.items():
            score = task_mean(result, tasks, budget, metric)
            if score is not None:
                quality.setdefault(budget, {})[column] = round(score / 100, 4)
    return quality


def write_card(model_dir: Path, label: str, root: Path) -> None:
    """Rewrite ``model_dir/README.md`` with the budget table of run ``label`` (the checkpoint it evaluated)."""
    from metaembed import MetaEmbedModel
    from metaembed.model.card import render_model_card

    model = MetaEmbedModel.from_pretrained(model_dir)
    card = render_model_card(model.config, model.embedding_dim, card_quality(root, label))
    (model_dir / "README.md").write_text(card, encoding="utf-8")
    print(card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("docs/results"))
    parser.add_argument("--mmr", help="label of the MMR run the targets are checked for")
    parser.add_argument("--nommr", default="", help="label of its NoMMR run (same settings)")
    parser.add_argument("--singles", nargs="*", default=[], help="labels of single-vector runs (same settings)")
    parser.add_argument("--others", nargs="*", default=[], help="more labels to show, e.g. shipped")
    parser.add_argument("--plot", type=Path, help="quality vs budget and bytes, MMEB protocol, multi-aspect mean")
    parser.add_argument("--summary", nargs="+", metavar="LABEL", help="only the one-row-per-run summary of these runs")
    parser.add_argument("--card", nargs=2, metavar=("MODEL_DIR", "LABEL"),
                        help="rewrite MODEL_DIR's model card with the budget table of run LABEL")  # fmt: skip
    args = parser.parse_args()
    if args.card:
        write_card(Path(args.card[0]), args.card[1], args.results)
        return
    if args.summary:
        print(summary(args.results, args.summary))
        return
    if not args.mmr:
        parser.error("--mmr LABEL (or --summary LABEL …) is required")
    labels = [args.mmr, *([args.nommr] if args.nommr else []), *args.singles, *args.others]
    budgets = ["1x1", "2x4", "4x8", "8x16", "16x64"]
    for title, name, metric in (
        ("MMEB protocol: P@1 (%) of each query among its own candidates (gold + 100, 3×3 pages: + 94)",
         "mmeb.json", "precision_at_1"),
        ("Full corpus (BEIR files, `metaembed eval vidore`): nDCG@5 (%)", "vidore.json", "ndcg_at_5"),
        ("Dev split (choosing between runs; never trained on): MMEB-protocol P@1 (%)", "dev/mmeb.json",
         "precision_at_1"),
    ):  # fmt: skip
        results = {label: r for label in labels if (r := load(args.results, label, name)) is not None}
        if not results:
            continue
        print(f"### {title}\n\n{table(results, metric, budgets)}\n")
        if args.mmr in results and name != "dev/mmeb.json":
            print("\n".join(checks(results, metric, args)) + "\n")
    spreads = {label: json.loads(p.read_text()) for label in labels
               if (p := args.results / f"multi-{label}" / "spread.json").is_file()}  # fmt: skip
    if spreads:
        print("### Vector spread: mean pairwise cosine of one item's vectors (64 sheets_t2i_2x2 test items)\n")
        print("| run | query (16 vectors) | candidate page (64 vectors) |\n|---|---|---|")
        for label, spread in spreads.items():
            print(f"| {label} | {spread['query_pairwise_cosine']:.3f} | {spread['candidate_pairwise_cosine']:.3f} |")
        if args.mmr in spreads:
            cosine = spreads[args.mmr]["candidate_pairwise_cosine"]
            print(f"\n- candidate vectors spread (≤ 0.8): {'met' if cosine <= 0.8 else 'MISSED'} ({cosine:.3f})")
    if args.plot:
        results = [r for label in labels if (r := load(args.results, label, "mmeb.json")) is not None]
        plot_results(results, args.plot, title="Multi-aspect tasks, MMEB protocol (mean P@1 over all tasks run)")
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
