"""The index protocol every backend (embedded store, Qdrant) implements, plus its result type and errors.

An index stores items: a user string id, a dense ``(R_c, D)`` multi-vector embedding and an optional JSON
metadata dict. ``search`` scores queries ``(nq, R_q, D)`` at a budget ``(r_q, r_c)`` with exact MaxSim
(or a two-stage cascade: coarse candidates from the (1,1) vectors, exact rerank at the budget) and
returns the top ``k`` ids, scores and metadata per query, best first.

Code against :class:`Index` (a ``typing.Protocol``) and open indexes with
``metaembed.index.create_index`` / ``metaembed.index.open_index``. Every write is atomic and durable
when it returns: bad input raises before anything is written, and a crash mid-write leaves the index as
it was before the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from metaembed.auto_budget import is_auto
from metaembed.budget import Budget
from metaembed.errors import InputError, MetaEmbedError
from metaembed.scoring import check_embeddings

DType = Literal["fp32", "bf16", "int8"]
DTYPES: tuple[str, ...] = ("fp32", "bf16", "int8")
BYTES_PER_VALUE: dict[str, int] = {"fp32": 4, "bf16": 2, "int8": 1}
"""Bytes per stored value; int8 adds a 4-byte fp32 scale per vector (see ``stats()['bytes_per_budget']``)."""

BudgetLike = Budget | str | tuple[int, int]


# ---------------------------------------------------------------- errors


class IndexStoreError(MetaEmbedError):
    """Base class of every error an index raises (``except IndexStoreError`` catches them all)."""


class IndexFormatError(IndexStoreError, ValueError):
    """A path that is not a metaembed index, or whose files are truncated, corrupt or of an unknown version."""


class IndexNotFoundError(IndexStoreError, FileNotFoundError):
    """``open_index`` on a path that holds no index."""


class IndexExistsError(IndexStoreError, FileExistsError):
    """``create_index`` on a path that already holds an index (open it instead)."""


class IndexLockedError(IndexStoreError, RuntimeError):
    """A second writer: only one process may write an index at a time (readers are unlimited)."""


class ReadOnlyIndexError(IndexStoreError, PermissionError):
    """A write on an index opened with ``read_only=True``, or a writer on a read-only filesystem."""


class IndexStorageError(IndexStoreError, OSError):
    """The filesystem refused a read or write of the index's files: disk full, permission denied, I/O error.

    ``errno`` is the operating system's error number (``errno.ENOSPC`` for a full disk).
    """


class DuplicateIdError(IndexStoreError, InputError):
    """An ``add`` whose ids repeat within the call or already exist in the index (use ``upsert`` to replace)."""


class UnknownIdError(IndexStoreError, InputError):
    """A ``delete`` (or lookup) naming ids the index does not hold; nothing is deleted."""


# ---------------------------------------------------------------- results


@dataclass
class SearchResults:
    """Top-k results per query, best first.

    ``k' = min(k, len(index))`` (two-stage search may return fewer when the coarse stage finds fewer
    candidates). ``scores[i, j]`` is the MaxSim score of ``ids[i][j]`` at the search budget.
    """

    ids: list[list[str]]
    scores: torch.Tensor  # (nq, k') float32
    metadata: list[list[dict[str, Any]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------- protocol


@runtime_checkable
class Index(Protocol):
    """What the service, the CLI and the evaluators code against. Backends: ``embedded`` (default), ``qdrant``."""

    dim: int
    """D, the embedding width."""
    num_vectors: int
    """R_c, vectors stored per item (the largest candidate budget the index can serve)."""
    dtype: str
    """Storage dtype: "fp32", "bf16" or "int8" (per-vector fp32 scale)."""

    def add(
        self, ids: Sequence[str], embeddings: torch.Tensor, metadata: Sequence[dict[str, Any]] | None = None
    ) -> None:
        """Store new items. ``embeddings`` is ``(N, R_c, D)`` floating with R_c = ``num_vectors`` and D = ``dim``.

        Raises DuplicateIdError if an id repeats in the call or already exists; ShapeError on wrong R or D;
        InputError on empty/invalid ids or non-JSON metadata. Nothing is stored when it raises.
        """
        ...

    def upsert(
        self, ids: Sequence[str], embeddings: torch.Tensor, metadata: Sequence[dict[str, Any]] | None = None
    ) -> None:
        """Like ``add``, but ids that exist are replaced (atomically with the insert)."""
        ...

    def delete(self, ids: Sequence[str]) -> None:
        """Remove items. Raises UnknownIdError (nothing deleted) if any id is not in the index."""
        ...

    def search(
        self,
        queries: torch.Tensor,
        budget: BudgetLike,
        k: int = 10,
        *,
        two_stage: bool = False,
        candidates: int | None = None,
    ) -> SearchResults:
        """Top-``k`` items per query by MaxSim at ``budget``. ``queries`` is ``(nq, R_q, D)``.

        ``two_stage=True`` takes ``candidates`` coarse hits per query from the (1,1) vectors with an ANN
        index, then reranks them exactly at ``budget``. Raises BudgetError if ``budget.r_c > num_vectors``
        or ``budget.r_q > R_q``.
        """
        ...

    def get(self, ids: Sequence[str]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Stored embeddings ``(n, R_c, D)`` (float32, dequantised) and metadata of ``ids``."""
        ...

    def __contains__(self, item_id: object) -> bool: ...

    def __len__(self) -> int:
        """Number of live (not deleted) items."""
        ...

    def stats(self) -> dict[str, Any]:
        """``count``, ``dim``, ``num_vectors``, ``dtype``, ``backend``, ``bytes_on_disk`` and ``bytes_per_budget``
        (a dict ``"r_qxr_c" -> bytes of candidate vectors that budget reads``, over the ladder budgets that fit)."""
        ...

    def save(self) -> None:
        """Make everything durable. Writes are already durable when they return; this is a no-op flush point."""
        ...

    def close(self) -> None:
        """Release files and locks. The index object must not be used afterwards."""
        ...

    def __enter__(self) -> Index: ...

    def __exit__(self, *exc: object) -> None: ...


class IndexBase:
    """What every backend shares: ``search`` checks its arguments once, then calls the backend's ``_search``.

    A backend sets ``dim``, ``num_vectors`` and ``dtype`` and implements ``_check_open`` and ``_search``
    (queries already checked, detached and on the CPU; ``budget`` parsed and within the index's and the
    queries' vectors). One that runs ``budget="auto"`` sets ``runs_auto`` and implements ``_search_auto``.
    """

    backend = ""
    runs_auto = False
    dim: int
    num_vectors: int
    dtype: str

    def search(
        self,
        queries: torch.Tensor,
        budget: BudgetLike,
        k: int = 10,
        *,
        two_stage: bool = False,
        candidates: int | None = None,
    ) -> SearchResults:
        """Top-``k`` items per query by MaxSim at ``budget`` (see :meth:`Index.search`)."""
        self._check_open()
        if self.runs_auto and is_auto(budget):  # "auto" or an AutoBudget: its own checks, per escalation step
            return self._search_auto(queries, budget, k, two_stage=two_stage, candidates=candidates)
        budget = check_search(
            queries, budget, k, dim=self.dim, num_vectors=self.num_vectors, two_stage=two_stage, candidates=candidates
        )
        return self._search(queries.detach().cpu(), budget, k, two_stage=two_stage, candidates=candidates)

    def _check_open(self) -> None:
        raise NotImplementedError

    def _search(
        self, queries: torch.Tensor, budget: Budget, k: int, *, two_stage: bool, candidates: int | None
    ) -> SearchResults:
        raise NotImplementedError

    def _search_auto(self, queries: torch.Tensor, budget: Any, k: int, *, two_stage: bool, candidates: int | None):
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


def budget_bytes(n_items: int, dim: int, dtype: str, budgets: Sequence[Budget], num_vectors: int) -> dict[str, int]:
    """Bytes of candidate vectors each budget reads (int8 includes its 4-byte per-vector scales)."""
    out: dict[str, int] = {}
    for budget in budgets:
        if budget.r_c > num_vectors:
            continue
        per_vector = dim * BYTES_PER_VALUE[dtype] + (4 if dtype == "int8" else 0)
        out[str(budget)] = n_items * budget.r_c * per_vector
    return out


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise InputError(f"unknown index dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return dtype


def check_search(
    queries: torch.Tensor,
    budget: BudgetLike,
    k: int,
    *,
    dim: int,
    num_vectors: int,
    two_stage: bool,
    candidates: int | None,
) -> Budget:
    """The checks every backend's ``search`` starts with; returns the parsed budget."""
    check_embeddings(queries, "queries", dim=dim)
    if not torch.isfinite(queries).all():
        raise InputError("queries contain NaN or infinite values")
    budget = Budget.parse(budget).validate(queries.shape[1], num_vectors)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive int, got {k!r}")
    if candidates is not None and not two_stage:
        raise InputError("candidates= applies only to two_stage=True searches")
    return budget
