"""``metaembed data build openclipart|emoji|sheets|stdlib`` and ``metaembed data verify FOLDER``."""

from __future__ import annotations

import argparse
import sys
import time
import warnings


def register(subparsers) -> None:
    from metaembed.data.build import SOURCES, BuildOptions
    from metaembed.data.sheets import SheetOptions

    defaults, sheet_defaults = BuildOptions(), SheetOptions()
    parser = subparsers.add_parser("data", help="build the real offline datasets (OpenClipArt, emoji, sheets, stdlib)")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    build = commands.add_parser(
        "build",
        help="build data/<source>/ (images, MMEB train/eval JSONL, manifest) from data/raw",
        description="Deterministic: the same raw files give the same bytes. Fetch the raw files first with "
        "scripts/fetch_resources.sh. sheets is composed from the built openclipart and emoji datasets (in --out); "
        "stdlib reads this interpreter's standard library.",
    )
    build.add_argument("source", choices=sorted([*SOURCES, *MULTI_ASPECT]), help="which dataset to build")
    build.add_argument("--raw", default="data/raw", help="raw sources folder (default: data/raw)")
    build.add_argument("--out", default="data", help="output root; writes <out>/<source>/ (default: data)")
    build.add_argument("--size", type=int, default=defaults.size, help="image side in px (default: %(default)s)")
    build.add_argument("--test-percent", type=int, default=defaults.test_percent, help="default: %(default)s")
    build.add_argument(
        "--distractors", type=int, default=defaults.num_distractors, help="eval candidates besides the gold"
    )
    build.add_argument("--limit", type=int, default=None, help="keep a deterministic subset of this many items")
    build.add_argument("--page-size", type=int, default=sheet_defaults.page_size, help="sheets: page side in px "
                       "(default: %(default)s)")  # fmt: skip
    build.add_argument("--grids", type=int, nargs="+", default=list(sheet_defaults.grids),
                       help="sheets: grid sizes g of the g×g pages (default: %(default)s)")  # fmt: skip
    build.add_argument("--stdlib", default=None, help="stdlib: the standard library folder (default: this Python's)")
    build.set_defaults(func=_build)
    verify = commands.add_parser("verify", help="check a built dataset folder against its manifest's sha256s")
    verify.add_argument("folder", help="e.g. data/openclipart")
    verify.set_defaults(func=_verify)


MULTI_ASPECT = ("sheets", "stdlib")


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _build(args: argparse.Namespace) -> int:
    if args.source in MULTI_ASPECT:
        return _build_multi_aspect(args)
    from metaembed.data.build import BuildOptions, build_dataset
    from metaembed.data.errors import ImageSkippedWarning

    options = BuildOptions(
        size=args.size, test_percent=args.test_percent, num_distractors=args.distractors, limit=args.limit
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ImageSkippedWarning)
        try:
            manifest = build_dataset(args.source, args.raw, args.out, options, progress=_say)
        finally:
            for warning in caught:
                if issubclass(warning.category, ImageSkippedWarning):
                    print(f"metaembed data build: warning: {warning.message}", file=sys.stderr)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    counts = manifest["counts"]
    print(
        f"{args.source}: {counts['items']} items ({counts['train_items']} train / {counts['test_items']} test), "
        f"{counts['skipped_images']} images skipped, in {time.perf_counter() - start:.1f} s → {args.out}/{args.source}"
    )
    for name, n in counts["records"].items():
        print(f"  {name}: {n} records")
    return 0


def _build_multi_aspect(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.source == "sheets":
        from metaembed.data.sheets import SheetOptions, build_sheets

        options = SheetOptions(page_size=args.page_size, grids=tuple(args.grids), num_distractors=args.distractors)
        manifest = build_sheets(args.out, args.out, options, progress=_say)
        summary = ", ".join(f"{name}: {c['pages']} pages" for name, c in manifest["counts"].items())
    else:
        from metaembed.data.stdlib_docs import build_stdlib

        manifest = build_stdlib(args.out, args.stdlib, args.test_percent, args.distractors, progress=_say)
        counts = manifest["counts"]
        summary = f"{counts['sections']['train']} train / {counts['sections']['test']} test sections, " + (
            f"{counts['test_queries']} test queries, {counts['train_pairs']} training pairs"
        )
    print(f"{args.source}: {summary}, in {time.perf_counter() - start:.1f} s → {args.out}/{args.source}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from metaembed.data.build import verify_dataset

    manifest = verify_dataset(args.folder)
    print(f"{args.folder}: {len(manifest['files'])} files match the manifest")
    return 0
