"""Baseline pooling (single-last, single-mean, split-X): float64 reference, encode and save/load."""

from __future__ import annotations

import pytest
import torch

from metaembed import MetaEmbedModel
from metaembed.errors import BudgetError
from metaembed.model.pooling import pool_hidden


def _reference(hidden, mask, pooling, count):
    out = []
    for row, m in zip(hidden, mask, strict=True):
        valid = row[m.bool()]
        n = valid.shape[0]
        if pooling == "last":
            out.append(row[-1:])
        elif pooling == "mean":
            out.append(valid.mean(0, keepdim=True))
        else:
            chunks = []
            for k in range(count):
                start, stop = k * n // count, (k + 1) * n // count
                stop = max(stop, start + 1)
                chunks.append(valid[start:stop].mean(0))
            out.append(torch.stack(chunks))
    return torch.stack(out)


@pytest.mark.parametrize(("pooling", "count"), [("last", 1), ("mean", 1), ("split-3", 3), ("split-8", 8)])
def test_pool_matches_reference(pooling, count):
    hidden = torch.randn(3, 7, 5, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]])
    got = pool_hidden(hidden, mask, pooling, count)
    torch.testing.assert_close(got, _reference(hidden, mask, pooling, count))


@pytest.mark.parametrize(("pooling", "n_q", "n_c"), [("last", 1, 1), ("mean", 1, 1), ("split-2x5", 2, 5)])
def test_baseline_models_encode_without_meta_tokens_and_round_trip(tiny_backbone, tmp_path, pooling, n_q, n_c):
    torch.manual_seed(0)
    model = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), pooling=pooling)
    q = model.encode_queries(["a cat on a chair", "dog"])
    c = model.encode_candidates(["x", "y z"])
    assert q.shape == (2, n_q, 64) and c.shape == (2, n_c, 64)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(2, n_q))
    loaded = MetaEmbedModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert loaded.config.pooling == pooling
    torch.testing.assert_close(loaded.encode_queries(["a cat on a chair", "dog"]), q)
    with pytest.raises(BudgetError):
        model.encode_queries(["a"], budget="16x64")


def test_baseline_input_has_no_meta_slots(tiny_backbone):
    meta = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"))
    last = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), pooling="last")
    width = meta.processor(["a cat"], "candidate")["input_ids"].shape[1]
    assert last.processor(["a cat"], "candidate")["input_ids"].shape[1] == width - 80


def test_bad_pooling_is_rejected(tiny_backbone):
    with pytest.raises(ValueError, match="pooling must be one of"):
        MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), pooling="split-0")


@pytest.mark.parametrize("layout", ["reference", "own"])
def test_mean_anchored_meta_tokens_start_at_mean_pooling_then_learn(tiny_backbone, tmp_path, layout):
    """meta_anchor="mean": a fresh model reads out the content mean in every vector (the residual map is
    zero); once the map is non-zero the vectors differ, get gradients, and survive save/load."""
    backbone = tiny_backbone("qwen2_vl")
    mean = MetaEmbedModel.from_backbone(backbone, pooling="mean")
    anchored = MetaEmbedModel.from_backbone(backbone, meta_anchor="mean", meta_layout=layout)
    items = ["a cat on a chair", "dog", "three birds in a tree"]
    for side in ("query", "candidate"):
        want, got = mean.encode(items, side), anchored.encode(items, side)
        assert got.shape[1] == anchored.num_vectors(side)
        torch.testing.assert_close(got, want.expand_as(got), rtol=0, atol=1e-5)
    torch.manual_seed(1)
    torch.nn.init.normal_(anchored.meta_residual.weight, std=0.1)
    anchored.forward(anchored.processor(items, "query"), "query").sum().backward()
    assert anchored.meta_tokens.weight.grad.abs().sum() > 0 and anchored.meta_residual.weight.grad.abs().sum() > 0
    q = anchored.encode_queries(items)
    assert not torch.allclose(q[:, 0], q[:, 1])
    loaded = MetaEmbedModel.from_pretrained(anchored.save_pretrained(tmp_path / "m"))
    assert loaded.config.meta_anchor == "mean"
    torch.testing.assert_close(loaded.encode_queries(items), q)


def test_meta_anchor_is_checked(tiny_backbone):
    with pytest.raises(ValueError, match="meta_anchor must be one of"):
        MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), meta_anchor="max")
    with pytest.raises(ValueError, match="Meta-Token pooling only"):
        MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), pooling="mean", meta_anchor="mean")
