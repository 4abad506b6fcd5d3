"""Matryoshka Multi-Vector Retrieval (MMR) loss: InfoNCE at every nested budget, averaged.

For each group ``g = (r_q, r_c, w)`` a query scores every candidate with budgeted MaxSim over its first
``r_q`` and the candidate's first ``r_c`` vectors; the logits are the in-batch positives (gathered over
ranks) plus the query's **own** hard negative(s), divided by the temperature τ; the target is the
query's positive. ``L = Σ_g w_g · CE_g / G`` (the official code divides by the number of groups; with the
paper's weights of 1 that is the mean). Token similarities are computed once at the full width and
sliced per group, as in the reference ``ColbertInBatchNegativeLoss``.

Baselines share this code path: NoMMR trains only the full budget; single-vector models (pooling
``last`` / ``mean``) have one vector, so the only group is (1, 1); ``split-X`` trains (X_q, X_c).

Two optional terms work against an item's vectors collapsing into copies of one another (both off by
default): a soft MaxSim in the loss (``τ_s·logsumexp(s/τ_s)`` over the candidate vectors instead of their
max, DivE's smooth Chamfer, arXiv 2211.16761), which sends gradient to every candidate vector and not only
the winner, annealed to the hard max that serving uses; and a diversity penalty, the mean squared cosine
between an item's own vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metaembed.budget import Budget
from metaembed.errors import MetaEmbedError, ShapeError
from metaembed.train.distributed import gather_with_grad

VARIANTS = ("mmr", "nommr", "single-last", "single-mean", "split-X")


class TrainConfigError(MetaEmbedError, ValueError):
    """A training setting (recipe value, loss group, variant) that is not allowed."""


@dataclass(frozen=True)
class LossGroup:
    """One nested budget of the MMR loss and its weight."""

    r_q: int
    r_c: int
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"loss_{self.r_q}x{self.r_c}"

    @classmethod
    def parse(cls, value) -> LossGroup:
        """From ``LossGroup``, ``(r_q, r_c)``, ``(r_q, r_c, w)`` or ``"r_qxr_c"``."""
        if isinstance(value, LossGroup):
            return value
        if isinstance(value, str):
            budget = Budget.parse(value)
            return cls(budget.r_q, budget.r_c)
        if isinstance(value, Sequence) and len(value) in (2, 3):
            r_q, r_c = int(value[0]), int(value[1])
            weight = float(value[2]) if len(value) == 3 else 1.0
            if r_q < 1 or r_c < 1 or weight < 0:
                raise TrainConfigError(f"loss group {value!r}: r_q, r_c must be ≥ 1 and the weight ≥ 0")
            return cls(r_q, r_c, weight)
        raise TrainConfigError(f"a loss group is [r_q, r_c] or [r_q, r_c, weight] or 'r_qxr_c', got {value!r}")


def variant_groups(variant: str, num_query_vectors: int, num_candidate_vectors: int) -> list[LossGroup]:
    """The loss groups of a training variant for a model with the given vectors per side.

    ``mmr``: the paper's ladder (1,1), (2,4), (4,8), (8,16), (16,64) — the rungs that fit, plus the full
    budget if the ladder does not reach it; ``nommr`` and every pooling baseline (``single-last``,
    ``single-mean``, ``split-…``): only the full budget.
    """
    full = LossGroup(num_query_vectors, num_candidate_vectors)
    if variant == "mmr":
        groups = [
            LossGroup(b.r_q, b.r_c)
            for b in Budget.LADDER
            if b.r_q <= num_query_vectors and b.r_c <= num_candidate_vectors
        ]
        return groups if (groups and groups[-1] == full) else [*groups, full]
    if variant in ("nommr", "single-last", "single-mean") or variant.startswith("split-"):
        return [full]
    raise TrainConfigError(f"unknown training variant {variant!r}; choose one of {VARIANTS}")


def variant_pooling(variant: str) -> str:
    """The model pooling a variant trains: Meta Tokens for mmr/nommr, else the baseline's pooling."""
    if variant in ("mmr", "nommr"):
        return "meta"
    if variant in ("single-last", "single-mean"):
        return variant.removeprefix("single-")
    if variant.startswith("split-"):
        return variant
    raise TrainConfigError(f"unknown training variant {variant!r}; choose one of {VARIANTS}")


def soft_max(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """``τ·logsumexp(scores/τ)`` over the last dim; the hard max (the same ``amax``) at ``τ = 0``.

    Every entry gets gradient ``softmax(scores/τ)`` instead of only the largest one, so candidate vectors
    that never win the max still learn; the result exceeds the max by at most ``τ·log(n)``.
    """
    if temperature == 0:
        return scores.amax(-1)
    return temperature * torch.logsumexp(scores / temperature, dim=-1)


def annealed_temperature(start: float | None, anneal_steps: int, step: int) -> float:
    """The soft-max temperature at a training step: ``start`` falling linearly to 0 over ``anneal_steps``.

    ``start`` None or 0: 0 (the hard max). ``anneal_steps`` 0: ``start`` at every step. From step
    ``anneal_steps`` on: 0, so a run ends on the objective that serving scores with.
    """
    if not start:
        return 0.0
    if anneal_steps <= 0:
        return float(start)
    return float(start) * max(0.0, 1.0 - step / anneal_steps)


def diversity_penalty(vectors: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean over items of ``relu(|cos| − margin)²`` over an item's distinct vector pairs: ``(n, R, D)`` → scalar.

    With ``margin`` 0 this is ``‖VVᵀ − I‖_F² / (R(R−1))`` with ``V`` the item's L2-normalised vectors: 0 when
    they are orthogonal, 1 when they are copies. A margin m leaves pairs with ``|cos| ≤ m`` alone, so the
    penalty spreads copies apart without pushing every pair toward orthogonal — a strong plain penalty
    (λ = 2) spread a page's vectors to mean cosine 0.44 but made its 64 vectors worse than its 16
    (docs/results.md). One vector per item gives 0.
    """
    count = vectors.shape[1]
    if count < 2:
        return vectors.new_zeros(())
    with torch.autocast(device_type=vectors.device.type, enabled=False):  # a bf16 Gram rounds cosines near 1
        unit = F.normalize(vectors.to(torch.promote_types(vectors.dtype, torch.float32)), dim=-1)
        gram = unit @ unit.transpose(1, 2)
        diagonal = torch.eye(count, dtype=torch.bool, device=vectors.device)
        excess = (gram.abs() - margin).clamp(min=0) if margin else gram
        return excess.masked_fill(diagonal, 0).square().sum((1, 2)).div(count * (count - 1)).mean()


def mmr_loss(
    queries: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor | None,
    groups: Sequence[LossGroup],
    temperature: float = 0.03,
    *,
    positive_offset: int = 0,
    negative_mask: torch.Tensor | None = None,
    normalize_scores: bool = False,
    soft_max_temperature: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MMR loss on embeddings, and each group's loss.

    Args:
        queries: ``(B, R_q, D)`` this rank's query embeddings.
        positives: ``(N, R_c, D)`` positives of every rank (N = B·world); query ``u``'s positive is row
            ``positive_offset + u``.
        negatives: ``(B·k, R_c, D)`` hard negatives, rows ``u·k … u·k+k-1`` belong to query ``u``; ``None``
            for none. Other queries' negatives are not used (the reference's choice).
        groups: nested budgets with weights.
        temperature: τ; logits are MaxSim scores / τ.
        negative_mask: ``(B, k)`` bool, False where query ``u`` has no ``j``-th negative (its logit is dropped).
        normalize_scores: divide each group's MaxSim by its ``r_q`` (the reference's ``normalize_scores``
            option, off there): every group's logits then span ``[-1/τ, 1/τ]``, as a single vector's do.
        soft_max_temperature: τ_s ≥ 0; the max over a group's ``r_c`` candidate vectors becomes
            :func:`soft_max` at τ_s (positives and own negatives alike). 0: the hard max, as served.

    Returns:
        ``(Σ_g w_g L_g / G, {group name: L_g})`` with ``L_g`` the mean cross-entropy over the B queries.
    """
    if queries.ndim != 3 or positives.ndim != 3:
        raise ShapeError(
            f"queries and positives must be (n, R, D); got {tuple(queries.shape)}, {tuple(positives.shape)}"
        )
    if not groups:
        raise TrainConfigError("the loss needs at least one group")
    if soft_max_temperature < 0:
        raise TrainConfigError(f"soft_max_temperature must be ≥ 0 (0 = hard max), got {soft_max_temperature}")
    batch = queries.shape[0]
    if positive_offset + batch > positives.shape[0]:
        raise ShapeError(
            f"{batch} queries at offset {positive_offset} need that many positives, got {positives.shape[0]}"
        )
    max_q = max(g.r_q for g in groups)
    max_c = max(g.r_c for g in groups)
    if max_q > queries.shape[1] or max_c > positives.shape[1]:
        raise TrainConfigError(
            f"loss group budget ({max_q}, {max_c}) exceeds the model's vectors "
            f"({queries.shape[1]} query, {positives.shape[1]} candidate)"
        )
    with torch.autocast(device_type=queries.device.type, enabled=False):  # τ = 0.03 amplifies bf16 rounding
        dtype = torch.promote_types(queries.dtype, torch.float32)
        q = queries[:, :max_q].to(dtype)
        sims = torch.einsum("uid,vjd->uvij", q, positives[:, :max_c].to(dtype))  # (B, N, r_q, r_c)
        neg_sims = None
        if negatives is not None and negatives.shape[0] > 0:
            if negatives.shape[0] % batch:
                raise ShapeError(f"{negatives.shape[0]} negatives do not split evenly over {batch} queries")
            k = negatives.shape[0] // batch
            neg = negatives[:, :max_c].to(dtype).view(batch, k, max_c, -1)
            neg_sims = torch.einsum("uid,ukjd->ukij", q, neg)  # (B, k, r_q, r_c): own negatives only
        target = torch.arange(batch, device=queries.device) + positive_offset
        per_group: dict[str, torch.Tensor] = {}
        total = queries.new_zeros((), dtype=dtype)
        for group in groups:
            scale = 1.0 / group.r_q if normalize_scores else 1.0
            logits = soft_max(sims[..., : group.r_q, : group.r_c], soft_max_temperature).sum(-1) * scale
            if neg_sims is not None:
                neg_scores = soft_max(neg_sims[..., : group.r_q, : group.r_c], soft_max_temperature).sum(-1) * scale
                if negative_mask is not None:
                    neg_scores = neg_scores.masked_fill(~negative_mask.to(torch.bool), float("-inf"))
                logits = torch.cat([logits, neg_scores], dim=1)
            loss = F.cross_entropy(logits / temperature, target)
            per_group[group.name] = loss
            total = total + group.weight * loss
        return total / len(groups), per_group


class MatryoshkaMultiVectorLoss(nn.Module):
    """The MMR training objective around a :class:`~metaembed.model.MetaEmbedModel`.

    Args:
        model: the model being trained (queries and candidates are encoded in two passes).
        groups: ``(r_q, r_c[, weight])`` budgets; default: ``variant_groups("mmr", …)`` for Meta-Token
            models (the paper ladder, weight 1) and the full budget for pooling baselines.
        temperature: τ (paper 0.03, fixed).
        gather: all-gather positives across ranks with gradient (queries stay local).
        normalize_scores: MaxSim / r_q in the loss (see :func:`mmr_loss`); serving scores are unchanged.
        soft_max_temperature: start value of τ_s for the soft MaxSim (:func:`soft_max`); ``None`` or 0: the
            hard max. Serving scores are unchanged (hard max).
        soft_max_anneal_steps: τ_s falls linearly to 0 over this many steps (:func:`annealed_temperature`,
            read at :attr:`step`, which the trainer sets); 0: τ_s stays at its start value.
        diversity_margin: m of :func:`diversity_penalty`: pairs of an item's vectors with ``|cos| ≤ m`` are not
            penalised (0: every pair is).
        diversity_weight: λ; adds ``λ·(P_q + P_c)/2`` with ``P`` the :func:`diversity_penalty` of this
            rank's queries and of its candidates (positives and negatives); 0: off.

    Inputs (``forward(batch)``): ``batch["query"]`` and ``batch["candidate"]`` are processor
    outputs (``model.processor(items, side)``), or lists of them (mini-batch chunks, concatenated).
    The candidates are the B positives first, then B·k hard negatives (query u's at rows B + u·k on);
    ``batch["num_negatives"]`` = k (0 for none); optional ``batch["negative_mask"]`` ``(B, k)``.
    ``forward(inputs, side)`` instead returns the embeddings of one processed batch (cached
    mini-batches call it that way under DDP).

    Returns the scalar loss; ``last_logs`` then holds each group's loss as a float, plus ``diversity``
    (the unweighted mean of the two penalties) and ``soft_max_temperature`` (τ_s) when those are on.

    Example:
        >>> loss_fn = MatryoshkaMultiVectorLoss(model)  # doctest: +SKIP
        >>> batch = {"query": model.processor(["a red bike"], "query"),
        ...          "candidate": model.processor([Path("bike.jpg"), Path("car.jpg")], "candidate"),
        ...          "num_negatives": 1}
        >>> loss_fn(batch).backward(); loss_fn.last_logs  # {"loss_1x1": …, …, "loss_16x64": …}
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Sequence | None = None,
        temperature: float = 0.03,
        gather: bool = True,
        normalize_scores: bool = False,
        soft_max_temperature: float | None = None,
        soft_max_anneal_steps: int = 0,
        diversity_weight: float = 0.0,
        diversity_margin: float = 0.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise TrainConfigError(f"temperature must be > 0, got {temperature}")
        if soft_max_temperature is not None and soft_max_temperature < 0:
            raise TrainConfigError(
                f"soft_max_temperature must be ≥ 0 or null (null or 0 = hard max), got {soft_max_temperature}"
            )
        if soft_max_anneal_steps < 0:
            raise TrainConfigError(f"soft_max_anneal_steps must be ≥ 0 (0 = no annealing), got {soft_max_anneal_steps}")
        if diversity_weight < 0:
            raise TrainConfigError(f"diversity_weight must be ≥ 0 (0 = off), got {diversity_weight}")
        if not 0 <= diversity_margin < 1:
            raise TrainConfigError(f"diversity_margin must be in [0, 1) (a cosine), got {diversity_margin}")
        self.model = model
        n_q, n_c = model.num_vectors("query"), model.num_vectors("candidate")
        if groups is None:
            variant = "mmr" if model.config.pooling == "meta" else "nommr"
            self.groups = variant_groups(variant, n_q, n_c)
        else:
            self.groups = [LossGroup.parse(g) for g in groups]
        if not self.groups:
            raise TrainConfigError("the loss needs at least one group")
        for group in self.groups:
            if group.r_q > n_q or group.r_c > n_c:
                raise TrainConfigError(
                    f"loss group ({group.r_q}, {group.r_c}) exceeds the model's {n_q} query / {n_c} candidate vectors"
                )
        self.temperature = float(temperature)
        self.gather = gather
        self.normalize_scores = normalize_scores
        self.soft_max_temperature = soft_max_temperature
        self.soft_max_anneal_steps = soft_max_anneal_steps
        self.diversity_weight = float(diversity_weight)
        self.diversity_margin = float(diversity_margin)
        self.step = 0  # the training step; the trainer sets it before each step (soft-max annealing reads it)
        self.last_logs: dict[str, float] = {}

    @property
    def current_soft_max_temperature(self) -> float:
        """τ_s at :attr:`step` (0: the hard max)."""
        return annealed_temperature(self.soft_max_temperature, self.soft_max_anneal_steps, self.step)

    def forward(self, batch: dict, side: str | None = None) -> torch.Tensor:
        if side is not None:
            return self.model(batch, side)
        queries = self.encode(batch["query"], "query")
        candidates = self.encode(batch["candidate"], "candidate")
        return self.compute(queries, candidates, batch.get("num_negatives", 0), batch.get("negative_mask"))

    def encode(self, inputs: dict | Sequence[dict], side: str) -> torch.Tensor:
        """Embeddings of one processed batch, or of a list of processed chunks (concatenated in order)."""
        if isinstance(inputs, dict):
            return self.model(inputs, side)
        return torch.cat([self.model(chunk, side) for chunk in inputs], dim=0)

    def compute(
        self,
        queries: torch.Tensor,
        candidates: torch.Tensor,
        num_negatives: int = 0,
        negative_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss from embeddings: ``candidates`` = B positives then B·k own negatives."""
        batch = queries.shape[0]
        expected = batch * (1 + num_negatives)
        if candidates.shape[0] != expected:
            raise ShapeError(
                f"{batch} queries with {num_negatives} negatives each need {expected} candidates, "
                f"got {candidates.shape[0]}"
            )
        positives, negatives = candidates[:batch], candidates[batch:] if num_negatives else None
        offset = 0
        if self.gather:
            positives, offset = gather_with_grad(positives)
        soft_temperature = self.current_soft_max_temperature
        loss, per_group = mmr_loss(
            queries,
            positives,
            negatives,
            self.groups,
            self.temperature,
            positive_offset=offset,
            negative_mask=negative_mask,
            normalize_scores=self.normalize_scores,
            soft_max_temperature=soft_temperature,
        )
        logs = {name: float(value.detach()) for name, value in per_group.items()}
        if self.soft_max_temperature:
            logs["soft_max_temperature"] = soft_temperature
        if self.diversity_weight:  # this rank's own items: no gather needed
            margin = self.diversity_margin
            diversity = (diversity_penalty(queries, margin) + diversity_penalty(candidates, margin)) / 2
            loss = loss + self.diversity_weight * diversity
            logs["diversity"] = float(diversity.detach())
        self.last_logs = logs
        return loss
