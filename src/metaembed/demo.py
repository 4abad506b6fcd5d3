"""``metaembed demo``: the main job — the shipped metaembed-mini on real test splits, at every budget.

It loads the checkpoint (Meta Tokens, projector and LoRA from the repository; MiniLM and MobileNetV2
from their pip packages), indexes each task's test-split candidates in the on-disk index, searches
them with every test query at each ladder budget, and prints Precision@1 and Recall@5 with the scoring
latency and the index bytes each budget reads. It writes the result JSON and a quality-vs-budget plot
that overlays the baselines' stored results (same protocol, see docs/results.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "models/metaembed-mini"
DEFAULT_SOURCES = ("openclipart", "emoji")
ITEMS_PER_SECOND = 12  # mini encodes on a 2-core CPU shared with other work (docs/results.md); quiet: more
DEFAULT_BASELINES = (  # trained with the shipped model's recipe, only loss.variant changed (docs/results.md)
    "docs/results/index-anchor-nommr-500.json",
    "docs/results/index-single-last-500.json",
    "docs/results/index-single-mean-500.json",
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="the main job: shipped metaembed-mini, real test splits indexed, P@1 / R@5 at every budget"
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory (default: %(default)s)")
    parser.add_argument("--data", default="data", help="built datasets folder, see `make data` (default: %(default)s)")
    parser.add_argument("--sources", nargs="+", default=list(DEFAULT_SOURCES), help="datasets under --data")
    parser.add_argument("--budgets", default=None, help="comma-separated budgets, e.g. 1x1,16x64 (default: ladder)")
    parser.add_argument("--index-dir", default="runs/demo/index", help="where the indexes are written")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "int8"), default="bf16", help="index storage dtype")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--label", default="MMR (shipped)", help="this model's name in the table and the plot")
    parser.add_argument("--json", default="runs/demo/result.json", help="where the result JSON is written")
    parser.add_argument("--plot", default="docs/demo-quality.png", help="quality-vs-budget plot ('' to skip)")
    parser.add_argument("--compare", nargs="*", default=list(DEFAULT_BASELINES), help="results to overlay")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import transformers

    from metaembed.budget import Budget
    from metaembed.errors import DataError
    from metaembed.eval.index_retrieval import evaluate_index_retrieval
    from metaembed.eval.mmeb import load_datasets
    from metaembed.eval.report import plot_results
    from metaembed.model import MetaEmbedModel

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    folders = [Path(args.data) / source for source in args.sources]
    missing = [str(f) for f in folders if not (f / "eval").is_dir()]
    if missing:
        raise DataError(f"no built test split in {missing}; run `make data` (fetches and builds them) first")
    budgets = Budget.parse_many(args.budgets) if args.budgets else None
    began = time.perf_counter()
    print(f"demo: loading {args.model}")
    model = MetaEmbedModel.from_pretrained(args.model)
    datasets = [d for folder in folders for d in load_datasets(folder)]
    count = sum(len(set(d.queries)) + len({k for c in d.candidates for k in c}) for d in datasets)
    print(
        f"demo: {len(datasets)} tasks, {count:,} queries and candidates to encode: about "
        f"{max(1, round(count / ITEMS_PER_SECOND / 60))} min on a 2-core CPU (a bar per encode shows what is left)",
        flush=True,
    )
    result = evaluate_index_retrieval(
        ShowProgress(model), datasets, args.index_dir, budgets, dtype=args.dtype, batch_size=args.batch_size,
        model_name=args.label, progress=lambda line: print(f"demo: {line}", flush=True),
    )  # fmt: skip
    print(f"\n{args.label}: each query searches all of its task's test-split candidates ({args.dtype} index)\n")
    print("| task | candidates | budget | P@1 | R@5 | scoring ms / query | index bytes |")
    print("|---|---|---|---|---|---|---|")
    for dataset in result.datasets:
        for budget in result.budgets:
            p1, r5, ms, nbytes = (
                result.value(dataset["name"], budget, m)
                for m in ("precision_at_1", "recall_at_5", "latency_ms", "index_bytes")
            )
            print(
                f"| {dataset['name']} | {dataset['num_candidates']} | {budget} | {100 * p1:.1f} "
                f"| {100 * r5:.1f} | {ms:.3f} | {int(nbytes):,} |"
            )
    print("\n| budget | mean P@1 | mean R@5 |\n|---|---|---|")
    for budget in result.budgets:
        p1, r5 = (result.group_value("overall", budget, m) for m in ("precision_at_1", "recall_at_5"))
        print(f"| {budget} | {100 * p1:.1f} | {100 * r5:.1f} |")
    print(f"\ndemo: result written to {result.to_json(args.json)}")
    if args.plot:
        others = [path for path in args.compare if Path(path).is_file()]
        plot = plot_results([result, *others], args.plot, title="Test-split retrieval: mean P@1 over tasks")
        print(f"demo: plot written to {plot} ({1 + len(others)} lines)")
    print(f"demo: {args.label} done in {(time.perf_counter() - began) / 60:.1f} min")
    return 0


class ShowProgress:
    """The model with a progress bar on every encode — the demo's long steps — even when output is not a terminal."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode_queries(self, items, **kwargs):
        return self._model.encode_queries(items, show_progress_bar=True, **kwargs)

    def encode_candidates(self, items, **kwargs):
        return self._model.encode_candidates(items, show_progress_bar=True, **kwargs)
