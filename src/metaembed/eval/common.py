"""What every runner shares: the encoder protocol, budget selection, model and data fingerprints, resume."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from metaembed.budget import Budget
from metaembed.errors import BudgetError, DataError, InputError


@runtime_checkable
class Encoder(Protocol):
    """What a runner needs from a model: ``(n, R, D)`` embeddings for queries and candidates.

    :class:`metaembed.MetaEmbedModel` is one; a test can pass any object with these two methods.
    Items are dicts ``{"text": str | None, "image": path | None}``.
    """

    def encode_queries(self, items: Sequence[Any], *, batch_size: int = ...) -> torch.Tensor: ...

    def encode_candidates(self, items: Sequence[Any], *, batch_size: int = ...) -> torch.Tensor: ...


def select_budgets(encoder: Any, budgets: Sequence[Budget | str] | None) -> list[Budget]:
    """Parse the budgets; ``None`` gives every ladder budget the encoder's vector counts allow.

    An encoder that reports ``num_vectors(side)`` (MetaEmbedModel does) is checked before any
    encoding, so a budget that cannot fit fails at once instead of after hours of encoding.
    """
    counts = _vector_counts(encoder)
    if budgets is None:
        if counts is None:
            return list(Budget.LADDER)
        chosen = [b for b in Budget.LADDER if b.r_q <= counts[0] and b.r_c <= counts[1]]
        return chosen or [Budget(1, 1)]
    parsed = sorted({Budget.parse(b) for b in budgets}, key=lambda b: (b.r_c, b.r_q))
    if not parsed:
        raise BudgetError("no budget given; pass at least one, e.g. '16x64', or leave it out for the ladder")
    if counts is not None:
        for budget in parsed:
            budget.validate(*counts)
    return parsed


def check_encoded(embeddings: torch.Tensor, n: int, side: str, budgets: Sequence[Budget]) -> torch.Tensor:
    """The encoder's output as a float ``(n, R, D)`` tensor, with every budget's prefix available."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 3 or embeddings.shape[0] != n:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise InputError(f"the encoder returned {shape} for {n} {side} items; expected a ({n}, R, D) tensor")
    need = max((b.r_q if side == "query" else b.r_c) for b in budgets)
    if embeddings.shape[1] < need:
        raise BudgetError(
            f"the encoder returned {embeddings.shape[1]} {side} vectors per item but the budgets need {need}"
        )
    return embeddings if embeddings.is_floating_point() else embeddings.float()


def _vector_counts(encoder: Any) -> tuple[int, int] | None:
    counter = getattr(encoder, "num_vectors", None)
    if callable(counter):
        return int(counter("query")), int(counter("candidate"))
    return None


def describe_model(encoder: Any, name: str | None = None) -> dict:
    """A small JSON-able description of the model for the result file."""
    info: dict[str, Any] = {"name": name or type(encoder).__name__}
    config = getattr(encoder, "config", None)
    if config is not None and hasattr(config, "backbone_family"):
        info.update(
            backbone_family=config.backbone_family,
            num_query_tokens=config.num_query_tokens,
            num_candidate_tokens=config.num_candidate_tokens,
        )
    if name and Path(name).is_dir():
        info["path"] = str(Path(name).resolve())
        info["fingerprint"] = fingerprint(sorted(Path(name).glob("*.safetensors")))
    return info


def fingerprint(paths: Sequence[Path]) -> str | None:
    """A short sha256 over the bytes of local files: the "revision" of local data or weights."""
    if not paths:
        return None
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def hub_revision(repo_id: str) -> str | None:
    """The commit sha of a hub dataset (what the loaders fetched)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(repo_id).sha
    except Exception as error:  # offline, unknown repo, gated: the hub client raises many types
        raise DataError(
            f"{repo_id!r} is not a local folder, and the hub could not serve it as a dataset: {error}"
        ) from error


class ResumeStore:
    """Per-task results saved as each task finishes; a rerun with the same model, budgets and data reuses them.

    MMEB's 36 datasets take hours on a 7B model: an interrupted run restarts at the first unfinished
    dataset. A stored task is reused only when the model description (name, path, weight fingerprint),
    the budgets, the data source and the data revision all match; tasks without a revision are never reused.
    """

    def __init__(self, directory: str | Path, benchmark: str, model: dict, budgets: Sequence[str]) -> None:
        self.directory = Path(directory)
        self.identity = {"benchmark": benchmark, "model": model, "budgets": list(budgets)}

    def _path(self, name: str) -> Path:
        safe = re.sub(r"[^\w.-]", "_", name)
        return self.directory / f"{safe}.json"

    def load(self, name: str, source: str, revision: str | None) -> dict | None:
        import json

        path = self._path(name)
        if revision is None or not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # a partial file from a killed run: recompute this task
        key = {**self.identity, "task": name, "source": source, "revision": revision}
        return stored.get("payload") if stored.get("key") == key else None

    def save(self, name: str, source: str, revision: str | None, payload: dict) -> None:
        from metaembed.eval.report import write_json_atomic

        if revision is not None:
            key = {**self.identity, "task": name, "source": source, "revision": revision}
            write_json_atomic(self._path(name), {"key": key, "payload": payload})


def run_or_reuse(
    store: ResumeStore | None,
    name: str,
    source: str,
    revision: str | None,
    compute: Callable[[], dict],
    progress: Callable[[str], None] | None = None,
) -> dict:
    """A task's stored payload when the store holds a matching one, else ``compute()`` (then stored)."""
    stored = store.load(name, source, revision) if store else None
    if stored is not None:
        if progress:
            progress(f"{name}: reusing the stored result from {store.directory}")
        return stored
    payload = compute()
    if store:
        store.save(name, source, revision, payload)
    return payload
