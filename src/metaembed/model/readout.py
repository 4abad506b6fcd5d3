"""Slot read-out (``meta_anchor: "slots"``): Meta Tokens as competing attention queries over the content.

Read-outs that each look at the whole content the same way drift into copies of one another (an item's
vectors end up with cosine ≈ 0.99, so every budget scores alike). Here the Meta Tokens of one group
compete for every content token — a softmax over the group's slots, as in Slot Attention (Locatello et
al. 2020) — so a token given to one slot is taken from the others and the group's vectors must split the
content between them. The groups are the nested budgets of the ladder, so every budget prefix keeps whole
groups and the first vector, alone in its group, is the plain content mean.

A slot alone in its group has nothing to compete with. By default it reads the plain mean, which gives every
model — trained with the Matryoshka loss or not — a strong first vector. ``lone="attention"`` makes it attend
instead (a softmax over the content tokens with its own query), so what the first vector holds is learned:
only a loss that scores it alone (the 1x1 rung) teaches it to summarise the whole item.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metaembed.budget import Budget
from metaembed.model.config import LONE_SLOTS
from metaembed.model.meta_tokens import SIDES, Side

WEIGHT_FLOOR = 1e-6  # a slot that wins almost no token divides by this instead of ~0


def slot_groups(side: Side, count: int) -> tuple[range, ...]:
    """The side's ``count`` vectors cut at the ladder's budgets for that side (r_q or r_c) below ``count``.

    Candidates (64): [0,1) [1,4) [4,8) [8,16) [16,64); queries (16): [0,1) [1,2) [2,4) [4,8) [8,16).
    """
    if side not in SIDES:
        raise ValueError(f"side must be 'query' or 'candidate', got {side!r}")
    if count < 1:
        raise ValueError(f"a side needs at least one Meta Token, got {count}")
    rungs = {budget.r_q if side == "query" else budget.r_c for budget in Budget.LADDER}
    bounds = sorted({bound for bound in rungs if bound < count} | {count})
    return tuple(range(start, stop) for start, stop in zip([0, *bounds[:-1]], bounds, strict=True))


class SlotReadout(nn.Module):
    """Vector i = the content averaged with the weights slot i wins against the other slots of its group.

    ``l_it = <W_q m_i, W_k h_t> / sqrt(H)``; ``a_it`` = softmax of ``l_it`` over the slots i of i's group
    (0 on padding); vector_i = ``Σ_t a_it h_t / Σ_t a_it``. W_q and W_k start random (normal, std
    ``1/sqrt(H)``) so slots differ from the first step. A group of one slot has ``a_it = 1`` (the mean),
    or with ``lone="attention"`` ``a_it`` = softmax of ``l_it`` over the valid tokens t.
    """

    def __init__(self, hidden: int, lone: str = "mean") -> None:
        super().__init__()
        if lone not in LONE_SLOTS:
            raise ValueError(f"lone must be one of {LONE_SLOTS}, got {lone!r}")
        self.lone = lone
        self.query = nn.Linear(hidden, hidden, bias=False)
        self.key = nn.Linear(hidden, hidden, bias=False)
        for linear in (self.query, self.key):
            nn.init.normal_(linear.weight, std=hidden**-0.5)

    def attention(
        self, meta: torch.Tensor, content: torch.Tensor, mask: torch.Tensor, groups: tuple[range, ...]
    ) -> torch.Tensor:
        """``(B, R, T)`` weights of R slot states ``meta (B, R, H)`` over ``content (B, T, H)``.

        Within a group the weights of each valid token sum to 1 over the group's slots; padding gets 0.
        Softmax in at least float32: bf16 logits would round small shares to 0.
        """
        logits = self.query(meta) @ self.key(content).transpose(1, 2) / math.sqrt(meta.shape[-1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        valid = mask[:, None, :].to(torch.bool)
        parts = []
        for group in groups:
            share = logits[:, group.start : group.stop]
            if len(group) == 1 and self.lone == "attention":  # alone: a softmax over the valid tokens instead
                parts.append(share.masked_fill(~valid, torch.finfo(share.dtype).min).softmax(2))
            else:
                parts.append(share.softmax(1))
        weights = torch.cat(parts, dim=1)
        return weights * valid.to(weights.dtype)

    def forward(
        self, meta: torch.Tensor, content: torch.Tensor, mask: torch.Tensor, groups: tuple[range, ...]
    ) -> torch.Tensor:
        """``(B, R, H)`` slot read-outs in the content's dtype."""
        weights = self.attention(meta, content, mask, groups)
        totals = weights.sum(-1, keepdim=True).clamp(min=WEIGHT_FLOOR)
        return ((weights @ content.to(weights.dtype)) / totals).to(content.dtype)
