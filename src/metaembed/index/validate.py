"""The checks an item's id and metadata pass before any index (or the service in front of one) stores them.

Every backend and the HTTP service call these, so an id or a metadata entry is accepted or refused by the same
rule everywhere. Each raises :class:`~metaembed.errors.InputError` (a ``ValueError``) naming the offending
position, or :class:`~metaembed.index.base.DuplicateIdError` for a repeated id; nothing is stored when one raises.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch

from metaembed.errors import InputError
from metaembed.index.base import DuplicateIdError
from metaembed.scoring import check_embeddings
from metaembed.text import check_unicode

Metadata = dict[str, Any] | None


def check_ids(ids: Sequence[str], *, what: str = "ids") -> list[str]:
    """Validate user ids: a sequence of non-empty str, each encodable as UTF-8 (no lone surrogates)."""
    if isinstance(ids, str | bytes):
        raise InputError(f"{what} must be a sequence of strings, got a single {type(ids).__name__}")
    out: list[str] = []
    for i, item_id in enumerate(ids):
        if not isinstance(item_id, str):
            raise InputError(f"{what}[{i}] must be a str, got {type(item_id).__name__} {item_id!r}")
        if not item_id:
            raise InputError(f"{what}[{i}] is empty; ids are non-empty strings")
        out.append(check_unicode(item_id, f"{what}[{i}] = {item_id!r}"))
    return out


def check_unique(ids: Sequence[str]) -> None:
    """DuplicateIdError naming the ids that appear more than once in one write."""
    seen: set[str] = set()
    repeated = sorted({i for i in ids if i in seen or seen.add(i)})
    if repeated:
        raise DuplicateIdError(f"ids repeat within one call: {repeated[:5]}; each id may appear once")


def check_metadata(metadata: Sequence[Metadata] | None, n: int | None = None) -> list[Metadata] | None:
    """Validate metadata: one JSON object (or None) per item; returns plain-JSON copies of the entries.

    With ``n`` (the number of items written) the count must match, and ``None`` becomes ``[None] * n``; without
    it ``None`` stays ``None``. Values must survive JSON as stored (no NaN/Infinity, no lone surrogates).
    """
    if metadata is None:
        return None if n is None else [None] * n
    if isinstance(metadata, dict | str | bytes):
        raise InputError("metadata must be a sequence of dicts, one per item (or None)")
    metadata = list(metadata)
    if n is not None and len(metadata) != n:
        raise InputError(f"got {len(metadata)} metadata entries for {n} items; pass one dict per item or None")
    out: list[Metadata] = []
    for i, entry in enumerate(metadata):
        if entry is None:
            out.append(None)
            continue
        if not isinstance(entry, dict):
            raise InputError(f"metadata[{i}] must be a dict or None, got {type(entry).__name__}")
        try:
            text = json.dumps(entry, allow_nan=False, ensure_ascii=False)
            text.encode("utf-8")
        except (TypeError, ValueError) as error:
            raise InputError(
                f"metadata[{i}] is not JSON-serialisable ({error}); use str/int/float/bool/list/dict"
            ) from None
        out.append(json.loads(text))
    return out


def check_write(
    ids: Sequence[str], embeddings: torch.Tensor, metadata: Sequence[Metadata] | None, *, dim: int, num_vectors: int
) -> tuple[list[str], torch.Tensor, list[Metadata]]:
    """Everything an ``add`` or ``upsert`` checks before it writes: ``(ids, float32 CPU embeddings, metadata)``.

    Ids valid and unique, embeddings ``(n, num_vectors, dim)`` floating and finite, one metadata entry per item.
    """
    ids = check_ids(ids)
    check_embeddings(embeddings, "embeddings", num_vectors=num_vectors, dim=dim)
    if len(ids) != embeddings.shape[0]:
        raise InputError(f"got {len(ids)} ids for {embeddings.shape[0]} embeddings; pass one id per item")
    check_unique(ids)
    embeddings = embeddings.detach().to("cpu", torch.float32)
    if not torch.isfinite(embeddings).all():
        raise InputError("embeddings contain NaN or infinite values")
    return ids, embeddings, check_metadata(metadata, len(ids))


__all__ = ["check_ids", "check_metadata", "check_unique", "check_write"]
