"""Shared helpers for the index tests: deterministic embeddings, directory digests, the float64 reference check."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from metaembed.scoring import maxsim_reference


def embeddings(n: int, r: int = 64, d: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, r, d, generator=gen), dim=-1)


def item_embedding(item_id: str, r: int, d: int) -> torch.Tensor:
    """The embedding a crash-test writer stores for ``item_id`` (a pure function of the id)."""
    seed = int(hashlib.sha256(item_id.encode()).hexdigest()[:12], 16)
    return embeddings(1, r, d, seed)[0]


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (LOCK excluded: it is empty and only a flock target)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "LOCK"
    }


def assert_same_results(a, b, atol: float = 1e-5) -> None:
    """Scores equal to ``atol``; ids equal wherever the ranking is unambiguous (neighbours more than 2·atol apart)."""
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=atol)
    for qa, qb, s in zip(a.ids, b.ids, a.scores.tolist(), strict=True):
        assert len(qa) == len(qb)
        for j in range(len(qa)):
            gaps = [abs(s[j] - s[i]) for i in (j - 1, j + 1) if 0 <= i < len(s)]
            if all(g > 2 * atol for g in gaps):
                assert qa[j] == qb[j], (j, qa, qb, s)


def assert_matches_reference(results, queries, stored, ids, budget, atol: float, live=None) -> None:
    """Search results agree with ``maxsim_reference`` (float64, one einsum) over the stored values.

    The scores are the reference's top k' values, and every returned id carries its own reference score, so a
    wrong id can only stand where the reference ties within ``atol``. ``live`` (bool per item) masks deleted ones.
    """
    ref = maxsim_reference(queries, stored, budget)
    if live is not None:
        ref[:, ~live] = float("-inf")
    k = results.scores.shape[1]
    torch.testing.assert_close(results.scores.double(), ref.topk(k, dim=1).values, rtol=0, atol=atol)
    position = {item_id: n for n, item_id in enumerate(ids)}
    own = torch.tensor([[ref[q, position[i]].item() for i in row] for q, row in enumerate(results.ids)])
    torch.testing.assert_close(results.scores.double(), own.double().reshape(results.scores.shape), rtol=0, atol=atol)
