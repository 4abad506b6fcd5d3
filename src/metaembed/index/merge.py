"""When and how the embedded store merges segments: size-tiered merges with bounded write amplification.

Every ``add`` writes one new segment; many small segments make every search pay a per-segment overhead, and
tombstoned rows keep their bytes until their segment is rewritten. :class:`MergePolicy` picks which segments to
merge; :func:`merge_segments` writes their live rows as one new segment through the same
:class:`~metaembed.index.segment.SegmentWriter` every ``add`` uses, after checking the disk has room for it.

Why the writes stay bounded. A segment of ``n`` rows sits in tier ``floor(log_T n)`` (``T`` = ``ratio``). A
merge takes ``T`` segments of one tier, so its result has at least ``T`` times the rows of the tier's floor and
lands at least one tier higher; merges whose result would exceed ``max_merged_bytes`` never run, and segments
that large never merge again for size. A row added in a batch of ``B`` rows therefore takes part in at most
``1 + floor(log_T(cap / B))`` merges (``cap`` = ``max_merged_bytes`` in rows; the 1 is the tier rounding),
and usually ``floor(log_T(cap / B))``, so ingesting ``N`` rows writes at most
``N · row_bytes · (2 + floor(log_T(cap / B)))`` bytes. With the defaults (T = 10, cap 2 GiB) and 1,000-row
adds of 64×384 bf16 (49 MB), a row is merged once: about 2× the final index bytes, independent of N.
Deletes: a segment more than half dead is rewritten (its live rows only), so tombstoned bytes stay below half
of what each segment holds.

In place. A merge whose first input has no tombstones keeps that input's rows where they are
(:class:`~metaembed.index.extend.SegmentExtender`): the result's vector files are hard links to the first
input's files, the other inputs' live rows are appended past its rows, and the manifest names the result with
the summed count. A merge of T equal segments then writes (T-1)/T of its rows, not all of them: with the
defaults above a row costs about 1.9× its bytes instead of 2×. It is safe because no byte any manifest counts
is changed: readers map only the bytes their manifest counts (a file longer than that is fine, a shorter one is
damage), the appended bytes are fsynced before the manifest that counts them is published, and bytes appended
by a merge that failed or was killed are past every count: the failure truncates them, the next writer open
does after a crash (``trim_tails``), and ``index verify`` does not call them damage. A filesystem without hard
links, or a base file that another directory also names (a ``cp -al`` backup), gets the ordinary rewrite.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaembed.errors import InputError
from metaembed.index import manifest as manifests
from metaembed.index.base import IndexStorageError
from metaembed.index.extend import CannotExtendError, SegmentExtender, extendable
from metaembed.index.layout import row_bytes
from metaembed.index.segment import Segment, SegmentWriter, segment_name

HEADROOM_BYTES = 64 * 2**20  # free space a merge leaves beyond its own output (the manifest, other writers)


@dataclass(frozen=True)
class MergePolicy:
    """Size-tiered merging (see the module docstring for the write-amplification bound).

    ``ratio``: segments of one tier merged at once (T). ``max_merged_bytes``: no merge writes a larger segment.
    ``on_write``: merge after each ``add``/``upsert``/``delete`` commits (the default); with False the writer
    calls :meth:`EmbeddedIndex.merge` when it chooses (between ingest batches, when the service is idle), so
    no ``add`` ever waits for a merge.
    """

    ratio: int = 10
    max_merged_bytes: int = 2 * 2**30
    on_write: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int) or self.ratio < 2:
            raise InputError(f"MergePolicy.ratio must be an int >= 2, got {self.ratio!r}")
        if isinstance(self.max_merged_bytes, bool) or not isinstance(self.max_merged_bytes, int):
            raise InputError(f"MergePolicy.max_merged_bytes must be an int, got {self.max_merged_bytes!r}")
        if self.max_merged_bytes < 1:
            raise InputError(f"MergePolicy.max_merged_bytes must be positive, got {self.max_merged_bytes}")

    def tier(self, rows: int) -> int:
        """``floor(log_ratio(rows))`` in integers (0 for 1 .. ratio-1 rows)."""
        tier, bound = 0, self.ratio
        while rows >= bound:
            tier, bound = tier + 1, bound * self.ratio
        return tier

    def pick(self, segments: Sequence[Segment], bytes_per_row: int) -> list[str] | None:
        """Names of the segments to merge now, or None: mostly-dead segments first, then the lowest full tier."""
        dead = [s.name for s in segments if 2 * (s.count - int(s.live.sum())) > s.count]
        if dead:
            return dead
        tiers: dict[int, list[Segment]] = {}
        for segment in segments:
            if segment.count * bytes_per_row < self.max_merged_bytes:
                tiers.setdefault(self.tier(segment.count), []).append(segment)
        for tier in sorted(tiers):
            group = tiers[tier][: self.ratio]  # the oldest of the tier
            if len(group) == self.ratio and sum(s.count for s in group) * bytes_per_row <= self.max_merged_bytes:
                return [s.name for s in group]
        return None


def free_bytes(root: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``root``."""
    return shutil.disk_usage(root).free


def check_headroom(root: Path, needed: int, what: str) -> None:
    """IndexStorageError (ENOSPC) before writing, if ``needed`` bytes plus the headroom do not fit on the disk."""
    free = free_bytes(root)
    if free < needed + HEADROOM_BYTES:
        error = IndexStorageError(
            f"cannot {what}: it needs {needed / 2**30:.2f} GiB (+{HEADROOM_BYTES // 2**20} MiB headroom) and "
            f"{free / 2**30:.2f} GiB are free on the disk of {root}; nothing was written (free space, or merge "
            "fewer segments)"
        )
        error.errno = errno.ENOSPC
        raise error


def merge_segments(
    root: Path, manifest: dict[str, Any], segments: Sequence[Segment], chosen: Iterable[str]
) -> tuple[dict[str, Any], SegmentWriter | None]:
    """Write the live rows of the ``chosen`` segments as one new segment; ``(draft manifest, its writer)``.

    The draft replaces the chosen segments (and their tombstones) by the new one, appended last, with their rows
    in segment order; the writer is None when no chosen row is live (else ``writer.name`` is the new segment and
    ``writer._abandon()`` undoes it while the draft is not committed). When the first chosen segment has no
    tombstones its rows stay in place and the others' are appended to its files (see the module docstring).
    The disk must have room for what is written first; the old segments' checksums are verified, so a damaged
    file is reported (IndexFormatError) instead of being rewritten or extended under a fresh checksum; a failure
    removes what was written. Nothing is committed here: the caller publishes the draft.
    """
    chosen = set(chosen)
    merged = [s for s in segments if s.name in chosen]
    entries = {entry["name"]: entry for entry in manifest["segments"]}
    live_rows = sum(int(s.live.sum()) for s in merged)
    base = merged[0] if merged and extendable(merged[0], entries[merged[0].name], manifest) else None
    copied = live_rows - (base.count if base is not None else 0)
    needed = copied * row_bytes(manifest) + sum(entries[s.name]["items_bytes"] for s in merged)
    what = f"merge {len(merged)} segments ({live_rows:,} live rows, {copied:,} of them copied)"
    check_headroom(root, needed, what)
    for segment in merged:
        segment.verify(entries[segment.name])
    draft = manifests.next_generation(manifest)
    draft["segments"] = [entry for entry in draft["segments"] if entry["name"] not in chosen]
    draft["deleted"] = {name: rows for name, rows in draft["deleted"].items() if name not in chosen}
    if live_rows == 0:
        return draft, None
    name = segment_name(draft["generation"])
    if base is not None:
        try:
            return draft, _write(draft, SegmentExtender(root, draft, name, base, entries[base.name]), merged[1:])
        except CannotExtendError:  # no hard links here, or a base file linked elsewhere: copy every row instead
            needed += base.count * row_bytes(manifest)
            check_headroom(root, needed, f"merge {len(merged)} segments ({live_rows:,} live rows)")
    return draft, _write(draft, SegmentWriter(root, draft, name), merged)


def _write(draft: dict[str, Any], writer: SegmentWriter, segments: Sequence[Segment]) -> SegmentWriter:
    with writer:
        for segment in segments:
            writer.append_live(segment)
        draft["segments"].append(writer.finish())
    return writer
