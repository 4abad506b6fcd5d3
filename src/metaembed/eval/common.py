"""What both runners share: the encoder protocol, budget selection, data-source helpers, fingerprints."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from metaembed.budget import Budget
from metaembed.cache import cache_dir
from metaembed.errors import BudgetError, InputError, MetaEmbedError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class EvalDataError(MetaEmbedError, ValueError):
    """Evaluation data that is missing, unreadable, or not in the expected schema."""


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


def is_hub_id(source: str | os.PathLike) -> bool:
    """True for ``owner/name`` that is not an existing local path."""
    text = str(source)
    return not Path(text).exists() and bool(HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def hub_revision(repo_id: str) -> str | None:
    """The commit sha of a hub dataset (what the loaders fetched)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(repo_id).sha
    except Exception as error:  # offline, unknown repo, gated: the hub client raises many types
        raise EvalDataError(
            f"{repo_id!r} is not a local folder, and the hub could not serve it as a dataset: {error}"
        ) from error


def extract_zip(archive: Path) -> Path:
    """Extract an image archive once into the cache (keyed by path, size and mtime) and return the folder.

    Extraction goes to a temporary folder that is renamed into place, so an interrupted run leaves no
    half-extracted cache behind.
    """
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "images" / f"{archive.stem}-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(staging)
        staging.rename(target)
    except zipfile.BadZipFile as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise EvalDataError(f"{archive} is not a readable zip archive: {error}") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def image_root_for(sample: Sequence[str], root: Path) -> Path:
    """``root``, or its one sub-folder holding the images (archives often wrap them in a top folder)."""
    probes = [p for p in sample if p][:20]
    if not probes or any((root / p).is_file() for p in probes):
        return root
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if any((child / p).is_file() for p in probes):
            return child
    return root


def read_records(path: Path) -> list[dict]:
    """Rows of a ``.jsonl`` file, a ``.parquet`` file, or every parquet file of a folder (sorted)."""
    import json

    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
        tests = [f for f in files if f.name.startswith("test")]
        files = tests or files
        if not files:
            raise EvalDataError(f"{path} holds no .parquet files")
        return [row for file in files for row in read_records(file)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as error:  # pyarrow raises several types for corrupt files
            raise EvalDataError(f"cannot read parquet file {path}: {error}") from error
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as stream:
            for number, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise EvalDataError(f"{path}:{number}: not valid JSON: {error}") from error
                if not isinstance(row, dict):
                    raise EvalDataError(f"{path}:{number}: a record must be a JSON object")
                rows.append(row)
        return rows
    raise EvalDataError(f"cannot read {path}: expected a .jsonl or .parquet file or a folder of parquet files")


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
