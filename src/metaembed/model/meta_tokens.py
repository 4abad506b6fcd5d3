"""Meta Tokens: which learnable rows an input carries, and which output positions are read back.

One ``nn.Embedding(R_q + R_c, hidden)`` holds both sets (rows ``[0, R_q)`` = M_q, ``[R_q, R_q + R_c)`` =
M_c). They are appended after the content; with left padding they are the last positions of every row,
so the read-out is a fixed slice of the sequence end — no masks, no gathers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Side = Literal["query", "candidate"]
SIDES = ("query", "candidate")


@dataclass(frozen=True)
class MetaSlots:
    """``rows``: embedding rows appended (in order); ``readout``: which of those positions become the output."""

    rows: range
    readout: slice

    @property
    def count(self) -> int:
        return len(self.rows)


def meta_slots(side: Side, layout: str, num_query_tokens: int, num_candidate_tokens: int) -> MetaSlots:
    """The Meta-Token rows for one side under a layout ("reference" or "own")."""
    total = num_query_tokens + num_candidate_tokens
    if side not in SIDES:
        raise ValueError(f"side must be 'query' or 'candidate', got {side!r}")
    if layout == "reference":  # every input carries [M_q, M_c]; each side reads its own block
        own = slice(0, num_query_tokens) if side == "query" else slice(num_query_tokens, total)
        return MetaSlots(rows=range(total), readout=own)
    if layout == "own":  # an input carries only its side's tokens, and reads all of them
        rows = range(num_query_tokens) if side == "query" else range(num_query_tokens, total)
        return MetaSlots(rows=rows, readout=slice(0, len(rows)))
    raise ValueError(f"unknown meta layout {layout!r}; choose 'reference' or 'own'")
