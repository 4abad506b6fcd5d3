"""The MMR loss against a float64 hand computation (loops, no einsum) on random embeddings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metaembed.errors import MetaEmbedError, ShapeError
from metaembed.train.loss import LossGroup, MatryoshkaMultiVectorLoss, mmr_loss, variant_groups, variant_pooling

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
