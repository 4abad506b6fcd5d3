"""The ``auto`` budget: a cheap budget for every query, a bigger one only for the queries that need it.

Most queries are easy: the cheap budget already puts one candidate far ahead of the rest. For each query,
:func:`escalate` ranks the candidates at ``cheap``; while the query's **normalised margin** — the score gap
between rank 1 and rank ``margin_rank``, divided by ``r_q`` (a score sums ``r_q`` cosine similarities, so
this is the gap per query vector and reads the same at every budget) — is below ``threshold``, the top
``top_m`` candidates are rescored at the next budget of the ladder, up to ``ceiling``. The final ranking is
the last budget's over the last shortlist.

``threshold = 0`` never escalates (a margin is never negative): the cheap budget's ranking. ``threshold =
inf`` always escalates to the ceiling; with ``top_m`` at least the number of candidates that is the fixed
ceiling budget's ranking. ``metaembed plan calibrate`` fits the threshold on a dev split; the policy is a
small JSON file (:data:`POLICY_FILE`) stored beside an index or a model.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaembed.budget import Budget
from metaembed.errors import BudgetError

AUTO = "auto"
POLICY_FILE = "auto_budget.json"
POLICY_FORMAT = "metaembed-auto-budget"


class AutoBudgetError(BudgetError):
    """An auto-budget policy that is invalid, unreadable, or absent where ``budget="auto"`` needs one."""


class PolicyMissingError(AutoBudgetError):
    """``budget="auto"`` was asked for where no policy is stored (the others: a policy that is there but bad)."""


def is_auto(budget: object) -> bool:
    """True for the string ``"auto"`` (any case) and for an :class:`AutoBudget`."""
    return isinstance(budget, AutoBudget) or (isinstance(budget, str) and budget.strip().lower() == AUTO)


@dataclass(frozen=True)
class AutoBudget:
    """A per-query budget policy: start at ``cheap``, escalate along ``ladder`` up to ``ceiling``.

    ``calibration`` records where the threshold came from (data, target, dev quality and cost); it is
    carried along, never used to decide.
    """

    threshold: float
    cheap: Budget = Budget.LADDER[0]
    ceiling: Budget = Budget.LADDER[-1]
    top_m: int = 16
    margin_rank: int = 2
    ladder: tuple[Budget, ...] = Budget.LADDER
    calibration: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or math.isnan(threshold):
            raise AutoBudgetError(f"threshold must be a number ≥ 0 (inf = always escalate), got {threshold!r}")
        if threshold < 0:
            raise AutoBudgetError(f"threshold must be ≥ 0 (0 = never escalate), got {threshold}")
        for name, low in (("top_m", 1), ("margin_rank", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AutoBudgetError(f"{name} must be an int ≥ {low}, got {value!r}")
        ladder = tuple(Budget.parse(b) for b in self.ladder)
        object.__setattr__(self, "ladder", ladder)
        object.__setattr__(self, "cheap", Budget.parse(self.cheap))
        object.__setattr__(self, "ceiling", Budget.parse(self.ceiling))
        for a, b in itertools.pairwise(ladder):
            if not (a.r_q <= b.r_q and a.r_c <= b.r_c) or a == b:
                raise AutoBudgetError(f"the ladder must grow in both r_q and r_c, but {a} comes before {b}")
        for name in ("cheap", "ceiling"):
            if getattr(self, name) not in ladder:
                allowed = " ".join(str(b) for b in ladder)
                raise AutoBudgetError(f"{name} budget {getattr(self, name)} is not on the ladder ({allowed})")
        if ladder.index(self.cheap) > ladder.index(self.ceiling):
            raise AutoBudgetError(f"the cheap budget {self.cheap} is larger than the ceiling {self.ceiling}")

    def steps(self) -> list[Budget]:
        """The budgets a query may visit, cheap first, ceiling last."""
        return list(self.ladder[self.ladder.index(self.cheap) : self.ladder.index(self.ceiling) + 1])

    def validate(self, num_query_vectors: int, num_candidate_vectors: int) -> AutoBudget:
        """Raise BudgetError unless the ceiling fits embeddings with that many vectors; return self."""
        self.ceiling.validate(num_query_vectors, num_candidate_vectors)
        return self

    def replace(self, **changes: Any) -> AutoBudget:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return AutoBudget(**{**values, **changes})

    # ------------------------------------------------------------------------------------------ json
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": POLICY_FORMAT,
            "threshold": self.threshold if math.isfinite(self.threshold) else "inf",
            "cheap": str(self.cheap),
            "ceiling": str(self.ceiling),
            "top_m": self.top_m,
            "margin_rank": self.margin_rank,
            "ladder": [str(b) for b in self.ladder],
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "auto-budget policy") -> AutoBudget:
        if not isinstance(data, dict) or data.get("format") != POLICY_FORMAT:
            raise AutoBudgetError(f"{where} is not an auto-budget policy (format != {POLICY_FORMAT!r})")
        try:
            threshold = data["threshold"]
            return cls(
                threshold=math.inf if threshold == "inf" else threshold,
                cheap=Budget.parse(data["cheap"]),
                ceiling=Budget.parse(data["ceiling"]),
                top_m=data["top_m"],
                margin_rank=data["margin_rank"],
                ladder=tuple(Budget.parse(b) for b in data["ladder"]),
                calibration=dict(data.get("calibration") or {}),
            )
        except (KeyError, TypeError) as error:
            raise AutoBudgetError(f"{where} is incomplete or malformed: {error!r}") from None

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write :data:`POLICY_FILE` into ``directory`` (a model or index folder), atomically."""
        root = Path(directory)
        if not root.is_dir():
            raise AutoBudgetError(f"cannot store the policy in {root}: not a directory (a model or index folder)")
        target = root / POLICY_FILE
        staging = root / f".{POLICY_FILE}.tmp"
        staging.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(staging, target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AutoBudget:
        """Read a policy from a JSON file, or from :data:`POLICY_FILE` inside a model or index folder."""
        source = Path(path)
        if source.is_dir():
            source = source / POLICY_FILE
        if not source.is_file():
            raise PolicyMissingError(
                f"no auto-budget policy at {source}; calibrate one with `metaembed plan calibrate --save-to DIR`"
            )
        try:
            data = json.loads(source.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AutoBudgetError(f"cannot read the auto-budget policy {source}: {error}") from None
        return cls.from_dict(data, str(source))

    @staticmethod
    def locate(*directories: str | os.PathLike[str] | None) -> Path | None:
        """The policy file of the first of ``directories`` (an index, then a model folder) that has one."""
        for directory in directories:
            if directory is not None and (Path(directory) / POLICY_FILE).is_file():
                return Path(directory) / POLICY_FILE
        return None

    @classmethod
    def find(cls, *directories: str | os.PathLike[str] | None) -> AutoBudget:
        """The policy stored in the first of ``directories`` (an index, then a model folder) that has one."""
        found = cls.locate(*directories)
        if found is not None:
            return cls.load(found)
        where = ", ".join(str(d) for d in directories if d is not None) or "nowhere (no index or model folder known)"
        raise PolicyMissingError(
            f'budget "auto" needs a calibrated policy ({POLICY_FILE}); none in {where}. Run `metaembed plan '
            "calibrate --save-to INDEX_OR_MODEL_DIR`, or pass an AutoBudget"
        )


def normalised_margin(scores: torch.Tensor, budget: Budget, margin_rank: int) -> float:
    """``(s₁ − s_k) / r_q`` over a query's candidate scores, k = ``margin_rank`` (inf with one candidate)."""
    return _margin(scores.topk(min(margin_rank, scores.numel())).values.numpy(), budget, margin_rank)


def _margin(descending: np.ndarray, budget: Budget, margin_rank: int) -> float:
    """The normalised margin from scores sorted best first (at least the first ``margin_rank`` of them).

    The difference is taken in the scores' own dtype (float32 from the index), as the calibration took it."""
    if len(descending) < 2:
        return math.inf
    return float(descending[0] - descending[min(margin_rank, len(descending)) - 1]) / budget.r_q


@dataclass
class Outcome:
    """One query's ``auto`` result: the top rows (best first) at the final budget, and what it cost."""

    rows: torch.Tensor
    scores: torch.Tensor
    budget: Budget
    escalations: int
    bytes_read: int


def levels(
    policy: AutoBudget,
    rows: torch.Tensor,
    scores: torch.Tensor,
    score_rows: Callable[[Budget, torch.Tensor], torch.Tensor],
    item_bytes: Callable[[Budget], int],
    k: int,
    bytes_read: int = 0,
) -> Iterator[tuple[float, Outcome]]:
    """One query's ranking at each budget of the policy's ladder: ``(normalised margin, outcome)`` per level.

    Lazy: the next level is scored only when asked for, so :func:`escalate` stops paying where it stops, and
    calibration walks every level once to learn what any threshold would do.

    Args:
        rows: the candidates scored at ``policy.cheap`` (any id space ``score_rows`` understands), on the CPU.
        scores: their scores at the cheap budget, aligned with ``rows``.
        score_rows: ``score_rows(budget, rows)`` → scores of those rows at that budget, aligned.
        item_bytes: candidate-vector bytes one item costs at a budget (for the bytes-read count).
        k: results wanted; at least ``k`` rows are carried into every rescoring.
        bytes_read: bytes the cheap stage already read.
    """
    steps = policy.steps()
    keep = max(policy.top_m, k)
    # The lists are short (a shortlist, or ~100 candidates), so the bookkeeping runs on numpy views of the
    # tensors: a torch call on a few dozen values costs several microseconds of dispatch, as much as
    # scoring them, and an escalated query makes a dozen such calls. One stable sort per level serves the
    # results, the margin and the next shortlist.
    ids = rows.numpy()
    order = np.arange(len(ids))  # the cheap level ranks the rows as given
    for level, budget in enumerate(steps):
        if level:
            ids = ids[order[:keep]]
            scores = score_rows(budget, torch.from_numpy(ids))
            bytes_read += len(ids) * item_bytes(budget)
        values = scores.detach().numpy()
        order = np.argsort(-values, kind="stable")  # descending; equal scores keep their order, as torch's
        ranked = values[order]
        outcome = Outcome(torch.from_numpy(ids[order[:k]]), torch.from_numpy(ranked[:k]), budget, level, bytes_read)
        last = level + 1 == len(steps)
        yield (math.inf if last else _margin(ranked, budget, policy.margin_rank)), outcome


def escalate(policy: AutoBudget, *args: Any, **kwargs: Any) -> Outcome:
    """Run the policy for one query from its cheap-budget ranking (arguments as :func:`levels`): stop at the
    first level whose margin reaches the threshold, or at the ceiling."""
    for margin, outcome in levels(policy, *args, **kwargs):
        if margin >= policy.threshold:
            return outcome
    raise AssertionError("unreachable: the last level's margin is inf")
