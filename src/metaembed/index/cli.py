"""``metaembed index build | add | delete | search | stats | verify``.

``build`` and ``add`` take either files to encode (``--model M --items PATH...``, see
:mod:`metaembed.index.ingest_cli`) or precomputed vectors: embeddings from ``.npy`` or ``.safetensors`` files
holding an ``(N, R, D)`` float array (``--key`` picks the tensor in a safetensors file with several); ids from
a ``.json`` list or a ``.txt`` file (one id per line); metadata from an optional JSONL file (one JSON object or
``null`` per line, same order as the ids).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from metaembed.errors import InputError
from metaembed.index import ingest_cli, open_for_cli


def load_embeddings(path: str | Path, key: str | None = None):
    """Read an ``(N, R, D)`` float tensor from ``.npy`` or ``.safetensors`` (no pickle)."""
    import numpy as np
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"embeddings file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if key is not None:
            raise InputError("--key applies to .safetensors files; a .npy file holds one array")
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise InputError(
                f"cannot read {path} as a numeric .npy array (object arrays are refused): {error}"
            ) from None
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"{path} holds {array.dtype} values; embeddings must be floating point")
        return torch.from_numpy(np.ascontiguousarray(array))
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise InputError(f"cannot read {path} as safetensors: {error}") from None
        if key is None:
            if "embeddings" in tensors:
                key = "embeddings"
            elif len(tensors) == 1:
                key = next(iter(tensors))
            else:
                raise InputError(f"{path} holds tensors {sorted(tensors)}; pick one with --key")
        if key not in tensors:
            raise InputError(f"{path} has no tensor {key!r}; it holds {sorted(tensors)}")
        return tensors[key]
    raise InputError(f"cannot read embeddings from {path}: use a .npy or .safetensors file")


def load_ids(path: str | Path) -> list[str]:
    """Ids from a JSON list of strings or a text file with one id per line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ids file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"ids file {path} is not UTF-8 text: {error}") from None
    if path.suffix.lower() == ".json":
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"ids file {path} is not valid JSON: {error}") from None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise InputError(f"ids file {path} must hold a JSON list of strings")
        return ids
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def load_metadata(path: str | Path | None, n: int) -> list[dict[str, Any] | None] | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise InputError(f"metadata file {path} does not exist")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path} line {number} is not JSON: {error}") from None
        if entry is not None and not isinstance(entry, dict):
            raise InputError(f"{path} line {number} must be a JSON object or null, got {type(entry).__name__}")
        entries.append(entry)
    if len(entries) != n:
        raise InputError(f"{path} has {len(entries)} metadata lines for {n} ids; give one line per id")
    return entries


def _items(args: argparse.Namespace):
    if not (args.embeddings and args.ids):
        raise InputError("give --model and --items (files to encode), or --embeddings and --ids (precomputed vectors)")
    embeddings = load_embeddings(args.embeddings, args.key)
    ids = load_ids(args.ids)
    return ids, embeddings, load_metadata(args.metadata, len(ids))


def _build(args: argparse.Namespace) -> int:
    from metaembed.index import create_index

    if args.items:
        return ingest_cli.run(args, create=True)
    ids, embeddings, metadata = _items(args)
    if embeddings.ndim != 3:
        raise InputError(f"embeddings must be (N, R, D), got shape {tuple(embeddings.shape)}")
    opts = {"url": args.url} if args.url else {}
    # Validate everything before creating the directory, so bad input leaves nothing behind.
    from metaembed.index.base import check_dtype
    from metaembed.index.validate import check_ids

    dtype = args.dtype or "bf16"
    check_dtype(dtype)
    check_ids(ids)
    if len(ids) != embeddings.shape[0]:
        raise InputError(f"got {len(ids)} ids for {embeddings.shape[0]} embeddings; give one id per item")
    existed = Path(args.path).exists()
    index = create_index(
        args.path,
        dim=embeddings.shape[2],
        num_vectors=embeddings.shape[1],
        dtype=dtype,
        backend=args.backend or "embedded",
        **opts,
    )
    try:
        index.add(ids, embeddings, metadata)
    except BaseException:
        index.close()
        _remove_new_index(Path(args.path), keep_dir=existed)
        raise
    print(f"built {args.path}: {len(index)} items, R={index.num_vectors}, D={index.dim}, dtype={index.dtype}")
    index.close()
    return 0


def _remove_new_index(path: Path, *, keep_dir: bool) -> None:
    """Undo a build that failed after creating its (new or empty) directory."""
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
        if keep_dir:
            path.mkdir()


def _open(args: argparse.Namespace, read_only: bool = False):
    return open_for_cli(args.path, url=getattr(args, "url", None), read_only=read_only)


def _add(args: argparse.Namespace) -> int:
    if args.items:
        if args.upsert:
            raise InputError("--upsert applies to --embeddings; --items adds the ids the index does not hold yet")
        return ingest_cli.run(args, create=False)
    ids, embeddings, metadata = _items(args)
    with _open(args) as index:
        (index.upsert if args.upsert else index.add)(ids, embeddings, metadata)
        print(f"{'upserted' if args.upsert else 'added'} {len(ids)} items; {args.path} holds {len(index)}")
    return 0


def _delete(args: argparse.Namespace) -> int:
    ids = list(args.id)
    if args.ids:
        ids.extend(load_ids(args.ids))
    if not ids:
        raise InputError("name the ids to delete (as arguments or with --ids FILE)")
    with _open(args) as index:
        index.delete(ids)
        print(f"deleted {len(ids)} items; {args.path} holds {len(index)}")
    return 0


def _search(args: argparse.Namespace) -> int:
    queries = load_embeddings(args.queries, args.key)
    with _open(args, read_only=True) as index:
        results = index.search(queries, args.budget, k=args.k, two_stage=args.two_stage, candidates=args.candidates)
    # budget "auto": each query's final budget, escalations and bytes read
    costs = results.per_query() if hasattr(results, "per_query") else [{}] * len(results.ids)
    if args.json:
        out = [
            {"query": i, "ids": ids, "scores": [round(float(s), 6) for s in scores], "metadata": meta, **cost}
            for i, (ids, scores, meta, cost) in enumerate(
                zip(
                    results.ids,
                    results.scores.tolist(),
                    results.metadata or [[]] * len(results.ids),
                    costs,
                    strict=True,
                )
            )
        ]
        json.dump(out, sys.stdout, ensure_ascii=False, allow_nan=False)
        print()
        return 0
    for i, (ids, scores, cost) in enumerate(zip(results.ids, results.scores.tolist(), costs, strict=True)):
        spent = f" budget {cost['budget']}, {cost['bytes_read']:,} B read" if cost else ""
        print(f"{Path(args.queries).name}[{i}]:{spent}")
        for rank, (item_id, score) in enumerate(zip(ids, scores, strict=True), 1):
            print(f"  {rank:>3}. {score:10.4f}  {item_id}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    with _open(args, read_only=True) as index:
        stats = index.stats()
    if args.json:
        print(json.dumps(stats))
        return 0
    for key, value in stats.items():
        if key != "bytes_per_budget":
            print(f"{key:>14}: {value}")
    print("bytes per budget (candidate vectors read by one exhaustive search):")
    for budget, size in stats["bytes_per_budget"].items():
        print(f"  {budget:>6}  {size:>14,d} B  ({size / 2**20:,.2f} MiB)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from metaembed.index.base import IndexFormatError
    from metaembed.index.store import EmbeddedIndex

    problems, checked = EmbeddedIndex.verify(args.path)
    for problem in problems:
        print(f"damaged: {problem}")
    if problems:
        raise IndexFormatError(f"{args.path}: {len(problems)} of {checked} files are damaged, first {problems[0]}")
    print(f"{args.path}: {checked} files intact (sizes and checksums match the manifest)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("index", help="build, update, search and inspect a multi-vector index")
    sub = parser.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("path", help="index directory")
        p.add_argument("--url", help="Qdrant server URL (qdrant backend)")

    def items(p: argparse.ArgumentParser) -> None:
        ingest_cli.add_arguments(p)
        group = p.add_argument_group("from precomputed vectors")
        group.add_argument("--embeddings", help="(N, R, D) float array: .npy or .safetensors")
        group.add_argument("--ids", help="ids: .json list or .txt with one id per line")
        group.add_argument("--metadata", help="JSONL file: one JSON object (or null) per id")
        group.add_argument("--key", help="tensor name inside a .safetensors file")

    build = sub.add_parser(
        "build", help="create an index from files (encoded with --model) or embeddings; resumes if it exists"
    )
    common(build)
    items(build)
    build.add_argument("--dtype", help="storage: fp32, bf16 or int8 (default bf16)")
    build.add_argument("--backend", help="embedded (default) or qdrant")
    build.set_defaults(func=_build)

    add = sub.add_parser("add", help="add items to an index")
    common(add)
    items(add)
    add.add_argument("--upsert", action="store_true", help="replace items whose ids exist")
    add.set_defaults(func=_add)

    delete = sub.add_parser("delete", help="delete items by id")
    common(delete)
    delete.add_argument("id", nargs="*", help="ids to delete")
    delete.add_argument("--ids", help="file of ids to delete (.json or .txt)")
    delete.set_defaults(func=_delete)

    search = sub.add_parser("search", help="top-k items for query embeddings at a budget")
    common(search)
    search.add_argument("--queries", required=True, help="(nq, R_q, D) query embeddings: .npy or .safetensors")
    search.add_argument("--key", help="tensor name inside a .safetensors file")
    search.add_argument("--budget", required=True, help="r_q x r_c, e.g. 16x64, or auto (the index's policy)")
    search.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    search.add_argument("--two-stage", action="store_true", help="ANN on the (1,1) vectors, then exact rerank")
    search.add_argument("--candidates", type=int, help="coarse candidates per query for --two-stage")
    search.add_argument("--json", action="store_true", help="print JSON")
    search.set_defaults(func=_search)

    stats = sub.add_parser("stats", help="count, dims, dtype and bytes per budget")
    common(stats)
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=_stats)

    verify = sub.add_parser("verify", help="check every file's size and checksum against the manifest (embedded)")
    verify.add_argument("path", help="index directory")
    verify.set_defaults(func=_verify)
