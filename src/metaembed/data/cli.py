"""``metaembed data build openclipart|emoji`` and ``metaembed data verify FOLDER``."""

from __future__ import annotations

import argparse
import sys
import time
import warnings


def register(subparsers) -> None:
    from metaembed.data.build import SOURCES, BuildOptions

    defaults = BuildOptions()
    parser = subparsers.add_parser("data", help="build the real offline datasets (OpenClipArt, emoji)")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    build = commands.add_parser(
        "build",
        help="build data/<source>/ (images, MMEB train/eval JSONL, manifest) from data/raw",
        description="Deterministic: the same raw files give the same bytes. Fetch the raw files first with "
        "scripts/fetch_resources.sh.",
    )
    build.add_argument("source", choices=sorted(SOURCES), help="which dataset to build")
    build.add_argument("--raw", default="data/raw", help="raw sources folder (default: data/raw)")
    build.add_argument("--out", default="data", help="output root; writes <out>/<source>/ (default: data)")
    build.add_argument("--size", type=int, default=defaults.size, help="image side in px (default: %(default)s)")
    build.add_argument("--test-percent", type=int, default=defaults.test_percent, help="default: %(default)s")
    build.add_argument(
        "--distractors", type=int, default=defaults.num_distractors, help="eval candidates besides the gold"
    )
    build.add_argument("--limit", type=int, default=None, help="keep a deterministic subset of this many items")
    build.set_defaults(func=_build)
    verify = commands.add_parser("verify", help="check a built dataset folder against its manifest's sha256s")
    verify.add_argument("folder", help="e.g. data/openclipart")
    verify.set_defaults(func=_verify)


def _build(args: argparse.Namespace) -> int:
    from metaembed.data.build import BuildOptions, build_dataset
    from metaembed.data.errors import ImageSkippedWarning

    options = BuildOptions(
        size=args.size, test_percent=args.test_percent, num_distractors=args.distractors, limit=args.limit
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ImageSkippedWarning)
        try:
            manifest = build_dataset(
                args.source, args.raw, args.out, options, progress=lambda m: print(m, file=sys.stderr)
            )
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


def _verify(args: argparse.Namespace) -> int:
    from metaembed.data.build import verify_dataset

    manifest = verify_dataset(args.folder)
    print(f"{args.folder}: {len(manifest['files'])} files match the manifest")
    return 0
