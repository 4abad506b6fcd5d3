"""``metaembed eval mmeb|vidore|plot|table``: run a benchmark at every budget, print and save the tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="MMEB / ViDoRe evaluation at every budget, tables and plots")
    commands = parser.add_subparsers(dest="eval_command", required=True, metavar="BENCHMARK")

    mmeb = commands.add_parser("mmeb", help="MMEB: Precision@1 of each query over its own candidates")
    _common(mmeb)
    mmeb.add_argument("--data", required=True, nargs="+", help="folder(s) of <dataset>.jsonl or <dataset>/*.parquet, "
                      "a data builder's folder (data/<source>), or a hub id (TIGER-Lab/MMEB-eval)")  # fmt: skip
    mmeb.add_argument("--image-root", help="folder (or .zip) the image paths are relative to "
                      "(default: images.zip in --data, else --data)")  # fmt: skip
    mmeb.add_argument("--datasets", nargs="+", help="dataset names (default: all found)")
    mmeb.add_argument("--store-dtype", choices=("float32", "bfloat16"), default="float32",
                      help="dtype the encoded candidates are kept in between encoding and scoring (bf16 halves "
                      "memory; scores are computed in fp32 either way)")  # fmt: skip
    mmeb.set_defaults(func=run_mmeb)

    vidore = commands.add_parser("vidore", help="ViDoRe v2: full-corpus nDCG@5")
    _common(vidore)
    vidore.add_argument("--data", required=True, nargs="+", help="BEIR folder(s), folder(s) of BEIR folders "
                        "(e.g. data/sheets/beir), a hub id, or 'hub' (the seven v2 tasks from the hub)")  # fmt: skip
    vidore.add_argument("--tasks", nargs="+", help="v2 task names or folder names (default: the v2 tasks found)")
    vidore.add_argument("--languages", nargs="+", help="keep only queries in these languages (single dataset)")
    vidore.set_defaults(func=run_vidore)

    plot = commands.add_parser("plot", help="score vs budget and vs index bytes per item, several results overlaid")
    plot.add_argument("results", nargs="+", help="result JSON files written by eval mmeb / vidore")
    plot.add_argument("--out", required=True, help="image file to write (.png, .pdf, .svg)")
    plot.add_argument("--group", default="overall", help="which group mean to plot (overall, IND, VQA, ...)")
    plot.add_argument("--labels", nargs="+", help="one legend label per result")
    plot.add_argument("--title")
    plot.set_defaults(func=run_plot)

    table = commands.add_parser("table", help="print the markdown tables of result JSON files")
    table.add_argument("results", nargs="+")
    table.set_defaults(func=run_table)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="metaembed checkpoint folder or hub id")
    parser.add_argument("--budgets", nargs="+", help="budgets like 1x1 4x8 16x64 (default: the ladder)")
    parser.add_argument("--out", help="folder for <benchmark>.json and <benchmark>.md")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", help="model dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--label", help="name of this run in tables and plot legends (default: the model path)")
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="neither reuse nor write per-task results in --out/.partial "
        "(default: a rerun reuses tasks whose model, budgets and data match)",
    )


def _load_model(args: argparse.Namespace):
    import torch

    from metaembed import MetaEmbedModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return MetaEmbedModel.from_pretrained(args.model, torch_dtype=args.dtype, device=device)


def _budgets(args: argparse.Namespace):
    from metaembed.budget import Budget

    if not args.budgets or (len(args.budgets) == 1 and args.budgets[0].lower() in ("ladder", "all")):
        return None
    return [Budget.parse(b) for b in args.budgets]


def _check_batch(args: argparse.Namespace) -> None:
    from metaembed.errors import InputError

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")


def _resume_dir(args: argparse.Namespace, name: str) -> Path | None:
    return None if not args.out or args.no_resume else Path(args.out) / ".partial" / name


def _progress(message: str) -> None:
    print(f"eval: {message}", file=sys.stderr, flush=True)


def _finish(result, args: argparse.Namespace, name: str) -> int:
    if args.label:
        result.model["label"] = args.label
    text = result.markdown()
    print(text)
    if args.out:
        out = Path(args.out)
        json_path = result.to_json(out / f"{name}.json")
        (out / f"{name}.md").write_text(text)
        _progress(f"wrote {json_path} and {out / f'{name}.md'}")
    return 0


def run_mmeb(args: argparse.Namespace) -> int:
    from metaembed.eval.mmeb import evaluate_mmeb, load_datasets

    _check_batch(args)
    budgets = _budgets(args)
    # reads and checks all data before the model loads
    datasets = [d for source in args.data for d in load_datasets(source, args.datasets, args.image_root)]
    model = _load_model(args)
    import torch

    result = evaluate_mmeb(
        model, datasets, budgets, batch_size=args.batch_size, model_name=args.model, progress=_progress,
        store_dtype=getattr(torch, args.store_dtype), resume_dir=_resume_dir(args, "mmeb"),
    )  # fmt: skip
    return _finish(result, args, "mmeb")


def run_vidore(args: argparse.Namespace) -> int:
    from metaembed.eval.vidore import evaluate_vidore, resolve_tasks

    _check_batch(args)
    budgets = _budgets(args)
    tasks = [task for source in args.data for task in resolve_tasks(source, args.tasks, args.languages)]
    model = _load_model(args)
    result = evaluate_vidore(model, tasks, budgets, batch_size=args.batch_size, model_name=args.model,
                             progress=_progress, resume_dir=_resume_dir(args, "vidore"))  # fmt: skip
    return _finish(result, args, "vidore")


def run_plot(args: argparse.Namespace) -> int:
    from metaembed.eval.report import plot_results

    path = plot_results(args.results, args.out, group=args.group, labels=args.labels, title=args.title)
    print(f"eval plot: wrote {path}")
    return 0


def run_table(args: argparse.Namespace) -> int:
    from metaembed.eval.report import EvalResult

    for path in args.results:
        print(EvalResult.load(path).markdown())
    return 0
