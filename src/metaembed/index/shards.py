"""The shards of a sharded ingest: under torchrun each rank writes the chunks it encodes to files rank 0 commits.

A shard is one safetensors file per chunk, ``chunk-K-<digest>.safetensors``: the fp32 vectors, and the ids,
metadata and bad items in its header. It is written under a temporary name, fsynced and renamed, so it is whole
or absent; a rerun reuses every finished shard, and the digest of the chunk's ids keeps a changed listing from
reusing a stale one. This module knows files, chunks and the process group, not the model or the index.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metaembed.index.base import IndexStoreError
from metaembed.index.files import BadItem, FileItem

SHARD_FORMAT = "metaembed-ingest-shard"


class IngestError(IndexStoreError, ValueError):
    """An ingest that cannot go on: a bad item under ``strict=True``, or a shard another rank did not write."""


@dataclass
class Chunk:
    """One chunk encoded: the ids and vectors of its good items, their metadata, and its bad items."""

    ids: list[str]
    embeddings: torch.Tensor
    metadata: list[dict[str, Any]]
    bad: list[BadItem]


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(value):
    """Rank 0's ``value`` on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)  # also the barrier before rank 0 commits the shards
    return out


def shard_name(number: int, pending: Sequence[FileItem]) -> str:
    """A chunk's shard file: its number and a digest of its ids (a changed listing never reuses a stale shard)."""
    digest = hashlib.sha256("\n".join(item.id for item in pending).encode("utf-8", "surrogatepass")).hexdigest()
    return f"chunk-{number:06d}-{digest[:16]}.safetensors"


def write_shards(
    encode: Callable[[list[FileItem]], Chunk], mine: list[tuple[int, list[FileItem]]], shard_dir: Path, bar
) -> None:
    """This rank's chunks → one safetensors file each: the fp32 vectors, ids, metadata and bad items."""
    from safetensors.torch import save_file

    shard_dir.mkdir(parents=True, exist_ok=True)
    for number, pending in mine:
        target = shard_dir / shard_name(number, pending)
        if target.exists():  # finished by an earlier run
            bar.update(len(pending))
            continue
        chunk = encode(pending)
        header = {
            "format": SHARD_FORMAT,
            "ids": json.dumps(chunk.ids, ensure_ascii=False),
            "metadata": json.dumps(chunk.metadata, ensure_ascii=False),
            "bad": json.dumps([b.as_dict() for b in chunk.bad], ensure_ascii=False),
        }
        tmp = target.with_name(target.name + ".tmp")
        save_file({"embeddings": chunk.embeddings.contiguous()}, str(tmp), metadata=header)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)


def read_shard(path: Path) -> Chunk:
    """A shard back as the chunk it holds; :class:`IngestError` if it is missing, truncated or foreign."""
    from safetensors import safe_open

    if not path.exists():
        raise IngestError(f"shard {path} is missing: a rank stopped before writing it; rerun the same command")
    try:
        with safe_open(str(path), "pt") as handle:
            header = handle.metadata() or {}
            embeddings = handle.get_tensor("embeddings")
        if header.get("format") != SHARD_FORMAT:
            raise ValueError("no metaembed shard header")
        bad = [BadItem(**entry) for entry in json.loads(header["bad"])]
        return Chunk(json.loads(header["ids"]), embeddings, json.loads(header["metadata"]), bad)
    except Exception as error:  # safetensors raises its own types for truncated or foreign files
        raise IngestError(f"cannot read shard {path} ({error}); delete it and rerun to encode it again") from None


def remove_shards(shard_dir: Path) -> None:
    """After a complete commit: the shards are in the index (or stale, from a listing that changed)."""
    for path in shard_dir.glob("chunk-*.safetensors*"):
        path.unlink()
    if not any(shard_dir.iterdir()):
        shard_dir.rmdir()
