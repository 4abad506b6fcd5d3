"""The one evaluation skeleton: load → encode once → score every budget → report, with resume.

MMEB, ViDoRe and test-split index retrieval differ only in what a task's items are, how its encoded
queries and candidates are scored, and how tasks are grouped; each supplies a :class:`TaskFamily`.
Everything else lives here: budget selection (checked before any encoding), the model description, the
per-task resume store, one encoding pass per task with all vectors, result rows and group means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from metaembed.budget import Budget
from metaembed.data.records import decode_image
from metaembed.errors import DataError
from metaembed.eval.common import ResumeStore, check_encoded, describe_model, run_or_reuse, select_budgets
from metaembed.eval.report import EvalResult, machine_state, mean


class Task(Protocol):
    """What the skeleton reads from a loaded task: its name and where it came from (the resume key)."""

    name: str
    source: str
    revision: str | None


@dataclass
class TaskSummary:
    """A scored task as the report needs it: measures per budget, the embedding dimension, its description
    row for ``datasets`` and its encode counts (added up over tasks; empty when a family does not count)."""

    values: dict[str, dict[str, float]]  # budget -> metric -> value
    dim: int
    described: dict
    encodes: dict[str, int] = field(default_factory=dict)


class TaskFamily:
    """What one kind of benchmark supplies; the skeleton (:func:`run`) does the rest.

    ``score`` returns a JSON-able payload (what the resume store keeps, so its format is the family's
    stored format); ``summarize`` turns a payload, fresh or reused, into a :class:`TaskSummary`.
    """

    benchmark: ClassVar[str]
    main_metric: ClassVar[str]
    measures: ClassVar[tuple[str, ...]]  # the metrics averaged into group means
    noun: ClassVar[str] = "task"  # what error messages call a task
    # Items per encode call, or None for one call per side. Pages stored as encoded bytes are decoded one
    # chunk at a time, so a corpus of page images is never held decoded in memory at once.
    encode_chunk: ClassVar[int | None] = None

    def items(self, task: Any) -> tuple[list[dict], list[dict]]:
        """The model items to encode once: ``(queries, candidates)``."""
        raise NotImplementedError

    def score(self, task: Any, queries: torch.Tensor, candidates: torch.Tensor, budgets: Sequence[Budget]) -> dict:
        raise NotImplementedError

    def summarize(self, task: Any, payload: dict, budgets: Sequence[Budget]) -> TaskSummary:
        raise NotImplementedError

    def groups(self, described: Sequence[dict]) -> dict[str, list[str]]:
        """Group name → member task names (plain means over members); every family has ``overall``."""
        return {"overall": [d["name"] for d in described]}

    def result_fields(self) -> dict:
        """Extra :class:`EvalResult` fields (e.g. ``bytes_per_value``)."""
        return {}


def run(
    family: TaskFamily,
    encoder: Any,
    tasks: Sequence[Any],
    budgets: Sequence[Budget | str] | None = None,
    *,
    batch_size: int = 8,
    model_name: str | None = None,
    progress: Callable[[str], None] | None = None,
    resume_dir: str | Path | None = None,
) -> EvalResult:
    """Score every task at every budget from one encoding pass per task and report it.

    With ``resume_dir`` each finished task is saved there and a rerun with the same model, budgets and
    data reuses it (see :class:`~metaembed.eval.common.ResumeStore`).
    """
    machine_before = machine_state()
    chosen = select_budgets(encoder, budgets)
    budget_names = [str(b) for b in chosen]
    model_info = describe_model(encoder, model_name)
    store = ResumeStore(resume_dir, family.benchmark, model_info, budget_names) if resume_dir else None
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise DataError(f"{family.noun} names repeat: {names}")
    per_task: dict[str, dict[str, dict[str, float]]] = {}
    scores: list[dict] = []
    described: list[dict] = []
    encodes: dict[str, int] = {}
    dim = 0
    for task in tasks:

        def compute(task=task) -> dict:
            queries, candidates = family.items(task)
            if progress:
                progress(f"{task.name}: encoding {len(queries)} queries and {len(candidates)} candidates once")
            chunk = family.encode_chunk
            q = encode_items(encoder.encode_queries, queries, "query", chosen, batch_size, chunk)
            c = encode_items(encoder.encode_candidates, candidates, "candidate", chosen, batch_size, chunk)
            if q.shape[2] != c.shape[2]:
                raise DataError(f"query vectors have D = {q.shape[2]} but candidate vectors D = {c.shape[2]}")
            return family.score(task, q, c, chosen)

        summary = family.summarize(task, run_or_reuse(store, task.name, task.source, task.revision, compute, progress),
                                   chosen)  # fmt: skip
        per_task[task.name] = summary.values
        for budget, values in summary.values.items():
            scores += [dict(task=task.name, budget=budget, metric=m, value=v) for m, v in values.items()]
        described.append(summary.described)
        for key, count in summary.encodes.items():
            encodes[key] = encodes.get(key, 0) + count
        dim = summary.dim
    groups = [
        dict(group=group, budget=budget, metric=metric, value=mean([per_task[m][budget][metric] for m in members]),
             num_tasks=len(members))
        for group, members in family.groups(described).items()
        for budget in budget_names
        for metric in family.measures
    ]  # fmt: skip
    return EvalResult(
        benchmark=family.benchmark,
        model=model_info,
        main_metric=family.main_metric,
        budgets=budget_names,
        embedding_dim=int(dim),
        datasets=described,
        scores=scores,
        groups=groups,
        encodes=encodes,
        machine_before=machine_before,
        machine_after=machine_state(),
        **family.result_fields(),
    )


def encode_items(
    encode: Callable,
    items: Sequence[dict],
    side: str,
    budgets: Sequence[Budget],
    batch_size: int,
    chunk: int | None = None,
) -> torch.Tensor:
    """Embeddings ``(len(items), R, D)`` of one side, ``chunk`` items per call (all at once for None), checked
    against the budgets. Images given as encoded bytes are decoded only for their chunk."""
    step = chunk or max(len(items), 1)
    parts = []
    for start in range(0, len(items), step):
        batch = [{"text": i["text"], "image": _decoded(i["image"])} for i in items[start : start + step]]
        parts.append(encode(batch, batch_size=batch_size))
    return check_encoded(parts[0] if len(parts) == 1 else torch.cat(parts), len(items), side, budgets)


def _decoded(ref: Any) -> Any:
    return decode_image(ref, "page image") if isinstance(ref, bytes) else ref


def scoring_device(encoder: Any, device: torch.device | str | None) -> torch.device | None:
    """``device``, else where the model runs (a GPU scores much faster); None: where the embeddings are."""
    if device is not None:
        return torch.device(device)
    model_device = getattr(encoder, "device", None)
    return model_device if isinstance(model_device, torch.device) else None
