"""Slot read-out (meta_anchor="slots") against float64 loops, on the tiny backbone, and Meta-Token init."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from metaembed import MetaEmbedModel
from metaembed.budget import Budget
from metaembed.model.config import MetaEmbedConfig
from metaembed.model.readout import SlotReadout, slot_groups

ITEMS = ["a cat on a chair", "dog", "three birds in a tree"]


def _readout(hidden: int, seed: int) -> SlotReadout:
    torch.manual_seed(seed)
    return SlotReadout(hidden).double()


def _inputs(batch, slots, tokens, hidden, seed):
    g = torch.Generator().manual_seed(seed)
    meta = torch.randn(batch, slots, hidden, generator=g, dtype=torch.float64)
    content = torch.randn(batch, tokens, hidden, generator=g, dtype=torch.float64)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for row in range(batch):
        mask[row, : row * 2] = 0  # left padding, a different amount per row
    return meta, content, mask


def _hand_readout(readout, meta, content, mask, groups):
    """Loops: per token, a softmax over the slots of each group; per slot, the weighted mean of valid tokens."""
    w_q, w_k = readout.query.weight.detach(), readout.key.weight.detach()
    hidden = meta.shape[-1]
    out = torch.zeros_like(meta)
    for b in range(meta.shape[0]):
        keys = [w_k @ content[b, t] for t in range(content.shape[1])]
        for group in groups:
            queries = {i: w_q @ meta[b, i] for i in group}
            weights = {i: [0.0] * content.shape[1] for i in group}
            for t in range(content.shape[1]):
                if not mask[b, t]:
                    continue
                logits = {i: float(queries[i] @ keys[t]) / math.sqrt(hidden) for i in group}
                top = max(logits.values())
                norm = sum(math.exp(v - top) for v in logits.values())
                for i in group:
                    weights[i][t] = math.exp(logits[i] - top) / norm
            for i in group:
                total = sum(weights[i])
                out[b, i] = sum(weights[i][t] * content[b, t] for t in range(content.shape[1])) / total
    return out


def test_groups_are_the_ladder_rungs_of_each_side():
    assert slot_groups("candidate", 64) == (range(0, 1), range(1, 4), range(4, 8), range(8, 16), range(16, 64))
    assert slot_groups("query", 16) == (range(0, 1), range(1, 2), range(2, 4), range(4, 8), range(8, 16))
    assert slot_groups("query", 10) == (range(0, 1), range(1, 2), range(2, 4), range(4, 8), range(8, 10))
    assert slot_groups("candidate", 1) == (range(0, 1),)
    with pytest.raises(ValueError, match="side must be"):
        slot_groups("document", 4)


def test_groups_follow_the_budget_ladder(monkeypatch):
    monkeypatch.setattr(Budget, "LADDER", (Budget(1, 2), Budget(3, 6)))
    assert slot_groups("candidate", 8) == (range(0, 2), range(2, 6), range(6, 8))
    assert slot_groups("query", 8) == (range(0, 1), range(1, 3), range(3, 8))


@pytest.mark.parametrize("side", ["query", "candidate"])
def test_readout_matches_hand_computation(side):
    count = 16 if side == "query" else 64
    readout = _readout(6, seed=0)
    meta, content, mask = _inputs(2, count, 5, 6, seed=1)
    groups = slot_groups(side, count)
    got = readout(meta, content, mask, groups)
    torch.testing.assert_close(got, _hand_readout(readout, meta, content, mask, groups), rtol=1e-12, atol=1e-12)


def test_a_group_of_one_slot_is_the_masked_mean():
    readout = _readout(6, seed=2)
    meta, content, mask = _inputs(3, 16, 7, 6, seed=3)
    got = readout(meta, content, mask, slot_groups("query", 16))
    for b in range(3):
        valid = [content[b, t] for t in range(7) if mask[b, t]]
        torch.testing.assert_close(got[b, 0], sum(valid) / len(valid), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(got[b, 1], sum(valid) / len(valid), rtol=1e-13, atol=1e-13)  # [1,2): alone too
    assert not torch.allclose(got[:, 2], got[:, 3])  # a two-slot group splits the content


def test_a_lone_attending_slot_is_a_softmax_over_valid_tokens():
    torch.manual_seed(9)
    readout = SlotReadout(6, lone="attention").double()
    meta, content, mask = _inputs(3, 16, 7, 6, seed=10)
    groups = slot_groups("query", 16)
    got = readout(meta, content, mask, groups)
    w_q, w_k = readout.query.weight.detach(), readout.key.weight.detach()
    for b in range(3):
        for i in (0, 1):  # the query side's two groups of one
            valid = [t for t in range(7) if mask[b, t]]
            logits = [float((w_q @ meta[b, i]) @ (w_k @ content[b, t])) / math.sqrt(6) for t in valid]
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            want = sum(w * content[b, t] for w, t in zip(weights, valid, strict=True)) / sum(weights)
            torch.testing.assert_close(got[b, i], want, rtol=1e-12, atol=1e-12)
        mean = content[b, [t for t in range(7) if mask[b, t]]].mean(0)
        assert not torch.allclose(got[b, 0], mean)
    # groups of several slots are unchanged: they still split each token between them
    plain = SlotReadout(6).double()
    plain.load_state_dict(readout.state_dict())
    torch.testing.assert_close(got[:, 2:], plain(meta, content, mask, groups)[:, 2:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="lone must be one of"):
        SlotReadout(6, lone="max")


def test_lone_slot_is_a_config_of_the_slot_readout_only():
    assert MetaEmbedConfig("mini", meta_anchor="slots", lone_slot="attention").lone_slot == "attention"
    with pytest.raises(ValueError, match="applies to meta_anchor='slots' only"):
        MetaEmbedConfig("mini", meta_anchor="mean", lone_slot="attention")
    with pytest.raises(ValueError, match="lone_slot must be one of"):
        MetaEmbedConfig("mini", meta_anchor="slots", lone_slot="sum")


def test_the_weights_of_a_group_split_every_valid_token():
    readout = _readout(6, seed=4)
    meta, content, mask = _inputs(3, 64, 7, 6, seed=5)
    groups = slot_groups("candidate", 64)
    weights = readout.attention(meta, content, mask, groups)
    for group in groups:
        torch.testing.assert_close(weights[:, group.start : group.stop].sum(1), mask.double(), rtol=0, atol=1e-12)
    assert weights[:, 16:].std(1).mean() > 1e-3  # slots start with different attention


def test_padding_changes_nothing():
    readout = _readout(6, seed=6)
    meta, content, _ = _inputs(1, 16, 4, 6, seed=7)
    groups = slot_groups("query", 16)
    alone = readout(meta, content, torch.ones(1, 4, dtype=torch.long), groups)
    junk = torch.randn(1, 3, 6, dtype=torch.float64) * 100
    padded = readout(meta, torch.cat([junk, content], 1), torch.tensor([[0, 0, 0, 1, 1, 1, 1]]), groups)
    torch.testing.assert_close(padded, alone, rtol=1e-13, atol=1e-13)


def test_bf16_states_read_out_in_bf16():
    readout = SlotReadout(8).to(torch.bfloat16)
    meta, content, mask = (x.to(torch.bfloat16) if x.is_floating_point() else x for x in _inputs(2, 4, 5, 8, seed=8))
    out = readout(meta, content, mask, slot_groups("query", 4))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------- on a tiny backbone
@pytest.mark.parametrize("layout", ["reference", "own"])
def test_fresh_slot_model_starts_at_mean_pooling_in_vector_zero(tiny_backbone, layout):
    backbone = tiny_backbone("qwen2_vl")
    mean = MetaEmbedModel.from_backbone(backbone, pooling="mean")
    torch.manual_seed(0)
    slots = MetaEmbedModel.from_backbone(backbone, meta_anchor="slots", meta_layout=layout)
    for side in ("query", "candidate"):
        want, got = mean.encode(ITEMS, side), slots.encode(ITEMS, side)
        assert got.shape[1] == slots.num_vectors(side)
        torch.testing.assert_close(got[:, 0], want[:, 0], rtol=0, atol=1e-5)
        assert not torch.allclose(got[:, -1], got[:, -2], atol=1e-4)  # the last group's slots differ


def test_slots_over_states_and_inputs_start_at_the_mean_of_both(tiny_backbone):
    """Vector 0 of a fresh ``slot_values="states+inputs"`` model = masked mean of (last state + first-layer
    input) over the content, computed here by hand in float64 from the backbone's own hidden states."""
    backbone = tiny_backbone("qwen2_vl")
    torch.manual_seed(0)
    model = MetaEmbedModel.from_backbone(backbone, meta_anchor="slots", slot_values="states+inputs").eval()
    for side in ("query", "candidate"):
        batch = model.processor(ITEMS, side)
        count = model._slots(side).count
        meta = model.meta_tokens.weight[model._slots(side).rows.start : model._slots(side).rows.stop]
        with torch.no_grad():
            last, first = model.backbone(batch, meta.expand(len(ITEMS), -1, -1), with_inputs=True)
            got = model(batch, side)[:, 0].double()
        content = (last + first)[:, :-count].double()
        mask = batch["attention_mask"][:, :-count, None].double()
        want = torch.nn.functional.normalize((content * mask).sum(1) / mask.sum(1), dim=-1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        plain = MetaEmbedModel.from_backbone(backbone, meta_anchor="slots").eval()
        assert not torch.allclose(plain(batch, side)[:, 0].double(), want, atol=1e-3)  # the inputs count
    with pytest.raises(ValueError, match="slot_values"):
        MetaEmbedConfig(backbone_family="qwen2_vl", slot_values="states+inputs")  # needs the slot read-out
    with pytest.raises(ValueError, match="slot_values must be one of"):
        MetaEmbedConfig(backbone_family="qwen2_vl", meta_anchor="slots", slot_values="inputs")


def test_an_item_reads_out_the_same_alone_or_in_a_padded_batch(tiny_backbone):
    torch.manual_seed(0)
    model = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), meta_anchor="slots")
    together = model.encode_candidates(ITEMS, batch_size=3)
    for i, item in enumerate(ITEMS):
        torch.testing.assert_close(model.encode_candidates([item])[0], together[i], rtol=1e-4, atol=1e-5)


def test_slot_weights_learn_and_round_trip(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    model = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), meta_anchor="slots", dim=32)
    torch.nn.init.normal_(model.meta_residual.weight, std=0.1)
    model.forward(model.processor(ITEMS, "candidate"), "candidate").sum().backward()
    for parameter in (model.meta_tokens.weight, model.slot_readout.query.weight, model.slot_readout.key.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    path = model.save_pretrained(tmp_path / "m")
    assert set(load_file(path / "model.safetensors")) == {
        "meta_tokens.weight",
        "meta_residual.weight",
        "slot_readout.query.weight",
        "slot_readout.key.weight",
        "projection.weight",
        "projection.bias",
    }
    assert "meta_anchor: slots" in (path / "README.md").read_text()
    loaded = MetaEmbedModel.from_pretrained(path)
    assert loaded.config.meta_anchor == "slots"
    assert torch.equal(loaded.slot_readout.query.weight, model.slot_readout.query.weight)
    assert torch.equal(loaded.encode_candidates(ITEMS), model.encode_candidates(ITEMS))
    assert torch.equal(loaded.encode_queries(ITEMS), model.encode_queries(ITEMS))


def test_default_config_and_head_are_unchanged(tiny_model):
    assert MetaEmbedConfig("qwen2_vl").meta_anchor is None
    assert tiny_model.slot_readout is None and tiny_model.meta_residual is None
    assert set(tiny_model._head_state()) == {"meta_tokens.weight"}
    with pytest.raises(ValueError, match=r"meta_anchor must be one of \(None, 'mean', 'slots'\)"):
        MetaEmbedConfig("qwen2_vl", meta_anchor="slot")
    with pytest.raises(ValueError, match="Meta-Token pooling only"):
        MetaEmbedConfig("qwen2_vl", pooling="mean", meta_anchor="slots")


# ------------------------------------------------------------------------------------ Meta-Token init
def test_orthogonal_meta_tokens_have_token_embedding_length(tiny_backbone):
    model = MetaEmbedModel.from_backbone(
        tiny_backbone("qwen2_vl"), num_query_tokens=4, num_candidate_tokens=16, meta_init="orthogonal"
    )
    rows = model.meta_tokens.weight.detach().double()
    length = model.backbone.model.get_input_embeddings().weight.detach().double().norm(dim=1).mean()
    torch.testing.assert_close(rows @ rows.T, torch.eye(20, dtype=torch.float64) * length**2, rtol=0, atol=1e-4)
    wide = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), meta_init="orthogonal")  # 80 rows, width 64
    norms = wide.meta_tokens.weight.detach().double().norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, float(length)), rtol=1e-5, atol=0)


def test_normal_meta_init_is_the_default_and_bad_names_are_rejected(tiny_backbone):
    torch.manual_seed(3)
    plain = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"))
    torch.manual_seed(3)
    named = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), meta_init="normal")
    assert torch.equal(plain.meta_tokens.weight, named.meta_tokens.weight)
    with pytest.raises(ValueError, match=r"meta_init must be one of \('normal', 'orthogonal'\)"):
        MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), meta_init="xavier")
