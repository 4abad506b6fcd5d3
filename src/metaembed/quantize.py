"""Symmetric per-vector int8: how an int8 index stores vectors, and how its queries are scored.

A query meets int8 candidates quantised the same way (per vector, ``scale = max|q| / 127``) in every engine — the
fused kernel multiplies the codes exactly in integers, the GEMM path multiplies the dequantised values in fp32 — so
the scores are the same up to fp32 rounding whichever engine runs, as a bf16 index rounds its queries to bf16.
"""

from __future__ import annotations

import torch

_ROUNDER = 1.5 * 2**23


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-vector int8: ``x ≈ codes * scale[..., None]``, ``scale = max|x| / 127`` (1 for zero vectors)."""
    x = x.float()
    absmax = x.abs().amax(dim=-1)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    # round half to even by adding and taking off 1.5 * 2**23 (exact for |v| < 2**22; here |v| <= 127): the same
    # codes as torch.round, which opens an OpenMP region on a query-sized tensor whose threads then spin for
    # milliseconds on the cores the scoring kernel is about to use
    codes = ((x / scale[..., None]) + _ROUNDER - _ROUNDER).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def round_trip_int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` quantised and dequantised (float32): the values an int8 index scores with."""
    codes, scale = quantize_int8(x)
    return codes.float() * scale[..., None]
