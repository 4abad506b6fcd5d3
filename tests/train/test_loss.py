"""The MMR loss against a float64 hand computation (loops, no einsum) on random embeddings."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from metaembed.errors import MetaEmbedError, ShapeError
from metaembed.train.loss import (
    LossGroup,
    MatryoshkaMultiVectorLoss,
    TrainConfigError,
    annealed_temperature,
    diversity_penalty,
    mmr_loss,
    soft_max,
    variant_groups,
    variant_pooling,
)

LADDER = [LossGroup(1, 1), LossGroup(2, 4), LossGroup(4, 8), LossGroup(8, 16), LossGroup(16, 64)]


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _score(q, c, r_q, r_c):
    total = 0.0
    for i in range(r_q):
        total += max(float(q[i] @ c[j]) for j in range(r_c))
    return total


def _hand_loss(q, pos, neg, groups, tau, offset=0, mask=None, normalize=False):
    batch = q.shape[0]
    k = 0 if neg is None else neg.shape[0] // batch
    per_group = {}
    total = 0.0
    for g in groups:
        losses = []
        per_vector = g.r_q if normalize else 1
        for u in range(batch):
            logits = [_score(q[u], pos[v], g.r_q, g.r_c) / per_vector / tau for v in range(pos.shape[0])]
            for j in range(k):
                if mask is None or mask[u, j]:
                    logits.append(_score(q[u], neg[u * k + j], g.r_q, g.r_c) / per_vector / tau)
            top = max(logits)
            log_z = top + math.log(sum(math.exp(x - top) for x in logits))
            losses.append(log_z - logits[offset + u])
        per_group[g.name] = sum(losses) / batch
        total += g.weight * per_group[g.name]
    return total / len(groups), per_group


@pytest.mark.parametrize("k", [0, 1, 2])
def test_ladder_matches_hand_computation(k):
    batch, dim = 3, 8
    q = _unit(batch, 16, dim, seed=1)
    pos = _unit(batch, 64, dim, seed=2)
    neg = _unit(batch * k, 64, dim, seed=3) if k else None
    loss, per_group = mmr_loss(q, pos, neg, LADDER, 0.03)
    want, want_groups = _hand_loss(q, pos, neg, LADDER, 0.03)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want, rel=1e-10)
    for name, value in want_groups.items():
        assert per_group[name].item() == pytest.approx(value, rel=1e-10)


def test_weights_temperature_offset_and_mask():
    batch, dim = 2, 5
    groups = [LossGroup(1, 2, 0.5), LossGroup(3, 4, 2.0)]
    q = _unit(batch, 3, dim, seed=4)
    pos = _unit(6, 4, dim, seed=5)  # 3 "ranks" of 2 positives; these queries are rank 1's
    neg = _unit(batch * 2, 4, dim, seed=6)
    mask = torch.tensor([[True, False], [True, True]])
    loss, _ = mmr_loss(q, pos, neg, groups, 0.1, positive_offset=2, negative_mask=mask)
    want, _ = _hand_loss(q, pos, neg, groups, 0.1, offset=2, mask=mask)
    assert loss.item() == pytest.approx(want, rel=1e-10)


def test_normalized_scores_divide_each_group_by_its_query_vectors():
    q, pos, neg = _unit(3, 16, 8, seed=7), _unit(3, 64, 8, seed=8), _unit(3, 64, 8, seed=9)
    loss, per_group = mmr_loss(q, pos, neg, LADDER, 0.03, normalize_scores=True)
    want, want_groups = _hand_loss(q, pos, neg, LADDER, 0.03, normalize=True)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    assert per_group["loss_1x1"].item() == pytest.approx(mmr_loss(q, pos, neg, LADDER[:1], 0.03)[0].item(), rel=1e-12)
    assert per_group["loss_16x64"].item() == pytest.approx(want_groups["loss_16x64"], rel=1e-10)


def test_hard_negative_raises_loss_and_temperature_matters():
    q = _unit(2, 16, 8, seed=7)
    pos = _unit(2, 64, 8, seed=8)
    hard = (pos + 0.01 * _unit(2, 64, 8, seed=9)).div(1.0)
    without, _ = mmr_loss(q, pos, None, LADDER)
    with_neg, _ = mmr_loss(q, pos, F.normalize(hard, dim=-1), LADDER)
    assert with_neg > without
    assert mmr_loss(q, pos, None, LADDER, 1.0)[0] != pytest.approx(without.item())


def test_float32_inputs_are_scored_in_float32_even_under_bf16_autocast():
    q, pos = _unit(4, 16, 32, seed=10), _unit(4, 64, 32, seed=11)
    want, _ = mmr_loss(q, pos, None, LADDER)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = mmr_loss(q.float(), pos.float(), None, LADDER)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_variants():
    assert variant_groups("mmr", 16, 64) == LADDER
    assert variant_groups("nommr", 16, 64) == [LossGroup(16, 64)]
    assert variant_groups("single-last", 1, 1) == [LossGroup(1, 1)]
    assert variant_groups("split-16x64", 16, 64) == [LossGroup(16, 64)]
    assert variant_groups("mmr", 4, 32) == [LossGroup(1, 1), LossGroup(2, 4), LossGroup(4, 8), LossGroup(4, 32)]
    assert variant_pooling("single-mean") == "mean"
    assert variant_pooling("nommr") == "meta"
    with pytest.raises(MetaEmbedError, match="unknown training variant"):
        variant_groups("colbert", 16, 64)


def test_bad_shapes_and_groups_are_rejected():
    q, pos = _unit(2, 4, 8, seed=12), _unit(2, 8, 8, seed=13)
    with pytest.raises(MetaEmbedError, match="exceeds"):
        mmr_loss(q, pos, None, [LossGroup(8, 8)])
    with pytest.raises(ShapeError, match="evenly"):
        mmr_loss(q, pos, _unit(3, 8, 8, seed=14), [LossGroup(1, 1)])
    with pytest.raises(MetaEmbedError, match="loss group"):
        LossGroup.parse([1, 0])


def test_module_on_tiny_model_logs_groups_and_backpropagates(tiny_model):
    loss_fn = MatryoshkaMultiVectorLoss(tiny_model)
    batch = {
        "query": tiny_model.processor(["a red bicycle", "two dogs"], "query"),
        "candidate": tiny_model.processor(["bike photo", "dogs on a beach", "a car", "cats"], "candidate"),
        "num_negatives": 1,
    }
    loss = loss_fn(batch)
    assert set(loss_fn.last_logs) == {g.name for g in LADDER}
    assert loss.item() == pytest.approx(sum(loss_fn.last_logs.values()) / 5, rel=1e-5)
    loss.backward()
    assert tiny_model.meta_tokens.weight.grad is not None
    assert tiny_model.meta_tokens.weight.grad.abs().sum() > 0
    with pytest.raises(ShapeError, match="need 2 candidates, got 4"):
        loss_fn({**batch, "num_negatives": 0, "candidate": batch["candidate"]})


# ------------------------------------------------------------------ soft MaxSim and diversity penalty
class _Vectors(torch.nn.Module):
    """What the loss module reads from a model when it is handed embeddings (``compute``)."""

    config = SimpleNamespace(pooling="meta")

    def num_vectors(self, side):
        return 16 if side == "query" else 64


def _soft_score(q, c, r_q, r_c, tau_s):
    total = 0.0
    for i in range(r_q):
        sims = [float(q[i] @ c[j]) for j in range(r_c)]
        top = max(sims)
        total += top + tau_s * math.log(sum(math.exp((s - top) / tau_s) for s in sims))
    return total


def _hand_soft_loss(q, pos, neg, groups, tau, tau_s, mask=None):
    batch = q.shape[0]
    k = 0 if neg is None else neg.shape[0] // batch
    total = 0.0
    for g in groups:
        losses = []
        for u in range(batch):
            logits = [_soft_score(q[u], pos[v], g.r_q, g.r_c, tau_s) / tau for v in range(pos.shape[0])]
            for j in range(k):
                if mask is None or mask[u, j]:
                    logits.append(_soft_score(q[u], neg[u * k + j], g.r_q, g.r_c, tau_s) / tau)
            top = max(logits)
            losses.append(top + math.log(sum(math.exp(x - top) for x in logits)) - logits[u])
        total += g.weight * sum(losses) / batch
    return total / len(groups)


def _hand_diversity(vectors, margin=0.0):
    per_item = []
    for item in vectors:
        unit = [row / math.sqrt(float(row @ row)) for row in item]
        r = len(unit)
        pairs = [max(abs(float(unit[i] @ unit[j])) - margin, 0.0) ** 2 for i in range(r) for j in range(r) if i != j]
        per_item.append(sum(pairs) / (r * (r - 1)))
    return sum(per_item) / len(per_item)


@pytest.mark.parametrize("tau_s", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("k", [0, 2])
def test_soft_max_matches_hand_computation(tau_s, k):
    batch, dim = 3, 8
    q, pos = _unit(batch, 16, dim, seed=20), _unit(batch, 64, dim, seed=21)
    neg = _unit(batch * k, 64, dim, seed=22) if k else None
    mask = torch.tensor([[True, False], [True, True], [False, True]]) if k else None
    loss, _ = mmr_loss(q, pos, neg, LADDER, 0.05, negative_mask=mask, soft_max_temperature=tau_s)
    want = _hand_soft_loss(q, pos, neg, LADDER, 0.05, tau_s, mask)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    hard, _ = mmr_loss(q, pos, neg, LADDER, 0.05, negative_mask=mask)
    assert loss.item() != pytest.approx(hard.item(), rel=1e-3)


def test_zero_soft_max_temperature_is_exactly_the_hard_max():
    q, pos, neg = _unit(3, 16, 8, seed=23), _unit(3, 64, 8, seed=24), _unit(3, 64, 8, seed=25)
    hard, hard_groups = mmr_loss(q, pos, neg, LADDER, 0.03)
    soft, soft_groups = mmr_loss(q, pos, neg, LADDER, 0.03, soft_max_temperature=0.0)
    assert torch.equal(soft, hard)
    assert all(torch.equal(soft_groups[name], value) for name, value in hard_groups.items())
    near, _ = mmr_loss(q, pos, neg, LADDER, 0.03, soft_max_temperature=1e-6)
    assert near.item() == pytest.approx(hard.item(), rel=1e-4)


def test_soft_max_gives_every_candidate_vector_gradient():
    q, pos = _unit(2, 16, 8, seed=26), _unit(2, 64, 8, seed=27).requires_grad_()
    mmr_loss(q, pos, None, [LossGroup(16, 64)], 0.03)[0].backward()
    hard_reached = (pos.grad.abs().sum(-1) > 0).sum().item()
    pos.grad = None
    mmr_loss(q, pos, None, [LossGroup(16, 64)], 0.03, soft_max_temperature=0.5)[0].backward()
    assert (pos.grad.abs().sum(-1) > 0).all()
    assert hard_reached < 2 * 64  # the hard max reaches only the vectors that win a max
    scores = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: soft_max(s, 0.3), (scores,))


def test_annealed_temperature_falls_linearly_to_zero():
    assert annealed_temperature(0.1, 100, 0) == pytest.approx(0.1)
    assert annealed_temperature(0.1, 100, 25) == pytest.approx(0.075)
    assert annealed_temperature(0.1, 100, 50) == pytest.approx(0.05)
    assert annealed_temperature(0.1, 100, 100) == 0.0
    assert annealed_temperature(0.1, 100, 250) == 0.0
    assert annealed_temperature(0.1, 0, 10**6) == pytest.approx(0.1)
    assert annealed_temperature(None, 100, 0) == 0.0
    assert annealed_temperature(0.0, 0, 3) == 0.0


def test_module_reads_the_annealed_temperature_at_its_step():
    q, cands = _unit(2, 16, 8, seed=28), _unit(4, 64, 8, seed=29)
    loss_fn = MatryoshkaMultiVectorLoss(_Vectors(), soft_max_temperature=0.2, soft_max_anneal_steps=10)
    for step, tau_s in [(0, 0.2), (5, 0.1), (10, 0.0), (11, 0.0)]:
        loss_fn.step = step
        got = loss_fn.compute(q, cands, 1)
        want = mmr_loss(q, cands[:2], cands[2:], LADDER, 0.03, soft_max_temperature=tau_s)[0]
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
        assert loss_fn.last_logs["soft_max_temperature"] == pytest.approx(tau_s)
    loss_fn.step = 10
    assert torch.equal(loss_fn.compute(q, cands, 1), mmr_loss(q, cands[:2], cands[2:], LADDER, 0.03)[0])


def test_diversity_penalty_matches_hand_computation():
    g = torch.Generator().manual_seed(30)
    vectors = torch.randn(3, 5, 4, generator=g, dtype=torch.float64) * 3  # not unit: the penalty normalises
    assert diversity_penalty(vectors).item() == pytest.approx(_hand_diversity(vectors), rel=1e-12)
    copies = _unit(2, 1, 4, seed=31).expand(2, 6, 4)
    assert diversity_penalty(copies).item() == pytest.approx(1.0, rel=1e-12)
    assert diversity_penalty(torch.eye(4, dtype=torch.float64)[None]).item() == 0.0
    assert diversity_penalty(_unit(3, 1, 4, seed=32)).item() == 0.0
    leaf = vectors.clone().requires_grad_()
    assert torch.autograd.gradcheck(diversity_penalty, (leaf,))


@pytest.mark.parametrize("margin", [0.3, 0.8])
def test_diversity_margin_penalises_only_the_cosine_above_it(margin):
    g = torch.Generator().manual_seed(35)
    base = torch.randn(4, 1, 6, generator=g, dtype=torch.float64)
    vectors = base + 0.6 * torch.randn(4, 5, 6, generator=g, dtype=torch.float64)  # a mix of near and far pairs
    got = diversity_penalty(vectors, margin).item()
    assert got == pytest.approx(_hand_diversity(vectors, margin), rel=1e-12) and got > 0
    assert got < diversity_penalty(vectors).item()
    copies = _unit(2, 1, 6, seed=36).expand(2, 3, 6)
    assert diversity_penalty(copies, margin).item() == pytest.approx((1 - margin) ** 2, rel=1e-12)
    assert diversity_penalty(torch.eye(6, dtype=torch.float64)[None], margin).item() == 0.0
    with pytest.raises(TrainConfigError, match="diversity_margin"):
        MatryoshkaMultiVectorLoss(_Vectors(), diversity_weight=1.0, diversity_margin=1.0)


def test_module_adds_the_weighted_diversity_of_queries_and_candidates():
    q, cands = _unit(2, 16, 8, seed=33), _unit(4, 64, 8, seed=34)
    plain = MatryoshkaMultiVectorLoss(_Vectors()).compute(q, cands, 1)
    loss_fn = MatryoshkaMultiVectorLoss(_Vectors(), diversity_weight=0.5)
    leaf_q, leaf_c = q.clone().requires_grad_(), cands.clone().requires_grad_()
    got = loss_fn.compute(leaf_q, leaf_c, 1)
    diversity = (_hand_diversity(q) + _hand_diversity(cands)) / 2
    assert got.item() == pytest.approx(plain.item() + 0.5 * diversity, rel=1e-12)
    assert loss_fn.last_logs["diversity"] == pytest.approx(diversity, rel=1e-12)
    got.backward()
    plain_leaf = cands.clone().requires_grad_()
    MatryoshkaMultiVectorLoss(_Vectors()).compute(q, plain_leaf, 1).backward()
    assert leaf_c.grad[3].abs().sum() > 0  # the negative of query 1 is regularised too
    assert not torch.allclose(leaf_c.grad, plain_leaf.grad)


def test_default_module_logs_only_the_groups():
    loss_fn = MatryoshkaMultiVectorLoss(_Vectors())
    loss_fn.compute(_unit(2, 16, 8, seed=35), _unit(2, 64, 8, seed=36))
    assert set(loss_fn.last_logs) == {g.name for g in LADDER}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"soft_max_temperature": -0.1}, "soft_max_temperature must be ≥ 0"),
        ({"soft_max_anneal_steps": -1}, "soft_max_anneal_steps must be ≥ 0"),
        ({"diversity_weight": -1.0}, "diversity_weight must be ≥ 0"),
    ],
)
def test_bad_regulariser_settings_are_rejected(kwargs, message):
    with pytest.raises(TrainConfigError, match=message):
        MatryoshkaMultiVectorLoss(_Vectors(), **kwargs)
    q, pos = _unit(1, 1, 4, seed=37), _unit(1, 1, 4, seed=38)
    with pytest.raises(TrainConfigError, match="soft_max_temperature must be ≥ 0"):
        mmr_loss(q, pos, None, [LossGroup(1, 1)], soft_max_temperature=-1.0)
