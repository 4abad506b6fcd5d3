from __future__ import annotations

import pytest
import torch
from PIL import Image

from metaembed import InputError, MetaEmbedModel
from metaembed.model.meta_tokens import meta_slots


def decode(model, batch, row=0):
    ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
    return model.processor_impl.tokenizer.decode(ids[: -80 if model.config.meta_layout == "reference" else None])


def test_query_and_candidate_templates_follow_the_reference(tiny_model):
    query = decode(tiny_model, tiny_model.processor(["a cat"], "query"))
    candidate = decode(tiny_model, tiny_model.processor(["a cat"], "candidate"))
    assert query == "<|im_start|>user\nQuery: a cat<|im_end|>" + "<|endoftext|>" * 11 + "\n"
    assert candidate == "<|im_start|>user\na cat<|im_end|><|endoftext|>\n"


def test_image_only_items_get_the_describe_text_and_one_pad_per_merged_patch(tiny_model):
    batch = tiny_model.processor([Image.new("RGB", (56, 84))], "candidate")
    text = decode(tiny_model, batch)
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith("<|vision_end|>Describe the image.<|im_end|><|endoftext|>\n")
    n_pads = int(batch["mm_token_type_ids"].sum())
    assert n_pads == int(batch["image_grid_thw"].prod()) // 4 == 6  # 56×84 px → 4×6 patches → 2×3 merged
    assert torch.equal(
        batch["mm_token_type_ids"].bool(), batch["input_ids"] == tiny_model.processor_impl.image_token_id
    )


def test_tiny_images_are_upscaled_to_the_minimum_side(tiny_model):
    batch = tiny_model.processor([Image.new("RGB", (5, 12))], "candidate")
    assert batch["image_grid_thw"][:, 1:].min() >= 2  # at least 28 px on each side


def test_mmeb_image_placeholder_is_stripped(tiny_model):
    text = decode(tiny_model, tiny_model.processor(["<|image_1|>\nRepresent the given image."], "candidate"))
    assert "<|image_1|>" not in text and "Represent the given image." in text


def test_batches_are_left_padded_and_end_with_the_meta_slots(tiny_model):
    batch = tiny_model.processor(["a", "a much longer text with many more words in it"], "query")
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[:, -80:].all()
    assert (mask.cumsum(-1) > 0).eq(mask.bool()).all()  # zeros only before the content


@pytest.mark.parametrize(
    ("side", "layout", "rows", "readout"),
    [
        ("query", "reference", range(80), slice(0, 16)),
        ("candidate", "reference", range(80), slice(16, 80)),
        ("query", "own", range(16), slice(0, 16)),
        ("candidate", "own", range(16, 80), slice(0, 64)),
    ],
)
def test_meta_slots(side, layout, rows, readout):
    slots = meta_slots(side, layout, 16, 64)
    assert slots.rows == rows and slots.readout == readout


def test_meta_slots_reject_unknown_sides_and_layouts():
    with pytest.raises(ValueError, match="side must be"):
        meta_slots("document", "reference", 16, 64)
    with pytest.raises(ValueError, match="unknown meta layout"):
        meta_slots("query", "interleaved", 16, 64)


def test_text_backbone_path(tmp_path):
    """Any decoder that accepts inputs_embeds: a tiny random Qwen2 with the tiny tokenizer."""
    from transformers import Qwen2Config, Qwen2Model

    from metaembed.model.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    Qwen2Model(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = MetaEmbedModel.from_backbone(tmp_path, num_query_tokens=4, num_candidate_tokens=8)
    assert model.config.backbone_family == "text"
    texts = ["a cat", "a considerably longer sentence about dogs"]
    together = model.encode_queries(texts)
    assert together.shape == (2, 4, 32)
    torch.testing.assert_close(model.encode_queries(texts[:1])[0], together[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="reads text only"):
        model.encode_candidates([Image.new("RGB", (30, 30))])
    reloaded = MetaEmbedModel.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    torch.testing.assert_close(reloaded.encode_queries(texts), together)
