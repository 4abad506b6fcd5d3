"""``metaembed plan`` (recommend a budget / dtype / search mode for a target), ``plan calibrate`` (fit the ``auto``
budget on a dev split) and ``plan evaluate`` (check an ``auto`` policy on a test split)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _progress(message: str) -> None:
    print(f"plan: {message}", file=sys.stderr, flush=True)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="recommend a budget, storage dtype and search mode for a latency / memory / quality target",
        description="Combine quality results (metaembed eval) with scoring costs (metaembed bench scoring, or "
        "measured now at the index's N, D and dtype) into the Pareto frontier and one recommended setting. "
        "Sub-commands: calibrate, evaluate (the per-query auto budget).",
    )
    parser.add_argument(
        "--quality",
        nargs="+",
        metavar="[TAGS=]RESULT.json",
        help="eval result files; tag what a file measured, e.g. int8=r.json or two-stage=r.json "
        "(untagged: fp32 scores, exhaustive)",
    )
    parser.add_argument(
        "--cost",
        nargs="+",
        metavar="BENCH.json",
        help="metaembed bench scoring --json output (best with --queries 1); default: measure now at N and D",
    )
    parser.add_argument("--index", help="index directory: N, D and dtype are read from it")
    parser.add_argument("--n", type=int, help="number of items N (instead of --index)")
    parser.add_argument("--dim", type=int, help="embedding width D (instead of --index)")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=("fp32", "bf16", "int8"),
        help="storage dtypes to measure now (default: the index's, else bf16)",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed queries per setting when measuring now")
    target = parser.add_argument_group("target (exactly one)")
    target.add_argument("--max-latency-ms", type=float, help="scoring latency of one query at N")
    target.add_argument("--max-bytes-per-item", type=float, help="index bytes per item")
    target.add_argument("--max-index-gb", type=float, help="whole index size in GB (10⁹ bytes) at N")
    target.add_argument("--min-quality", type=float, help="quality floor in percent, e.g. 70")
    parser.add_argument("--latency-stat", choices=("p50", "p99"), default="p50", help="which latency a target bounds")
    parser.add_argument("--group", default="overall", help="result group whose quality counts (default overall)")
    parser.add_argument("--task", help="one task's quality instead of a group's")
    parser.add_argument("--metric", help="metric (default: each result's main metric)")
    parser.add_argument(
        "--allow-assumed",
        action="store_true",
        help="may recommend settings whose quality is assumed (int8, two-stage without a result)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--out", help="also write the plan JSON here")
    parser.add_argument("--plot", help="write the quality vs latency / bytes figure here (.png, .svg, .pdf)")
    parser.set_defaults(func=run_plan)
    actions = parser.add_subparsers(dest="plan_command", metavar="ACTION")

    calibrate = actions.add_parser(
        "calibrate",
        help="fit the auto budget's threshold on a dev split",
        description="Encode the dev tasks once, walk every query up the budget ladder, "
        "and keep the cheapest policy within --within points of the ceiling's quality.",
    )
    _data_args(calibrate)
    calibrate.add_argument("--within", type=float, default=0.5, help="points of quality below the ceiling allowed")
    calibrate.add_argument(
        "--overall", action="store_true", help="hold the mean over tasks to --within (default: every task)"
    )
    calibrate.add_argument("--ceiling", default="16x64", help="the largest budget (default 16x64)")
    calibrate.add_argument("--cheap", nargs="+", default=["1x1", "2x4"], help="cheap budgets to try")
    calibrate.add_argument("--top-m", nargs="+", type=int, default=[4, 8, 16, 32], help="shortlist sizes to try")
    calibrate.add_argument("--margin-rank", nargs="+", type=int, default=[2], help="margin between rank 1 and these")
    calibrate.add_argument(
        "--save-to", nargs="+", default=[], metavar="DIR", help="model or index folders to store auto_budget.json in"
    )
    calibrate.add_argument("--out", help="write the policy and the calibration report (JSON) here")
    calibrate.set_defaults(func=run_calibrate)

    evaluate = actions.add_parser(
        "evaluate",
        help="check an auto policy against the fixed budgets on a test split",
        description="Rank each test query among its own candidates, stored in an index, "
        "at every fixed budget and under the policy: precision@1, bytes read, ms.",
    )
    _data_args(evaluate)
    evaluate.add_argument("--policy", required=True, help="auto_budget.json, or a model / index folder holding one")
    evaluate.add_argument("--repeats", type=int, default=3, help="timed runs per query and setting (median)")
    evaluate.add_argument("--k", type=int, default=10, help="results per query")
    evaluate.add_argument("--out", help="write the result JSON here")
    evaluate.add_argument("--plot", help="write the figure here")
    evaluate.add_argument("--plot-tasks", nargs="*", default=[], help="tasks drawn in their own row of the figure")
    evaluate.add_argument("--workdir", help="folder for the temporary indexes (default: a temporary folder)")
    evaluate.set_defaults(func=run_evaluate)


def _data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="metaembed checkpoint folder")
    parser.add_argument("--data", nargs="+", required=True, help="MMEB-style task folders (data/<source>[/dev])")
    parser.add_argument("--image-root", help="folder the image paths are relative to (default: per --data)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "int8"), default="bf16", help="index storage dtype")
    parser.add_argument("--batch-size", type=int, default=32, help="encoding batch size")
    parser.add_argument("--device", help="torch device for the model (default cpu)")


# ------------------------------------------------------------------------------------------ planner
def run_plan(args: argparse.Namespace) -> int:
    if not args.quality:
        raise _error("give --quality RESULT.json [...] and a target, or an action: calibrate, evaluate")
    from metaembed.budget import Budget
    from metaembed.plan.measurements import PlanError, load_costs, load_quality, measure_costs
    from metaembed.plan.planner import Target, make_plan, markdown

    target = Target(
        max_latency_ms=args.max_latency_ms,
        max_bytes_per_item=args.max_bytes_per_item,
        max_index_bytes=args.max_index_gb * 1e9 if args.max_index_gb is not None else None,
        min_quality=args.min_quality / 100 if args.min_quality is not None else None,
        stat=args.latency_stat,
    )
    n, dim, dtypes = _plan_size(args)
    quality = load_quality(args.quality, group=args.group, task=args.task, metric=args.metric)
    if args.cost:
        costs = load_costs(args.cost)
    else:
        if args.repeats < 2:
            raise PlanError(f"--repeats must be at least 2, got {args.repeats}")
        budgets = sorted({key[0] for key in quality}, key=lambda b: (b.r_c, b.r_q)) or list(Budget.LADDER)
        _progress(f"measuring {len(budgets)} budgets × {dtypes} at N = {n:,}, D = {dim} ({args.repeats} queries each)")
        costs = measure_costs(n, dim, dtypes, budgets, args.repeats)
    plan = make_plan(quality, costs, n, dim, target, allow_assumed=args.allow_assumed)
    data = plan.as_dict()
    if args.out:
        from metaembed.eval.report import write_json_atomic

        write_json_atomic(args.out, data)
    if args.plot:
        from metaembed.plan.plots import plot_plan

        _progress(f"wrote {plot_plan(plan, args.plot)}")
    print(json.dumps(data, indent=2) if args.json else markdown(plan), end="" if not args.json else "\n")
    return 0


def _plan_size(args: argparse.Namespace) -> tuple[int, int, list[str]]:
    from metaembed.plan.measurements import PlanError

    if args.index:
        if args.n is not None or args.dim is not None:
            raise PlanError("give --index or --n with --dim, not both")
        from metaembed.index import open_index

        with open_index(args.index, read_only=True) as index:
            n, dim, dtype = len(index), index.dim, index.dtype
        if n == 0:
            raise PlanError(f"the index {args.index} is empty: plan for a size with --n and --dim instead")
        return n, dim, list(args.dtypes or [dtype])
    if args.n is None or args.dim is None:
        raise PlanError("give the index (--index PATH) or its size (--n N --dim D)")
    for name, value in (("--n", args.n), ("--dim", args.dim)):
        if value < 1:
            raise PlanError(f"{name} must be a positive int, got {value}")
    return args.n, args.dim, list(args.dtypes or ["bf16"])


def _error(message: str):
    from metaembed.plan.measurements import PlanError

    return PlanError(message)


# -------------------------------------------------------------------------------------------- auto
def _encoded(args: argparse.Namespace):
    """The model (for its vector counts and fingerprint) and the --data tasks, encoded or from the cache."""
    import torch

    from metaembed import MetaEmbedModel
    from metaembed.errors import InputError
    from metaembed.eval.common import describe_model
    from metaembed.eval.mmeb import load_datasets
    from metaembed.plan.encoded import encode_tasks

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    datasets = [d for source in args.data for d in load_datasets(source, None, args.image_root)]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise InputError(f"task names repeat across --data: {names}")
    model = MetaEmbedModel.from_pretrained(args.model, device=args.device).eval()
    info = describe_model(model, args.model)
    with torch.no_grad():
        tasks = encode_tasks(
            model, datasets, model_fingerprint=info.get("fingerprint"), batch_size=args.batch_size, progress=_progress
        )
    described = [{"name": d.name, "id": d.source, "revision": d.revision, "queries": len(d.queries)} for d in datasets]
    return info, described, tasks


def run_calibrate(args: argparse.Namespace) -> int:
    from metaembed.budget import Budget
    from metaembed.plan.calibrate import CalibrationError, choose, sweep

    if not args.save_to and not args.out:
        raise CalibrationError("say where the policy goes: --save-to MODEL_OR_INDEX_DIR and/or --out FILE.json")
    for directory in args.save_to:
        if not Path(directory).is_dir():
            raise CalibrationError(f"--save-to {directory}: not a folder (a model or index folder)")
    ceiling = Budget.parse(args.ceiling)
    cheap = [Budget.parse(b) for b in args.cheap]
    info, described, tasks = _encoded(args)
    points, ceiling_quality = sweep(
        tasks,
        ceiling=ceiling,
        cheap=cheap,
        top_m=args.top_m,
        margin_rank=args.margin_rank,
        dtype=args.dtype,
        progress=_progress,
    )
    best = choose(points, ceiling_quality, args.within / 100, per_task=not args.overall)
    names = [t.name for t in tasks]
    scope = "the mean over tasks" if args.overall else "every task"
    calibration = {
        "model": info,
        "data": described,
        "target": f"precision@1 within {args.within:g} points of {ceiling} on {scope}",
        "storage_dtype": args.dtype,
        "dev": {
            "ceiling_precision_at_1": dict(zip(names, ceiling_quality, strict=True)),
            "auto_precision_at_1": dict(zip(names, best.quality, strict=True)),
            "bytes_ratio": best.cost,
            "escalated_fraction": best.escalated,
        },
        "searched": {
            "cheap": args.cheap,
            "top_m": args.top_m,
            "margin_rank": args.margin_rank,
            "ladders": ["paper ladder", "cheap → ceiling"],
            "points": len(points),
        },
    }
    policy = best.policy.replace(calibration=calibration)
    for directory in args.save_to:
        _progress(f"wrote {policy.save(directory)}")
    if args.out:
        from metaembed.eval.report import write_json_atomic

        write_json_atomic(args.out, policy.to_dict())
        _progress(f"wrote {args.out}")
    steps = " → ".join(str(b) for b in policy.steps())
    print(
        f"auto budget: {steps}, top_m {policy.top_m}, margin rank {policy.margin_rank}, "
        f"threshold {policy.threshold:.4g}"
    )
    print(f"dev: {100 * best.cost:.1f} % of {ceiling}'s bytes, {100 * best.escalated:.1f} % of queries escalated")
    print("| task | ceiling P@1 % | auto P@1 % |\n|---|---|---|")
    for name, ceiling_value, auto_value in zip(names, ceiling_quality, best.quality, strict=True):
        print(f"| {name} | {100 * ceiling_value:.1f} | {100 * auto_value:.1f} |")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import tempfile

    from metaembed.auto_budget import AutoBudget
    from metaembed.plan.auto_eval import evaluate_policy
    from metaembed.plan.calibrate import CalibrationError

    if args.repeats < 1 or args.k < 2:
        raise CalibrationError(f"--repeats must be ≥ 1 and --k ≥ 2 (got {args.repeats}, {args.k})")
    policy = AutoBudget.load(args.policy)
    info, described, tasks = _encoded(args)
    unknown = [t for t in args.plot_tasks if t not in {task.name for task in tasks}]
    if unknown:
        raise CalibrationError(f"--plot-tasks {unknown}: not among the tasks {[t.name for t in tasks]}")
    calibrated_on = {(d.get("name"), d.get("revision")) for d in policy.calibration.get("data", [])}
    overlap = [d["name"] for d in described if (d["name"], d["revision"]) in calibrated_on]
    if overlap:
        raise CalibrationError(f"the policy was calibrated on {overlap}: evaluate it on other data")
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        result = evaluate_policy(
            tasks, policy, workdir, dtype=args.dtype, repeats=args.repeats, k=args.k, progress=_progress
        )
    result = {"model": info, "data": described, **result}
    if args.out:
        from metaembed.eval.report import write_json_atomic

        write_json_atomic(args.out, result)
        _progress(f"wrote {args.out}")
    if args.plot:
        from metaembed.plan.plots import plot_auto

        _progress(f"wrote {plot_auto(result, args.plot, args.plot_tasks)}")
    print(auto_table(result))
    return 0


def auto_table(result: dict) -> str:
    """Markdown: per task and overall, precision@1 / bytes / ms of the ceiling and of auto, and the verdict."""
    ceiling = result["verdict"]["ceiling"]
    lines = [
        f"| task | {ceiling} P@1 % | auto P@1 % | Δ points | bytes ratio | ms ratio | escalated % |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [(t["task"], t["settings"]) for t in result["tasks"]] + [("**mean over tasks**", result["overall"])]
    for name, settings in rows:
        fixed, auto = settings[ceiling], settings["auto"]
        lines.append(
            f"| {name} | {100 * fixed['precision_at_1']:.1f} | {100 * auto['precision_at_1']:.1f} "
            f"| {100 * (auto['precision_at_1'] - fixed['precision_at_1']):+.1f} "
            f"| {auto['mean_bytes'] / fixed['mean_bytes']:.3f} | {auto['mean_ms'] / fixed['mean_ms']:.3f} "
            f"| {100 * auto['escalated_fraction']:.1f} |"
        )
    return "\n".join(lines)
