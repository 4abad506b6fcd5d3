"""Retrieval budgets: how many query and candidate vectors take part in MaxSim.

A budget ``(r_q, r_c)`` selects the first ``r_q`` query vectors and the first ``r_c`` candidate
vectors. Matryoshka Multi-Vector Retrieval training makes every such prefix useful, so the budget is
a serve-time knob: encoding cost does not depend on it, index bytes and scoring FLOPs do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from metaembed.errors import BudgetError

_BUDGET_PATTERN = re.compile(r"^\s*\(?\s*(\d+)\s*[x×,]\s*(\d+)\s*\)?\s*$", re.IGNORECASE)
_SQUARE_PATTERN = re.compile(r"^\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Budget:
    """A pair of prefix lengths ``(r_q, r_c)``; both at least 1.

    >>> Budget.parse("16x64")
    Budget(r_q=16, r_c=64)
    >>> Budget(4, 8).flops(n_candidates=1000, dim=128)
    8192000
    """

    r_q: int
    r_c: int

    LADDER: ClassVar[tuple[Budget, ...]]
    """The paper's five budgets, smallest first: (1,1), (2,4), (4,8), (8,16), (16,64)."""

    def __post_init__(self) -> None:
        for name in ("r_q", "r_c"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise BudgetError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise BudgetError(f"{name} must be at least 1, got {value}")

    @classmethod
    def parse(cls, spec: str | int | tuple[int, int] | Budget) -> Budget:
        """Read ``"16x64"``, ``"16,64"``, ``"(16, 64)"``, a tuple ``(16, 64)`` or a Budget.

        One number — the int ``8`` or the string ``"8"`` — is ``8x8``: that many vectors on each side (so
        ``/v1/embeddings`` with ``budget: 8`` returns 8 vectors of either side, and a search uses 8 of each).
        """
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls(spec, spec)
        if isinstance(spec, str) and (square := _SQUARE_PATTERN.match(spec)):
            return cls(int(square.group(1)), int(square.group(1)))
        if isinstance(spec, tuple | list):
            if len(spec) != 2:
                raise BudgetError(f"a budget tuple has two entries (r_q, r_c), got {spec!r}")
            return cls(*spec)
        if not isinstance(spec, str):
            raise BudgetError(f"cannot read a budget from {type(spec).__name__} {spec!r}")
        match = _BUDGET_PATTERN.match(spec)
        if match is None:
            raise BudgetError(
                f"cannot read budget {spec!r}: write it as 'R_QxR_C' or 'R_Q,R_C', e.g. '16x64', or N for NxN"
            )
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def parse_many(cls, spec: str | None) -> list[Budget]:
        """Read a space- or semicolon-separated list (``"1x1 4x8 16x64"``); ``None`` or "ladder" gives the ladder."""
        if spec is None or spec.strip().lower() in ("", "ladder", "all"):
            return list(cls.LADDER)
        return [cls.parse(part) for part in re.split(r"[\s;]+", spec.strip()) if part]

    def validate(self, num_query_vectors: int, num_candidate_vectors: int) -> Budget:
        """Raise BudgetError unless this budget fits embeddings with that many vectors; return self."""
        if self.r_q > num_query_vectors or self.r_c > num_candidate_vectors:
            raise BudgetError(
                f"budget {self} needs {self.r_q} query and {self.r_c} candidate vectors, but only "
                f"{num_query_vectors} query and {num_candidate_vectors} candidate vectors exist; "
                f"allowed: 1 ≤ r_q ≤ {num_query_vectors}, 1 ≤ r_c ≤ {num_candidate_vectors}"
            )
        return self

    def flops(self, n_candidates: int, dim: int) -> int:
        """Multiply-add FLOPs to score one query against ``n_candidates``: 2·N·r_q·r_c·D."""
        return 2 * n_candidates * self.r_q * self.r_c * dim

    def index_bytes(self, n_candidates: int, dim: int, bytes_per_value: float) -> int:
        """Bytes of candidate vectors this budget reads: N·r_c·D·bytes_per_value."""
        return int(n_candidates * self.r_c * dim * bytes_per_value)

    def __str__(self) -> str:
        return f"{self.r_q}x{self.r_c}"


Budget.LADDER = (Budget(1, 1), Budget(2, 4), Budget(4, 8), Budget(8, 16), Budget(16, 64))
