"""``metaembed serve``: load a checkpoint and an index, then serve them over HTTP with uvicorn."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

# ServeConfig field: the flag that sets it, so an out-of-range value is reported by the flag a user typed
CONFIG_FLAGS = {
    "max_batch_items": "--max-batch-items",
    "max_batch_wait_ms": "--max-batch-wait-ms",
    "max_items": "--max-items",
    "queue_size": "--queue-size",
    "request_timeout_s": "--request-timeout",
    "max_encode_requests": "--max-concurrency",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="HTTP service: /v1/embeddings, /v1/search, /v1/index/add|delete, /health, /metrics",
        description="Serve a MetaEmbed checkpoint and an index over HTTP (binds 127.0.0.1 unless --host says so).",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory written by save_pretrained")
    parser.add_argument("--index", help="index directory; created on first start if missing (omit for no search)")
    parser.add_argument(
        "--read-only",
        action="store_true",
        help="serve an existing index without writing to it (a read-only filesystem, or a writer elsewhere)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--image-dir", type=Path, help="directory whose files requests may name by relative path")
    parser.add_argument(
        "--api-key-file", type=Path, help="file holding the key for index writes (default: $METAEMBED_API_KEY)"
    )
    parser.add_argument("--torch-threads", type=int, help="torch intra-op threads for the encode worker")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="model weights dtype (default: as saved)")
    parser.add_argument("--device", help="torch device for the model, e.g. cuda (default cpu)")
    parser.add_argument(
        "--index-dtype",
        choices=("fp32", "bf16", "int8"),
        help="storage dtype when the index is created (default bf16); an existing index must already store it",
    )
    parser.add_argument("--no-batching", action="store_true", help="encode each request on its own")
    parser.add_argument("--max-batch-items", type=int, default=32, help="items per forward pass (default 32)")
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0, help="wait for more work (default 5 ms)")
    parser.add_argument("--max-items", type=int, default=64, help="items per request (default 64)")
    parser.add_argument("--queue-size", type=int, default=256, help="encode jobs waiting at most (default 256)")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds a request may wait (default 30)")
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=16,
        help="embeddings/search requests in progress at most; more get an immediate 503 (default 16)",
    )
    parser.add_argument(
        "--timeout-keep-alive",
        type=float,
        default=5.0,
        help="seconds an idle keep-alive connection stays open (default 5); raise it behind a proxy that reuses them",
    )
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.set_defaults(func=run)


def build(args: argparse.Namespace):
    """The app for these arguments (separate from :func:`run` so tests can build it without a socket)."""
    import torch

    from metaembed.errors import InputError
    from metaembed.index.ingestion import open_for_model
    from metaembed.model import MetaEmbedModel
    from metaembed.model.card import read_quality
    from metaembed.model.loading import resolve_checkpoint
    from metaembed.serve.app import create_app
    from metaembed.serve.security import load_api_key

    if args.torch_threads is not None:
        if args.torch_threads < 1:
            raise InputError(f"--torch-threads must be at least 1, got {args.torch_threads}")
        torch.set_num_threads(args.torch_threads)
    if not (math.isfinite(args.timeout_keep_alive) and args.timeout_keep_alive > 0):
        raise InputError(f"--timeout-keep-alive must be a finite number > 0, got {args.timeout_keep_alive!r}")
    if args.image_dir is not None and not args.image_dir.is_dir():
        raise InputError(f"--image-dir {str(args.image_dir)!r} is not a directory")
    if args.read_only and not args.index:
        raise InputError("--read-only applies to an index: give --index PATH")
    # the limits are checked before the model loads and before an index directory is created
    config = server_config(args, load_api_key(args.api_key_file))
    model_dir = resolve_checkpoint(args.model)
    model = MetaEmbedModel.from_pretrained(model_dir, torch_dtype=args.dtype, device=args.device)
    index = None
    if args.index:
        index = open_for_model(args.index, model, dtype=args.index_dtype, read_only=args.read_only)
    # the page shows the model card's quality per budget; budget "auto" falls back to the model folder's policy
    return create_app(model, index, config, quality=read_quality(model_dir), model_dir=model_dir)


def server_config(args: argparse.Namespace, api_key: str | None):
    """The :class:`ServeConfig` of these arguments; a value out of range is an InputError naming its flag."""
    from metaembed.errors import InputError
    from metaembed.serve.config import ServeConfig
    from metaembed.serve.errors import ServeConfigError

    values = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in CONFIG_FLAGS.items()}
    try:
        return ServeConfig(
            image_dir=args.image_dir,
            api_key=api_key,
            batching=not args.no_batching,
            model_name=Path(args.model).name or str(args.model),
            **values,
        )
    except ServeConfigError as error:
        if error.field not in CONFIG_FLAGS:
            raise
        raise InputError(f"{CONFIG_FLAGS[error.field]} {error.requirement}, got {error.value!r}") from None


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    # metaembed's own loggers (a request's unexpected error with its traceback, index warnings) at --log-level, with
    # the time, so a server log can be matched to what clients saw; uvicorn configures its own loggers
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"metaembed serve: warning: binding {args.host}: /v1/embeddings and /v1/search are open to anyone who "
            "can reach it (index writes still need the API key); put an authenticating proxy in front",
            file=sys.stderr,
        )
    print(f"metaembed serve: http://{args.host}:{args.port} (docs at /docs, schema at /openapi.json)", flush=True)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_keep_alive=args.timeout_keep_alive,
    )
    return 0
