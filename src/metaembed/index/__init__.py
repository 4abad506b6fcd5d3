"""Indexes: persistent budgeted multi-vector stores. They store tensors and never import the model.

``create_index(path, dim, num_vectors, dtype, backend)`` makes a new index, ``open_index(path)`` opens one;
both return an object implementing :class:`metaembed.index.base.Index`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaembed.errors import InputError
from metaembed.lazy import lazy_exports

if TYPE_CHECKING:
    from metaembed.index.base import Index

# The protocol and its errors live in metaembed.index.base, which imports torch (~1 s): loaded on first use,
# so importing a submodule (the CLI, for ``metaembed --help``) does not pay for it.
_FROM_BASE = (
    "DuplicateIdError",
    "Index",
    "IndexExistsError",
    "IndexFormatError",
    "IndexLockedError",
    "IndexNotFoundError",
    "IndexStorageError",
    "IndexStoreError",
    "ReadOnlyIndexError",
    "SearchResults",
    "UnknownIdError",
)
# ``ingest(index, model, paths)``: files → encoded items → index (metaembed.index.ingestion, which imports the model)
__getattr__ = lazy_exports(
    __name__, {**dict.fromkeys(_FROM_BASE, "metaembed.index.base"), "ingest": "metaembed.index.ingestion"}
)

BACKENDS = ("embedded", "qdrant")


def create_index(
    path: str | os.PathLike[str] | None,
    dim: int,
    num_vectors: int,
    dtype: str = "bf16",
    backend: str = "embedded",
    **opts: Any,
) -> Index:
    """Create a new index at ``path`` (a directory that must not hold an index yet) and open it for writing.

    ``backend="embedded"`` (default) is the on-disk memory-mapped store; ``backend="qdrant"`` stores in
    Qdrant (local mode under ``path``, or a server with ``url=...``; needs the ``qdrant`` extra).
    """
    if backend == "embedded":
        from metaembed.index.store import EmbeddedIndex

        return EmbeddedIndex.create(path, dim=dim, num_vectors=num_vectors, dtype=dtype, **opts)
    if backend == "qdrant":
        from metaembed.index.qdrant import QdrantIndex

        return QdrantIndex.create(path, dim=dim, num_vectors=num_vectors, dtype=dtype, **opts)
    raise InputError(f"unknown index backend {backend!r}; allowed: {', '.join(BACKENDS)}")


def open_index(path: str | os.PathLike[str] | None, *, backend: str | None = None, **opts: Any) -> Index:
    """Open an existing index. The backend is read from the directory unless given (``url=`` implies qdrant).

    ``read_only=True`` opens a reader that never takes the writer lock (any number may search while one
    process writes); ``refresh()`` on a reader picks up the writer's latest committed state.
    """
    if backend is None:
        if opts.get("url") is not None or (path is not None and (Path(path) / "qdrant.json").exists()):
            backend = "qdrant"
        else:
            backend = "embedded"
    if backend == "embedded":
        from metaembed.index.store import EmbeddedIndex

        return EmbeddedIndex.open(path, **opts)
    if backend == "qdrant":
        from metaembed.index.qdrant import QdrantIndex

        return QdrantIndex.open(path, **opts)
    raise InputError(f"unknown index backend {backend!r}; allowed: {', '.join(BACKENDS)}")


def open_for_cli(path: str | Path, *, url: str | None = None, read_only: bool = False):
    """``open_index`` whose not-found error names the command that creates the index."""
    from metaembed.index.base import IndexNotFoundError

    opts: dict[str, Any] = {"url": url} if url else {}
    if read_only:
        opts["read_only"] = True
    try:
        return open_index(path, **opts)
    except IndexNotFoundError:
        raise IndexNotFoundError(
            f"no index at {path}: create it with `metaembed index build {path} --model MODEL --items FOLDER` "
            "(or --embeddings/--ids for precomputed vectors)"
        ) from None


__all__ = ["BACKENDS", *_FROM_BASE, "create_index", "ingest", "open_for_cli", "open_index"]
