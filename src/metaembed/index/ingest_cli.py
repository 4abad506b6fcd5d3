"""``metaembed index build|add INDEX --model M --items PATH...``: the command-line face of :func:`ingest`.

Under ``torchrun --nproc-per-node N -m metaembed.cli index build ...`` every rank encodes its share of the
chunks (on ``cuda:LOCAL_RANK`` with ``--device cuda``) and rank 0 commits the shards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from metaembed.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("from files (encode with a model)")
    group.add_argument("--items", nargs="+", metavar="PATH", help="folders, .jsonl or .csv files of items to encode")
    group.add_argument("--model", help="checkpoint directory that encodes the items (with --items)")
    group.add_argument("--batch-size", type=int, default=32, help="items per forward pass (default 32)")
    group.add_argument(
        "--chunk-size", type=int, default=256, help="items per commit: what a crash can lose (default 256)"
    )
    group.add_argument(
        "--where", action="append", default=[], metavar="FIELD=VALUE", help="keep items whose FIELD is VALUE"
    )
    group.add_argument("--limit", type=int, help="index only the first N items listed")
    group.add_argument("--strict", action="store_true", help="stop at the first bad item instead of listing it")
    group.add_argument("--device", help="torch device for the model, e.g. cuda (default cpu)")
    group.add_argument("--torch-threads", type=int, help="torch intra-op threads")
    group.add_argument("--shard-dir", help="where torchrun ranks write their shards (default INDEX.shards)")
    group.add_argument("--report", help="write the ingest report (added, bad items, items/s) as JSON here")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, *, create: bool) -> int:
    if args.embeddings or args.ids:
        raise InputError("give either --embeddings and --ids (precomputed vectors) or --model and --items, not both")
    if not args.model:
        raise InputError("--items needs --model: the checkpoint that encodes them")
    where = _where(args.where)
    if not create:
        _require_index(args)
    import torch

    from metaembed.index.ingestion import ingest
    from metaembed.model import MetaEmbedModel

    if args.torch_threads is not None:
        if args.torch_threads < 1:
            raise InputError(f"--torch-threads must be at least 1, got {args.torch_threads}")
        torch.set_num_threads(args.torch_threads)
    rank, device = _init_distributed(args.device)
    if rank == 0:
        print(f"index: loading {args.model}", file=sys.stderr, flush=True)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = MetaEmbedModel.from_pretrained(args.model, device=device).eval()
    opts = {"url": args.url} if args.url else {}
    report = ingest(
        args.path,
        model,
        args.items,
        dtype=getattr(args, "dtype", None),
        backend=getattr(args, "backend", None),
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        strict=args.strict,
        where=where,
        limit=args.limit,
        shard_dir=args.shard_dir,
        progress=not args.quiet,
        **opts,
    )
    if rank == 0:
        if args.report:
            Path(args.report).write_text(json.dumps(report.as_dict(), indent=2, ensure_ascii=False) + "\n")
        print(f"{args.path}: {report.summary()}")
    _leave_distributed()
    return 0


def _where(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--where {pair!r}: write it as FIELD=VALUE, e.g. split=test")
        out[key] = value
    return out


def _require_index(args: argparse.Namespace) -> None:
    from metaembed.index import open_for_cli

    open_for_cli(args.path, url=args.url, read_only=True).close()


def _init_distributed(device: str | None) -> tuple[int, str | None]:
    """Join torchrun's process group when started by it; each rank's model goes to its own GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, device
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = device is not None and device.startswith("cuda") and torch.cuda.is_available()
    if not dist.is_initialized():
        # ranks wait for each other at the end of encoding, which can take hours: a generous timeout
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=timedelta(hours=24))
    if on_cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return dist.get_rank(), device


def _leave_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # every rank leaves together: a rank that tore its gloo group down while rank 0 was still committing the
        # shards died at exit now and then (std::terminate in gloo's teardown, SIGABRT)
        dist.barrier()
        dist.destroy_process_group()
