"""The paper's single- and multi-vector baselines: read-outs of the content states with no Meta Tokens."""

from __future__ import annotations

import torch


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, count: int) -> torch.Tensor:
    """``(B, count, H)`` baseline read-outs of left-padded hidden states ``(B, T, H)``.

    "last": the last position (with left padding, every row's last valid token). "mean": the masked
    mean over valid tokens. "split-*": valid token t of n goes to chunk ``floor(t·count/n)``; each chunk
    is mean-pooled (a row with fewer than ``count`` tokens repeats tokens so no chunk is empty).
    """
    if pooling == "last":
        return hidden[:, -1:]
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return ((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1))[:, None]
    lengths = attention_mask.sum(1)  # (B,)
    rank = (attention_mask.cumsum(1) - 1).clamp(min=0)  # index among valid tokens
    k = torch.arange(count, device=hidden.device)
    start = (k[None] * lengths[:, None]) // count  # (B, count)
    stop = torch.maximum(((k[None] + 1) * lengths[:, None]) // count, start + 1)
    inside = (rank[:, None, :] >= start[..., None]) & (rank[:, None, :] < stop[..., None])
    weights = (inside & attention_mask.bool()[:, None, :]).to(hidden.dtype)  # (B, count, T)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
    return weights @ hidden
