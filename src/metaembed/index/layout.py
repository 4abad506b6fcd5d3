"""What every backend agrees on about stored items: the prefix groups, int8 codes and the two-stage default.

The embedded store keeps vector positions in groups ``[0,1), [1,4), [4,8), [8,16), [16,64)`` (cut at
``num_vectors``) and Qdrant stores one named multivector per group bound, so both read exactly the prefix a
budget needs. Both quantise int8 the same way, so their scores agree for every dtype.
"""

from __future__ import annotations

from typing import Any

import torch

from metaembed.quantize import quantize_int8, round_trip_int8

DEFAULT_BOUNDS = (1, 4, 8, 16, 64)
ITEMSIZE = {"fp32": 4, "bf16": 2, "int8": 1}
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}


def group_bounds(num_vectors: int) -> list[int]:
    """Group boundaries [0, 1, 4, 8, 16, 64, ...] cut at ``num_vectors`` (which is always the last bound)."""
    return [0, *[b for b in DEFAULT_BOUNDS if b < num_vectors], num_vectors]


def encode(embeddings: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(codes, scales)`` as an index of ``dtype`` stores them; scales only for int8."""
    if dtype == "int8":
        return quantize_int8(embeddings)
    return embeddings.to(TORCH_DTYPE[dtype]), None


def stored_values(embeddings: torch.Tensor, dtype: str) -> torch.Tensor:
    """The float32 values an index of ``dtype`` scores with after storing ``embeddings`` (rounded, dequantised) —
    stored items and queries alike: a query is rounded to bf16, or quantised to int8, the same way."""
    embeddings = embeddings.detach().to("cpu", torch.float32)
    return round_trip_int8(embeddings) if dtype == "int8" else embeddings.to(TORCH_DTYPE[dtype]).float()


def row_bytes(layout: dict[str, Any]) -> int:
    """Bytes one stored item's vectors take (int8: with its fp32 per-vector scales); ``layout`` as a manifest."""
    values = layout["num_vectors"] * layout["dim"] * ITEMSIZE[layout["dtype"]]
    return values + (4 * layout["num_vectors"] if layout["dtype"] == "int8" else 0)


def default_candidates(k: int) -> int:
    """Coarse candidates a two-stage search reranks when the caller does not say: ``max(10·k, 100)``."""
    return max(10 * k, 100)


__all__ = [
    "DEFAULT_BOUNDS",
    "ITEMSIZE",
    "TORCH_DTYPE",
    "default_candidates",
    "encode",
    "group_bounds",
    "quantize_int8",
    "row_bytes",
    "stored_values",
]
