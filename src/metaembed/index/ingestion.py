"""Files → encoded candidates → index: batched, resumable, and sharded across processes under torchrun.

``ingest(index, model, paths)`` lists the items (:mod:`metaembed.index.files`), skips the ids the index
already holds, encodes the rest in batches with a progress bar (items/s, ETA) and commits them in chunks
of ``chunk_size`` items — one atomic ``add`` each, so a crash (even ``kill -9``) loses at most the chunk in
flight and a rerun finishes the rest. Items that cannot be read are counted and listed in the report,
never silently dropped; ``strict=True`` makes the first one fatal.

Chunks are cut from the whole listing (not from what is left to do), and every chunk is encoded in the same
batches whichever process encodes it, so one process and N processes produce the same vectors bit for bit.
Under ``torchrun`` (an initialised ``torch.distributed`` group) rank ``r`` encodes chunks ``r, r+W, …`` into
``shard_dir`` (:mod:`metaembed.index.shards`: one whole-or-absent file per chunk); after a barrier rank 0
commits the shards in chunk order and removes them. A rerun reuses every finished shard. The index never
imports the model: ``model`` is anything with ``encode_candidates``, ``num_vectors(side)`` and
``embedding_dim`` (a :class:`metaembed.MetaEmbedModel`).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metaembed.errors import InputError, MetaEmbedError
from metaembed.index.files import DEFAULT_LIMITS, BadItem, BadItemError, FileItem, Limits, discover, load
from metaembed.index.shards import Chunk, IngestError, read_shard, remove_shards, shard_name, write_shards
from metaembed.index.shards import broadcast as _broadcast
from metaembed.index.shards import gather as _gather
from metaembed.index.shards import world as _world

__all__ = ["IngestError", "IngestReport", "ingest", "open_for_model", "shard_name"]


@dataclass
class IngestReport:
    """What one ingest did. ``items_per_s`` counts the items encoded (or found bad) per second of encoding."""

    listed: int = 0
    already: int = 0
    added: int = 0
    bad: list[BadItem] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    encoded: int = 0
    encode_seconds: float = 0.0
    seconds: float = 0.0
    index_size: int = 0

    @property
    def items_per_s(self) -> float:
        return self.encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "listed": self.listed,
            "already_indexed": self.already,
            "added": self.added,
            "bad": [b.as_dict() for b in self.bad],
            "ignored_files": self.ignored,
            "encoded": self.encoded,
            "encode_seconds": round(self.encode_seconds, 3),
            "items_per_s": round(self.items_per_s, 3),
            "seconds": round(self.seconds, 3),
            "index_size": self.index_size,
        }

    def summary(self, max_bad: int = 20) -> str:
        lines = [
            f"added {self.added:,} items in {self.seconds:.1f} s ({self.items_per_s:.1f} items/s encoding); "
            f"{self.already:,} of {self.listed:,} listed were already in the index; it holds {self.index_size:,}"
        ]
        if self.ignored:
            kinds = ", ".join(f"{n} {suffix}" for suffix, n in sorted(self.ignored.items()))
            lines.append(f"ignored files that are neither images nor .txt/.md: {kinds}")
        if self.bad:
            lines.append(f"{len(self.bad)} bad item(s), not indexed:")
            lines += [f"  {b.id}: {b.reason} ({b.origin})" for b in self.bad[:max_bad]]
            if len(self.bad) > max_bad:
                lines.append(f"  … and {len(self.bad) - max_bad} more (all of them in --report)")
        return "\n".join(lines)


def ingest(
    index: Any,
    model: Any,
    items: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    dtype: str | None = None,
    backend: str | None = None,
    batch_size: int = 32,
    chunk_size: int = 256,
    strict: bool = False,
    where: Mapping[str, str] | None = None,
    limit: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    shard_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    **index_opts: Any,
) -> IngestReport:
    """Encode the items under ``items`` with ``model`` and add them to ``index``; return what was done.

    ``index`` is an open writable index, or a path: opened if it holds an index, else created for the model
    (its D and R_c) with ``dtype`` (default bf16) and ``backend`` (default embedded; ``url=`` and other
    ``index_opts`` go to the backend). ``where`` / ``limit`` select items (see
    :func:`metaembed.index.files.discover`). Under torchrun, ``shard_dir`` (default ``<index>.shards``) holds
    the ranks' shards until rank 0 commits them.
    """
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    start = time.perf_counter()
    rank, world = _world()
    by_path = isinstance(index, str | os.PathLike)
    if shard_dir is None and by_path:
        shard_dir = Path(f"{os.fspath(index).rstrip('/')}.shards")
    if world > 1 and shard_dir is None:
        raise InputError("a sharded ingest (torchrun) needs shard_dir= when the index is not given by path")
    shards = None if shard_dir is None else Path(shard_dir)
    report = IngestReport()
    store = None
    try:
        plan: list[tuple[int, list[FileItem]]] = []
        failure: MetaEmbedError | None = None
        if rank == 0:  # only rank 0 touches the index: the other ranks only encode
            try:
                store = open_for_model(index, model, dtype=dtype, backend=backend, **index_opts) if by_path else index
                _check_fits(store, model)
                plan = _plan(store, items, where, limit, chunk_size, report)
                if strict and report.bad:
                    raise IngestError(_strict_message(report.bad))
            except MetaEmbedError as error:
                if world == 1:
                    raise
                failure = error
        if world > 1:  # the other ranks wait here for rank 0's plan, or for the error that stopped it
            plan, report, failure = _broadcast((plan, report, failure))
            if failure is not None:
                raise failure
        mine = plan[rank::world]
        bar = _progress_bar(sum(len(pending) for _, pending in mine), rank, world, progress)
        began = time.perf_counter()
        encode = functools.partial(_encode_chunk, model, batch_size=batch_size, limits=limits, bar=bar, report=report)
        try:
            if world == 1:  # encode and commit chunk by chunk (reusing shards an interrupted torchrun run left)
                for number, pending in mine:
                    shard = None if shards is None else shards / shard_name(number, pending)
                    if shard is not None and shard.exists():
                        bar.update(len(pending))
                        chunk = read_shard(shard)
                    else:
                        chunk = encode(pending)
                    _commit(store, chunk, strict, report)
            else:
                write_shards(encode, mine, shards, bar)
        finally:
            bar.close()
        if world > 1:
            # items/s of the whole job: every rank's items over the slowest rank's wall time
            counts = _gather((report.encoded, time.perf_counter() - began))
            report.encoded, report.encode_seconds = sum(c for c, _ in counts), max(t for _, t in counts)
            if rank == 0:
                for number, pending in plan:
                    _commit(store, read_shard(shards / shard_name(number, pending)), strict, report)
        if rank == 0 and shards is not None and shards.is_dir():
            remove_shards(shards)
        if store is not None:
            report.index_size = len(store)
    finally:
        if by_path and store is not None:
            store.close()
    report.seconds = time.perf_counter() - start
    return report


def open_for_model(
    path: str | os.PathLike[str],
    model: Any,
    *,
    dtype: str | None = None,
    backend: str | None = None,
    read_only: bool = False,
    **opts: Any,
) -> Any:
    """The index at ``path`` if there is one (it must fit the model), else a new one sized for the model.

    ``read_only`` opens an existing index as a reader: never created, never written, no writer lock.
    """
    from metaembed.index import create_index, open_index
    from metaembed.index.base import IndexNotFoundError

    try:
        reader = {"read_only": True} if read_only else {}  # only then: not every backend takes the option
        store = open_index(path, backend=backend if opts.get("url") else None, **opts, **reader)
    except IndexNotFoundError:
        if read_only:
            raise
        count = model.num_vectors("candidate")
        return create_index(path, model.embedding_dim, count, dtype=dtype or "bf16", backend=backend or "embedded",
                            **opts)  # fmt: skip
    try:
        if backend is not None and store.backend != backend:
            raise InputError(f"{path} holds a {store.backend} index, not {backend}")
        if dtype is not None and store.dtype != dtype:
            raise InputError(f"{path} stores {store.dtype}, not {dtype}; leave the dtype out to add to it")
        _check_fits(store, model)
    except InputError:
        store.close()
        raise
    return store


def _check_fits(store: Any, model: Any) -> None:
    want = (model.embedding_dim, model.num_vectors("candidate"))
    if (store.dim, store.num_vectors) != want:
        raise InputError(
            f"the index holds {store.num_vectors} vectors of dimension {store.dim} per item, but the model makes "
            f"{want[1]} of dimension {want[0]}; use a new index for this model"
        )


def _plan(store, items, where, limit, chunk_size: int, report: IngestReport) -> list[tuple[int, list[FileItem]]]:
    """Chunks of the whole listing, each reduced to the items the index does not hold yet (empty ones dropped)."""
    found = discover(items if isinstance(items, list | tuple) else [items], where=where, limit=limit)
    report.listed, report.bad, report.ignored = len(found.items), list(found.bad), dict(found.ignored)
    plan = []
    for number, lo in enumerate(range(0, len(found.items), chunk_size)):
        chunk = found.items[lo : lo + chunk_size]
        pending = [item for item in chunk if item.id not in store]
        report.already += len(chunk) - len(pending)
        if pending:
            plan.append((number, pending))
    return plan


def _encode_chunk(model, pending: list[FileItem], *, batch_size: int, limits: Limits, bar, report) -> Chunk:
    ids, vectors, metadata, bad = [], [], [], []
    for lo in range(0, len(pending), batch_size):
        began = time.perf_counter()
        batch = pending[lo : lo + batch_size]
        inputs, good = [], []
        for item in batch:
            try:
                value, meta = load(item, limits)
            except BadItemError as error:
                bad.append(BadItem(item.id, item.origin, str(error)))
                continue
            inputs.append(value)
            good.append((item, meta))
        if inputs:
            encoded, reasons = _encode(model, inputs)
            for i, ((item, meta), row) in enumerate(zip(good, encoded, strict=True)):
                if row is None:
                    bad.append(BadItem(item.id, item.origin, f"the model refused it: {reasons[i]}"))
                else:
                    ids.append(item.id)
                    vectors.append(row)
                    metadata.append(meta)
        report.encoded += len(batch)
        report.encode_seconds += time.perf_counter() - began
        bar.update(len(batch))
    dim, count = model.embedding_dim, model.num_vectors("candidate")
    embeddings = torch.stack(vectors) if vectors else torch.empty(0, count, dim)
    return Chunk(ids, embeddings, metadata, bad)


def _encode(model, inputs: list[dict[str, Any]]) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """Rows of one forward pass over the batch; if the model refuses it, item by item to find the culprits."""
    try:
        return list(model.encode_candidates(inputs, batch_size=len(inputs), show_progress_bar=False)), []
    except MetaEmbedError as error:
        if len(inputs) == 1:
            return [None], [str(error)]
    rows: list[torch.Tensor | None] = []
    reasons: list[str | None] = []
    for value in inputs:
        try:
            rows.append(model.encode_candidates([value], batch_size=1, show_progress_bar=False)[0])
            reasons.append(None)
        except MetaEmbedError as error:
            rows.append(None)
            reasons.append(str(error))
    return rows, reasons


def _strict_message(bad: list[BadItem]) -> str:
    listed = "\n".join(f"  {b.id}: {b.reason} ({b.origin})" for b in bad[:20])
    return f"{len(bad)} bad item(s) and strict is on; nothing more was added:\n{listed}"


def _commit(store, chunk: Chunk, strict: bool, report: IngestReport) -> None:
    if strict and chunk.bad:
        report.bad += chunk.bad
        raise IngestError(_strict_message(chunk.bad))
    report.bad += chunk.bad
    if chunk.ids:
        store.add(chunk.ids, chunk.embeddings, chunk.metadata)
        report.added += len(chunk.ids)


def _progress_bar(total: int, rank: int, world: int, enabled: bool):
    from tqdm.auto import tqdm

    desc = "encode" if world == 1 else f"encode (rank {rank}/{world})"
    # one bar per rank would interleave on a shared terminal: rank 0 shows its own, the others stay quiet
    return tqdm(
        total=total, desc=desc, unit="item", disable=not enabled or rank != 0, dynamic_ncols=True, mininterval=1
    )
