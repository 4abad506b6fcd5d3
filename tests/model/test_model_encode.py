from __future__ import annotations

import pytest
import torch
from PIL import Image

from metaembed import Budget, BudgetError, InputError, MetaEmbedModel, maxsim


def picture(width: int, height: int, seed: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


ITEMS = [
    "a red bicycle leaning on a wall",
    picture(60, 44, 1),
    {"text": "<|image_1|>\nwhat is in the picture?", "image": picture(30, 90, 2)},
    {"text": "short"},
]


@pytest.fixture(params=["qwen2_vl", "qwen2_5_vl"])
def model(request, tiny_backbone):
    torch.manual_seed(0)
    return MetaEmbedModel.from_backbone(tiny_backbone(request.param))


def test_text_image_and_both_encode_to_unit_vectors(model):
    queries = model.encode_queries(ITEMS)
    candidates = model.encode_candidates(ITEMS)
    assert queries.shape == (4, 16, 64) and candidates.shape == (4, 64, 64)
    assert queries.dtype == torch.float32
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(4, 16))
    torch.testing.assert_close(candidates.norm(dim=-1), torch.ones(4, 64))
    assert not torch.allclose(queries[0], queries[1])  # content reaches the Meta Tokens
    assert maxsim(queries, candidates, "16x64").shape == (4, 4)


def test_budget_truncates_without_changing_vectors(model):
    full = model.encode_candidates(ITEMS)
    cut = model.encode_candidates(ITEMS, budget=Budget(4, 8))
    assert cut.shape == (4, 8, 64)
    torch.testing.assert_close(cut, full[:, :8])
    torch.testing.assert_close(model.encode_queries(ITEMS, budget="2x4"), model.encode_queries(ITEMS)[:, :2])


def test_an_item_encodes_the_same_alone_or_in_a_padded_batch(model):
    together = model.encode_queries(ITEMS, batch_size=4)
    for i, item in enumerate(ITEMS):
        torch.testing.assert_close(model.encode_queries([item])[0], together[i], rtol=1e-4, atol=1e-5)


def test_query_vectors_do_not_depend_on_candidate_meta_tokens(model):
    """Reference layout, causal attention: M_q precedes M_c, so changing M_c leaves queries unchanged."""
    queries, candidates = model.encode_queries(ITEMS[:2]), model.encode_candidates(ITEMS[:2])
    with torch.no_grad():
        model.meta_tokens.weight[16:] += 1.0
    torch.testing.assert_close(model.encode_queries(ITEMS[:2]), queries)
    assert not torch.allclose(model.encode_candidates(ITEMS[:2]), candidates)


def test_own_layout_gives_identical_queries_and_different_candidates(tiny_backbone):
    torch.manual_seed(3)
    reference = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"))
    own = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), meta_layout="own")
    own.load_state_dict(reference.state_dict())
    torch.testing.assert_close(own.encode_queries(ITEMS), reference.encode_queries(ITEMS), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(own.encode_candidates(ITEMS), reference.encode_candidates(ITEMS), atol=1e-3)
    assert (
        own.processor(ITEMS[:1], "query")["input_ids"].shape[1] + 64
        == (reference.processor(ITEMS[:1], "query")["input_ids"].shape[1])
    )


def test_gradients_reach_the_meta_tokens(model):
    model.train()
    queries = model(model.processor(ITEMS[:2], "query"), "query")
    candidates = model(model.processor(ITEMS[2:], "candidate"), "candidate")
    maxsim(queries, candidates, "4x8").sum().backward()
    grad = model.meta_tokens.weight.grad
    assert grad[:4].abs().sum() > 0  # query rows inside the budget
    assert grad[16:24].abs().sum() > 0  # candidate rows inside the budget
    assert grad[24:].abs().sum() == 0  # candidate rows outside the budget are not read
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_projection_sets_the_output_width(tiny_backbone):
    model = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), dim=24, num_query_tokens=4, num_candidate_tokens=8)
    assert model.embedding_dim == 24
    assert model.encode_candidates(ITEMS[:1]).shape == (1, 8, 24)
    with pytest.raises(BudgetError, match="allowed: 1 ≤ r_q ≤ 4, 1 ≤ r_c ≤ 8"):
        model.encode_queries(ITEMS[:1], budget="16x64")


def test_long_texts_are_truncated_to_max_text_tokens(tiny_backbone):
    model = MetaEmbedModel.from_backbone(tiny_backbone("qwen2_vl"), max_text_tokens=8)
    short = model.processor(["word " * 4], "candidate")["input_ids"].shape[1]
    long = model.processor(["word " * 500], "candidate")["input_ids"].shape[1]
    assert long <= short + 8
    assert model.encode_candidates(["word " * 500]).shape == (1, 64, 64)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([], "empty list"),
        ("just a string", "wrap a single item in a list"),
        ([42], "cannot encode a int"),
        ([{"caption": "x"}], "unknown keys"),
        ([{}], "neither 'text' nor 'image'"),
        ([{"text": 5}], "'text' must be a str"),
        (["ok", "bad \ud800 text"], "item 1: text is not valid Unicode"),
        ([{"text": "\udfff"}], "item 0: text is not valid Unicode"),
        ([Image.new("RGB", (402, 2))], r"item 0: image is 402×2; the aspect ratio must be at most 200:1"),
    ],
)
def test_bad_items_raise_input_errors(tiny_model, items, message):
    with pytest.raises(InputError, match=message):
        tiny_model.encode_queries(items)


def test_unreadable_and_missing_images_name_the_item(tiny_model, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(InputError, match=r"item 1: cannot read image .*broken\.png"):
        tiny_model.encode_candidates(["fine", broken])
    with pytest.raises(InputError, match=r"item 0: image file .*missing\.jpg.* does not exist"):
        tiny_model.encode_candidates([tmp_path / "missing.jpg"])


def test_image_files_encode_like_the_same_pil_image(tiny_model, tmp_path):
    image = picture(50, 50, 9)
    path = tmp_path / "x.png"
    image.save(path)
    torch.testing.assert_close(tiny_model.encode_candidates([path]), tiny_model.encode_candidates([image]))
