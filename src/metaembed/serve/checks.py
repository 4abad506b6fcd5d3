"""Checks of request values the schemas cannot express: budgets against this model, ids and metadata.

Ids and metadata pass the index's own checks (:mod:`metaembed.index.validate`) plus the service's limits on size,
so a request is refused (400 / 413) before its items are encoded, by the same rules the index would apply.
"""

from __future__ import annotations

import json
from typing import Any

from metaembed.budget import Budget
from metaembed.errors import BudgetError, InputError
from metaembed.index import validate
from metaembed.serve.errors import BadRequestError, PayloadTooLargeError

MAX_ID_CHARS = 512
MAX_METADATA_DEPTH = 32  # nesting levels of one metadata object (responses must serialise it back)
MAX_METADATA_BYTES = 65_536  # one metadata object as JSON


def search_budget(spec, n_query: int, n_candidate: int) -> Budget:
    """The budget a search asked for (the model's full budget when none); the int N is NxN, as everywhere."""
    if spec is None:
        return Budget(n_query, n_candidate)
    return Budget.parse(spec).validate(n_query, n_candidate)


def side_vectors(spec, side: str, n_query: int, n_candidate: int) -> int:
    """How many of a ``side`` item's vectors an embeddings request keeps (an int budget counts that side's)."""
    available = n_query if side == "query" else n_candidate
    if spec is None:
        return available
    if isinstance(spec, int):
        if not 1 <= spec <= available:
            raise BudgetError(f"budget {spec}: a {side} has {available} vectors; allowed 1 ≤ budget ≤ {available}")
        return spec
    budget = Budget.parse(spec).validate(n_query, n_candidate)
    return budget.r_q if side == "query" else budget.r_c


def check_ids(ids: list[str]) -> list[str]:
    """The index's rules (non-empty, valid Unicode, no repeats) plus the service's length limit; 400 if broken."""
    try:
        ids = validate.check_ids(ids)
        for i, item_id in enumerate(ids):
            if len(item_id) > MAX_ID_CHARS:
                raise BadRequestError(f"ids[{i}]: an id has 1 to {MAX_ID_CHARS} characters", "ids")
        validate.check_unique(ids)  # a repeat inside one request is a bad request (400), not a conflict (409)
    except InputError as error:
        raise BadRequestError(str(error), "ids") from None
    return ids


def check_metadata(metadata: list[dict | None] | None) -> list[dict | None] | None:
    """The index's rules (storable JSON objects) plus the service's nesting and size limits."""
    if metadata is None:
        return None
    for i, entry in enumerate(metadata):
        depth = 0 if entry is None else _depth(entry)
        if depth > MAX_METADATA_DEPTH:  # checked first: serialising a deeper value could exhaust the stack
            raise BadRequestError(
                f"metadata[{i}] is nested {depth} levels deep; at most {MAX_METADATA_DEPTH}", "metadata"
            )
    try:
        metadata = validate.check_metadata(metadata)
    except InputError as error:
        raise BadRequestError(str(error), "metadata") from None
    for i, entry in enumerate(metadata):
        size = 0 if entry is None else len(json.dumps(entry, ensure_ascii=False).encode("utf-8"))
        if size > MAX_METADATA_BYTES:
            raise PayloadTooLargeError(
                f"metadata[{i}] is {size:,} bytes as JSON; at most {MAX_METADATA_BYTES:,}", "metadata"
            )
    return metadata


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level + 1)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest
