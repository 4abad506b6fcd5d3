"""A segment of the embedded store: one immutable batch of rows, its files, and the one code path that writes them.

Files of segment ``seg-<generation>-<tag>`` (see docs/index.md)::

    <name>.g<i>.bin     group i: (n, n_g, D) raw little-endian fp32 | bf16 | int8
    <name>.s<i>.bin     int8 only: per-vector fp32 scales (n, n_g)
    <name>.items.json   {"ids": [...], "metadata": [... | null]}

:class:`SegmentWriter` is the only writer: an ``add`` streams one batch of new rows through it, a merge streams
the live rows of old segments through it, chunk by chunk. Every file is fsynced before the manifest names it and
a failed write removes what it wrote. (:mod:`metaembed.index.extend` is the same writer for a merge that keeps
its first input's rows where they are.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import secrets
import stat
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaembed import fused
from metaembed.budget import Budget
from metaembed.index.base import IndexFormatError
from metaembed.index.layout import TORCH_DTYPE, encode
from metaembed.index.manifest import segment_files
from metaembed.index.storage import (
    MappedFile,
    crc32_file,
    open_new,
    tensor_bytes,
    write_file,
)
from metaembed.scoring import check_embeddings

# Vector files up to this size are checksummed whenever a process maps them (about 10 ms each); larger ones
# by ``metaembed index verify`` and before a merge rewrites them.
VERIFY_ON_OPEN_BYTES = 16 * 2**20
# A merge copies rows in chunks of about this many bytes: its memory stays flat however large the segments.
MERGE_CHUNK_BYTES = 64 * 2**20


def segment_name(generation: int) -> str:
    return f"seg-{generation:08d}-{secrets.token_hex(4)}"


def vector_files(layout: dict[str, Any], count: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(file suffix, shape, dtype) of each vector file of a ``count``-row segment: group i, then its int8 scales."""
    bounds, dim, dtype = layout["bounds"], layout["dim"], layout["dtype"]
    out = []
    for i in range(len(bounds) - 1):
        width = bounds[i + 1] - bounds[i]
        out.append((f"g{i}.bin", (count, width, dim), TORCH_DTYPE[dtype]))
        if dtype == "int8":
            out.append((f"s{i}.bin", (count, width), torch.float32))
    return out


@dataclass
class Segment:
    """One immutable batch of rows: its group arrays (memory-mapped) and its ids and metadata."""

    name: str
    count: int
    ids: list[str]
    metadata: list[dict[str, Any] | None]
    groups: list[torch.Tensor]
    scales: list[torch.Tensor | None]
    live: torch.Tensor  # (count,) bool; False = tombstoned; never changed in place (a new Segment per snapshot)
    files: list[MappedFile] = field(default_factory=list)  # the mappings behind groups and scales
    bounds: list[int] = field(default_factory=list)  # vector positions of the groups: [0, 1, 4, ..., R_c]
    # per r_c, the fused kernel's view of the groups that budget reads (None: it cannot read them); see score
    _kernel_views: dict[int, fused.Blocks | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    def with_deleted(self, deleted: Sequence[int]) -> Segment:
        """The same rows with a fresh live mask: a search still holding the old one never sees a delete halfway."""
        live = torch.ones(self.count, dtype=torch.bool)
        if deleted:
            live[torch.tensor(list(deleted), dtype=torch.long)] = False
        return dataclasses.replace(self, live=live)

    def parts(self) -> list[torch.Tensor]:
        """The stored arrays in file order (group 0, its scales, group 1, ...)."""
        return [t for pair in zip(self.groups, self.scales, strict=True) for t in pair if t is not None]

    def check(self) -> None:
        """IndexFormatError if a mapped file changed size or was read past its end (see MappedFile)."""
        for mapped in self.files:
            mapped.check()

    def verify(self, entry: dict[str, Any]) -> None:
        """Checksum every mapped vector file against the manifest entry (before a merge rewrites it)."""
        crcs = entry.get("crc32", {})
        for mapped in self.files:
            suffix = mapped.path.name.removeprefix(self.name + ".")
            if suffix in crcs and mapped.crc32() != crcs[suffix]:
                raise IndexFormatError(
                    f"{mapped.path} fails its checksum: the file is corrupt; the merge refused to rewrite it "
                    "(metaembed index verify lists every damaged file)"
                )

    def _groups_read_by(self, budget: Budget):
        """(first vector position, group, scale) of each group ``budget`` reads; later groups are never touched."""
        for start, group, scale in zip(self.bounds, self.groups, self.scales, strict=False):
            if start >= budget.r_c:
                return
            yield start, group, scale

    def read(self, budget: Budget, rows: slice | torch.Tensor):
        """The groups (and scales) a budget reads, restricted to ``rows``; later groups are never touched."""
        groups, scales = [], []
        for _, group, scale in self._groups_read_by(budget):
            if isinstance(rows, slice):
                groups.append(group[rows])
                scales.append(None if scale is None else scale[rows])
            else:
                groups.append(group.index_select(0, rows))
                scales.append(None if scale is None else scale.index_select(0, rows))
        return groups, scales

    def kernel_view(self, budget: Budget) -> fused.Blocks | None:
        """The fused kernel's view of the groups ``budget`` reads, each cut to the vectors it takes, or None where
        the kernel cannot read them (not bf16). Made once per ``r_c``: the groups never move."""
        if budget.r_c not in self._kernel_views:
            blocks = []
            for start, group, scale in self._groups_read_by(budget):
                take = min(group.shape[1], budget.r_c - start)
                blocks.append((group if take == group.shape[1] else group[:, :take], scale))
            self._kernel_views[budget.r_c] = fused.prepare(blocks)
        return self._kernel_views[budget.r_c]

    def score(self, queries: torch.Tensor, budget: Budget, rows: slice | torch.Tensor) -> torch.Tensor:
        """Exact MaxSim ``(nq, n_rows)`` of queries against some rows of this segment.

        A list of rows of a bf16 segment is read in place by the fused kernel: rescoring a shortlist at each level of
        ``budget="auto"`` copies no rows out, and its checks and address arrays are made once per budget (the same
        scores, bit for bit, as scoring a copy of the rows)."""
        from metaembed.index.kernels import maxsim_grouped

        view = self.kernel_view(budget) if isinstance(rows, torch.Tensor) and queries.device.type == "cpu" else None
        if view is not None and fused.supports(queries, view):
            check_embeddings(queries, "queries", dim=view.dim)
            budget.validate(queries.shape[1], self.bounds[-1])
            # narrow, not a slice: tensor indexing costs several microseconds a call, a tenth of a small rescoring
            scores = fused.fused_scores(queries.narrow(1, 0, budget.r_q), view, rows=rows)
        else:
            groups, scales = self.read(budget, rows)
            scores = maxsim_grouped(queries, groups, budget, scales)
        # stored vectors and queries are finite (both checked on the way in), so a non-finite score means
        # bytes changed on disk: report it, never rank by it. Checked on a numpy view of the CPU scores: torch's
        # isfinite writes a mask tensor first, and a rescoring of a few rows pays its dispatch on every call.
        finite = np.isfinite(scores.numpy()).all() if scores.device.type == "cpu" else torch.isfinite(scores).all()
        if not finite:
            where = self.files[0].path.with_name(self.name) if self.files else self.name
            raise IndexFormatError(
                f"{where}.* holds non-finite values (scores are NaN or infinite): a vector file is corrupt, or its "
                "values overflow float32; metaembed index verify lists damaged files"
            )
        return scores

    def vectors(self, row: int) -> torch.Tensor:
        """All stored vectors of one row, float32 and dequantised: ``(R_c, D)``."""
        parts = []
        for group, scale in zip(self.groups, self.scales, strict=True):
            values = group[row].float()
            parts.append(values if scale is None else values * scale[row, :, None])
        return torch.cat(parts)


def open_segment(root: Path, layout: dict[str, Any], entry: dict[str, Any], deleted: Sequence[int]) -> Segment:
    """Map a committed segment's files (privately: pages load lazily, so indexes larger than RAM work)."""
    raw = (root / f"{entry['name']}.items.json").read_bytes()
    if zlib.crc32(raw) != entry["items_crc32"]:
        raise IndexFormatError(f"{root / entry['name']}.items.json fails its checksum: the file is corrupt")
    items = json.loads(raw.decode("utf-8"))
    groups, scales, files = [], [], []
    crcs = entry.get("crc32", {})  # absent in segments written before per-file checksums
    for suffix, shape, dtype in vector_files(layout, entry["count"]):
        mapped = MappedFile(root / f"{entry['name']}.{suffix}", math.prod(shape) * dtype.itemsize)
        if suffix in crcs and mapped.size <= VERIFY_ON_OPEN_BYTES and mapped.crc32() != crcs[suffix]:
            raise IndexFormatError(
                f"{mapped.path} fails its checksum: the file is corrupt (metaembed index verify lists every "
                "damaged file)"
            )
        files.append(mapped)
        (groups if suffix.startswith("g") else scales).append(mapped.tensor(shape, dtype))
    if layout["dtype"] != "int8":
        scales = [None] * len(groups)
    segment = Segment(entry["name"], entry["count"], items["ids"], items["metadata"], groups, scales,
                      torch.ones(0, dtype=torch.bool), files, list(layout["bounds"]))  # fmt: skip
    return segment.with_deleted(deleted)


class SegmentWriter:
    """Writes one new segment: rows are appended in order, ``finish`` fsyncs and returns its manifest entry.

    Use as a context manager: leaving it by an exception removes every file it wrote.
    """

    def __init__(self, root: Path, layout: dict[str, Any], name: str) -> None:
        self.root, self.layout, self.name = root, layout, name
        self.suffixes = [suffix for suffix, _, _ in vector_files(layout, 0)]
        self.crcs = dict.fromkeys(self.suffixes, 0)
        self.ids: list[str] = []
        self.metadata: list[dict[str, Any] | None] = []
        self.bytes_written = 0
        self._handles: list[Any] = []

    def __enter__(self) -> SegmentWriter:
        try:
            for suffix in self.suffixes:
                self._handles.append(open_new(self.root / f"{self.name}.{suffix}"))
        except BaseException:
            self._abandon()
            raise
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is not None:
            self._abandon()

    def append(self, ids: Sequence[str], metadata: Sequence[dict[str, Any] | None], parts: Sequence[torch.Tensor]):
        """Append rows: their ids, metadata and stored arrays in file order (as ``Segment.parts``)."""
        for suffix, handle, part in zip(self.suffixes, self._handles, parts, strict=True):
            data = tensor_bytes(part)
            handle.write(data)
            self.crcs[suffix] = zlib.crc32(data, self.crcs[suffix])
            self.bytes_written += len(data)
        self.ids.extend(ids)
        self.metadata.extend(metadata)

    def append_embeddings(
        self, ids: Sequence[str], embeddings: torch.Tensor, metadata: Sequence[dict[str, Any] | None]
    ) -> None:
        """Append new rows from float embeddings ``(n, R_c, D)``, rounded or quantised to the index's dtype."""
        codes, scale = encode(embeddings, self.layout["dtype"])
        bounds = self.layout["bounds"]
        parts = []
        for a, b in itertools.pairwise(bounds):
            parts.append(codes[:, a:b])
            if scale is not None:
                parts.append(scale[:, a:b])
        self.append(ids, metadata, parts)

    def append_live(self, segment: Segment) -> None:
        """Append the live rows of an existing segment, a chunk of rows at a time."""
        rows = torch.nonzero(segment.live).flatten()
        row_bytes = sum(math.prod(part.shape[1:]) * part.element_size() for part in segment.parts())
        step = max(1, MERGE_CHUNK_BYTES // max(row_bytes, 1))
        for lo in range(0, rows.numel(), step):
            chunk = rows[lo : lo + step]
            picked = chunk.tolist()
            parts = [part.index_select(0, chunk) for part in segment.parts()]
            self.append([segment.ids[r] for r in picked], [segment.metadata[r] for r in picked], parts)

    def finish(self) -> dict[str, Any]:
        """fsync and close the vector files, write the items file; the segment's manifest entry."""
        for handle in self._handles:
            handle.flush()
            os.fsync(handle.fileno())
        for handle in self._handles:
            handle.close()
        raw = json.dumps({"ids": self.ids, "metadata": self.metadata}, ensure_ascii=False).encode("utf-8")
        items_crc = write_file(self.root / f"{self.name}.items.json", raw)
        self.bytes_written += len(raw)
        return {
            "name": self.name,
            "count": len(self.ids),
            "items_bytes": len(raw),
            "items_crc32": items_crc,
            "crc32": self.crcs,
        }

    def _abandon(self) -> None:
        for handle in self._handles:
            with contextlib.suppress(OSError):
                handle.close()
        remove_segment(self.root, self.name)


def remove_segment(root: Path, name: str) -> None:
    """Remove the files of a segment no manifest names (cleanup after a failed write; errors ignored)."""
    for entry in root.glob(f"{name}.*"):
        with contextlib.suppress(OSError):
            entry.unlink()


def verify_file(path: Path, size: int, crc: int | None, *, may_grow: bool = False) -> str | None:
    """What is wrong with one file of a segment (missing, resized, corrupt), or None.

    ``may_grow`` (vector files): bytes past ``size`` are not damage but an in-place merge's appends that no
    manifest has committed (one in flight, or one a crash interrupted, truncated at the next writer open); the
    checksum covers the manifest's bytes only."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size < size or (st.st_size > size and not may_grow):
        return f"{st.st_size} bytes, the manifest says {size} (truncated or foreign)"
    if crc is not None and crc32_file(path, size) != crc:
        return "fails its checksum (corrupt)"
    return None


def verify_all(root: Path, manifest: dict[str, Any]) -> tuple[list[str], int]:
    """Size and CRC-32 of every file the manifest names: ``(problems, files checked)``."""
    problems, checked = [], 0
    for seg in manifest["segments"]:
        crcs = {**seg.get("crc32", {}), "items.json": seg["items_crc32"]}
        for name, size in segment_files(manifest, seg):
            checked += 1
            suffix = name.split(".", 1)[1]
            problem = verify_file(root / name, size, crcs.get(suffix), may_grow=suffix != "items.json")
            if problem:
                problems.append(f"{name}: {problem}")
    return problems, checked
