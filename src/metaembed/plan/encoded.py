"""MMEB-style tasks encoded once and kept: every distinct query and candidate with all its vectors.

Calibrating the ``auto`` budget and checking it need the same embeddings many times (a threshold sweep on
dev, then the test split); encoding is the slow part, so the tensors are stored as safetensors under
``cache_dir()/encodings``, keyed by the model's weight fingerprint and the task file's revision, and reused
only when both match.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metaembed.budget import Budget
from metaembed.cache import cache_dir


@dataclass
class EncodedTask:
    """One task's embeddings: ``queries[query_of[i]]`` is record i's query, ``candidate_lists[i]`` its
    candidates (indices into ``candidates``, the gold first, repeats removed as in the MMEB runner)."""

    name: str
    queries: torch.Tensor  # (distinct queries, R_q, D) float32
    candidates: torch.Tensor  # (distinct candidates, R_c, D) float32
    query_of: torch.Tensor  # (records,) long
    candidate_lists: list[torch.Tensor]  # per record, long

    def __len__(self) -> int:
        return len(self.candidate_lists)


def _cache_path(model_fingerprint: str, name: str, revision: str) -> Path:
    safe = re.sub(r"[^\w.-]", "_", f"{name}-{revision}")
    return cache_dir() / "encodings" / re.sub(r"[^\w.-]", "_", model_fingerprint) / f"{safe}.safetensors"


def _save(path: Path, task: EncodedTask) -> None:
    from safetensors.torch import save_file

    lengths = torch.tensor([len(c) for c in task.candidate_lists], dtype=torch.long)
    flat = torch.cat(task.candidate_lists) if task.candidate_lists else torch.empty(0, dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    tensors = {
        "queries": task.queries,
        "candidates": task.candidates,
        "query_of": task.query_of,
        "lengths": lengths,
        "flat": flat,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging))
    staging.replace(path)


def _load(path: Path, name: str) -> EncodedTask | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError):
        return None  # absent or a partial file from a killed run: encode again
    lists = list(torch.split(tensors["flat"], tensors["lengths"].tolist()))
    return EncodedTask(name, tensors["queries"], tensors["candidates"], tensors["query_of"], lists)


def encode_tasks(
    encoder: Any,
    datasets: Sequence[Any],
    *,
    model_fingerprint: str | None,
    batch_size: int = 32,
    progress: Callable[[str], None] | None = None,
) -> list[EncodedTask]:
    """Encode MMEB datasets (:class:`metaembed.eval.mmeb.MMEBDataset`) with all vectors, reusing the cache.

    ``model_fingerprint`` None (a model without weight files, e.g. in tests) disables the cache.
    """
    from metaembed.eval.mmeb import encode_keys

    full = [Budget(encoder.num_vectors("query"), encoder.num_vectors("candidate"))]
    out = []
    for dataset in datasets:
        path = None
        if model_fingerprint and dataset.revision:
            path = _cache_path(model_fingerprint, dataset.name, dataset.revision)
            cached = _load(path, dataset.name) if path.is_file() else None
            if cached is not None:
                if progress:
                    progress(f"{dataset.name}: reusing the embeddings in {path}")
                out.append(cached)
                continue
        query_keys = list(dict.fromkeys(dataset.queries))
        candidate_keys = list(dict.fromkeys(k for c in dataset.candidates for k in c))
        if progress:
            progress(f"{dataset.name}: encoding {len(query_keys)} queries and {len(candidate_keys)} candidates")
        with torch.no_grad():
            q = encode_keys(encoder, query_keys, dataset.image_root, "query", full, batch_size)
            c = encode_keys(encoder, candidate_keys, dataset.image_root, "candidate", full, batch_size)
        q_index = {k: i for i, k in enumerate(query_keys)}
        c_index = {k: i for i, k in enumerate(candidate_keys)}
        task = EncodedTask(
            name=dataset.name,
            queries=q.detach().float().cpu(),
            candidates=c.detach().float().cpu(),
            query_of=torch.tensor([q_index[k] for k in dataset.queries], dtype=torch.long),
            candidate_lists=[torch.tensor([c_index[k] for k in keys], dtype=torch.long) for keys in dataset.candidates],
        )
        if path is not None:
            _save(path, task)
        out.append(task)
    return out
