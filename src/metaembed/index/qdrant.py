"""The Qdrant backend: the same :class:`~metaembed.index.base.Index` protocol over qdrant-client.

Each item is one Qdrant point holding one named multivector per prefix bound — ``c1, c4, c8, c16, c64``
(the same bounds as the embedded store's groups) — each with ``MultiVectorComparator.MAX_SIM`` and dot
product, so a search at budget ``(r_q, r_c)`` queries vector ``c{r_c}`` with the first ``r_q`` query vectors
and Qdrant computes exactly ``Σ_i max_j <q_i, c_j>``. Two-stage search is a Qdrant prefetch cascade:
``c1`` with ``candidates`` hits, then ``c{r_c}`` on those. Multivectors are stored with ``hnsw m=0`` (no
graph: exact full-scan scoring, matching the embedded store).

``QdrantIndex.create(path=dir)`` uses qdrant-client's local mode (in-process, for tests and small data;
its own persistence format); ``url="http://host:6333"`` uses a Qdrant server or cluster — the documented
scale-out path. Ids are stored as UUID5 point ids with the user id in the payload. int8/bf16 dtypes store
the dequantised values as float32 so scores equal the embedded store of that dtype.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from metaembed.budget import Budget
from metaembed.errors import BudgetError, InputError
from metaembed.index.base import (
    DuplicateIdError,
    IndexBase,
    IndexExistsError,
    IndexFormatError,
    IndexNotFoundError,
    SearchResults,
    UnknownIdError,
    budget_bytes,
    check_dtype,
)
from metaembed.index.layout import default_candidates, group_bounds, stored_values
from metaembed.index.validate import check_ids, check_write

MARKER = "qdrant.json"
FORMAT = "metaembed-qdrant"
_NAMESPACE = uuid.UUID("6f1c3a52-4c8e-4d0e-9a53-8d8f0e7c2b11")
_BATCH = 256


def point_id(item_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, item_id))


class QdrantIndex(IndexBase):
    """Index protocol over Qdrant (local ``path=`` mode or a server ``url=``)."""

    backend = "qdrant"

    def __init__(self, client: Any, collection: str, config: dict[str, Any], path: Path | None) -> None:
        self.client = client
        self.collection = collection
        self.path = path
        self.dim: int = config["dim"]
        self.num_vectors: int = config["num_vectors"]
        self.dtype: str = config["dtype"]
        self.bounds: list[int] = config["bounds"]
        self._closed = False

    @staticmethod
    def _client(path: Path | None, url: str | None, api_key: str | None):
        try:
            from qdrant_client import QdrantClient
        except ImportError:
            raise InputError("the qdrant backend needs qdrant-client: pip install 'metaembed[qdrant]'") from None

        if url is not None:
            return QdrantClient(url=url, api_key=api_key)
        if path is None:
            raise InputError("the qdrant backend needs path= (local mode) or url= (a Qdrant server)")
        return QdrantClient(path=str(path / "qdrant"))

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str] | None,
        *,
        dim: int,
        num_vectors: int,
        dtype: str = "fp32",
        url: str | None = None,
        api_key: str | None = None,
        collection: str = "metaembed",
    ) -> QdrantIndex:
        check_dtype(dtype)
        for name, value in (("dim", dim), ("num_vectors", num_vectors)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        root = Path(path) if path is not None else None
        if root is not None and url is None:
            if root.exists() and (not root.is_dir() or any(root.iterdir())):
                raise IndexExistsError(f"{root} exists and is not an empty directory; pick a new path")
            root.mkdir(parents=True, exist_ok=True)
        client = cls._client(root, url, api_key)
        from qdrant_client import models

        if client.collection_exists(collection):
            client.close()
            raise IndexExistsError(f"Qdrant collection {collection!r} already exists; open it with open_index")
        config = {"format": FORMAT, "dim": dim, "num_vectors": num_vectors, "dtype": dtype}
        config["bounds"] = group_bounds(num_vectors)
        vectors = {
            f"c{b}": models.VectorParams(
                size=dim,
                distance=models.Distance.DOT,
                multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM),
                hnsw_config=models.HnswConfigDiff(m=0),
            )
            for b in config["bounds"][1:]
        }
        client.create_collection(collection, vectors_config=vectors, metadata={"metaembed": config})
        if root is not None and url is None:
            (root / MARKER).write_text(json.dumps({**config, "collection": collection}))
        return cls(client, collection, config, root)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None,
        *,
        url: str | None = None,
        api_key: str | None = None,
        collection: str = "metaembed",
        read_only: bool = False,
    ) -> QdrantIndex:
        root = Path(path) if path is not None else None
        if url is None:
            if root is None or not (root / MARKER).is_file():
                raise IndexNotFoundError(f"no metaembed Qdrant index at {root} (no {MARKER})")
            try:
                marker = json.loads((root / MARKER).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise IndexFormatError(f"{root / MARKER} is not a metaembed Qdrant marker: {error}") from None
            collection = marker.get("collection", collection)
        client = cls._client(root, url, api_key)
        if not client.collection_exists(collection):
            client.close()
            raise IndexNotFoundError(f"Qdrant has no collection {collection!r}")
        info = client.get_collection(collection)
        config = (info.config.metadata or {}).get("metaembed")
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            client.close()
            raise IndexFormatError(f"Qdrant collection {collection!r} was not created by metaembed")
        return cls(client, collection, config, root)

    # ------------------------------------------------------------------ helpers

    def _check_open(self) -> None:
        if self._closed:
            raise InputError("this Qdrant index is closed")

    def _existing(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for lo in range(0, len(ids), _BATCH):
            points = self.client.retrieve(
                self.collection, [point_id(i) for i in ids[lo : lo + _BATCH]], with_payload=["id"], with_vectors=False
            )
            found.update(p.payload["id"] for p in points)
        return found

    # ------------------------------------------------------------------ protocol

    def add(self, ids: Sequence[str], embeddings: torch.Tensor, metadata: Sequence[dict] | None = None) -> None:
        self._write(ids, embeddings, metadata, replace=False)

    def upsert(self, ids: Sequence[str], embeddings: torch.Tensor, metadata: Sequence[dict] | None = None) -> None:
        self._write(ids, embeddings, metadata, replace=True)

    def _write(self, ids, embeddings, metadata, *, replace: bool) -> None:
        from qdrant_client import models

        self._check_open()
        ids, embeddings, meta = check_write(ids, embeddings, metadata, dim=self.dim, num_vectors=self.num_vectors)
        if not replace:
            existing = sorted(self._existing(ids))
            if existing:
                raise DuplicateIdError(
                    f"{len(existing)} id(s) already in the index, e.g. {existing[:5]}; use upsert to replace them"
                )
        values = stored_values(embeddings, self.dtype)
        points = [
            models.PointStruct(
                id=point_id(item_id),
                vector={f"c{b}": values[n, :b].tolist() for b in self.bounds[1:]},
                payload={"id": item_id, "metadata": meta[n]},
            )
            for n, item_id in enumerate(ids)
        ]
        for lo in range(0, len(points), _BATCH):
            self.client.upsert(self.collection, points=points[lo : lo + _BATCH], wait=True)

    def delete(self, ids: Sequence[str]) -> None:
        from qdrant_client import models

        self._check_open()
        ids = list(dict.fromkeys(check_ids(ids)))
        unknown = [i for i in ids if i not in self._existing(ids)]
        if unknown:
            raise UnknownIdError(f"{len(unknown)} id(s) not in the index, e.g. {unknown[:5]}; nothing was deleted")
        if ids:
            self.client.delete(
                self.collection, points_selector=models.PointIdsList(points=[point_id(i) for i in ids]), wait=True
            )

    def _search(self, queries: torch.Tensor, budget: Budget, k: int, *, two_stage: bool, candidates: int | None):
        from qdrant_client import models

        if budget.r_c not in self.bounds[1:]:
            raise BudgetError(
                f"the qdrant backend stores prefixes of {self.bounds[1:]} vectors; r_c must be one of them, "
                f"got {budget.r_c}"
            )
        ids, scores, meta = [], [], []
        # queries rounded / quantised as the stored vectors are, like the embedded index scores them
        for q in stored_values(queries[:, : budget.r_q], self.dtype):
            prefetch = None
            if two_stage:
                limit = max(k, candidates or default_candidates(k))
                prefetch = models.Prefetch(query=q[:1].tolist(), using=f"c{self.bounds[1]}", limit=limit)
            hits = self.client.query_points(
                self.collection,
                query=q.tolist(),
                using=f"c{budget.r_c}",
                prefetch=prefetch,
                limit=k,
                with_payload=True,
            ).points
            ids.append([h.payload["id"] for h in hits])
            scores.append([h.score for h in hits])
            meta.append([h.payload.get("metadata") or {} for h in hits])
        width = min((len(s) for s in scores), default=0)
        return SearchResults(
            ids=[row[:width] for row in ids],
            scores=torch.tensor([row[:width] for row in scores], dtype=torch.float32).reshape(len(ids), width),
            metadata=[row[:width] for row in meta],
        )

    def get(self, ids: Sequence[str]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        self._check_open()
        ids = check_ids(ids)
        top = f"c{self.num_vectors}"
        points = self.client.retrieve(
            self.collection, [point_id(i) for i in ids], with_payload=True, with_vectors=[top]
        )
        by_id = {p.payload["id"]: p for p in points}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise UnknownIdError(f"{len(unknown)} id(s) not in the index, e.g. {unknown[:5]}")
        values = torch.tensor([by_id[i].vector[top] for i in ids], dtype=torch.float32)
        return values, [by_id[i].payload.get("metadata") or {} for i in ids]

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and bool(item_id) and item_id in self._existing([item_id])

    def __len__(self) -> int:
        self._check_open()
        return self.client.count(self.collection, exact=True).count

    def stats(self) -> dict[str, Any]:
        count = len(self)
        return {
            "backend": self.backend,
            "path": str(self.path) if self.path else None,
            "collection": self.collection,
            "count": count,
            "dim": self.dim,
            "num_vectors": self.num_vectors,
            "dtype": self.dtype,
            "stored_prefixes": self.bounds[1:],
            "bytes_per_budget": budget_bytes(
                count, self.dim, "fp32", Budget.LADDER, self.num_vectors
            ),  # stored as fp32
        }

    def save(self) -> None:
        """Qdrant persists every acknowledged upsert (``wait=True``); nothing to do."""
        self._check_open()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.close()
