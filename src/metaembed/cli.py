"""The ``metaembed`` command: one entry point, one sub-command per room.

Each room registers its own sub-commands from ``metaembed.<room>.cli.register(subparsers)`` so this
file stays a dispatcher. Rooms import their heavy dependencies inside the command functions, so
``metaembed --help`` is fast and a missing optional extra only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from metaembed.errors import MetaEmbedError

# Modules that define ``register(subparsers)``: one per room, imported only to register its commands.
COMMAND_MODULES = (
    "metaembed.demo",
    "metaembed.index.cli",
    "metaembed.search",
    "metaembed.bench.cli",
    "metaembed.train.cli",
    "metaembed.eval.cli",
    "metaembed.data.cli",
    "metaembed.serve.cli",
    "metaembed.plan.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaembed", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch loads OpenMP: its threads spin at every barrier, and on a CPU shared with other work a
    # spinning thread whose partner is descheduled stalls the whole op (mini encodes 2.2 → 9.2 items/s with
    # 2 threads at load 8). Waiting threads that sleep cost little on a quiet machine. An explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    if argv is None and hasattr(args, "prepare_process"):  # this process is the command: a room may reconfigure it
        args.prepare_process()
    try:
        return int(args.func(args) or 0)
    except MetaEmbedError as error:
        print(f"metaembed {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"metaembed {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
