from __future__ import annotations

import json
import shutil

import pytest
import torch

from metaembed import CheckpointError, MetaEmbedModel

ITEMS = ["a red bicycle", {"text": "two dogs"}]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_save_and_load_reproduce_embeddings_exactly(tiny_backbone, tmp_path, family):
    torch.manual_seed(1)
    model = MetaEmbedModel.from_backbone(tiny_backbone(family), dim=32)
    path = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "backbone", "config.json", "model.safetensors"]
    loaded = MetaEmbedModel.from_pretrained(path)
    assert loaded.config == model.config
    assert torch.equal(loaded.encode_queries(ITEMS), model.encode_queries(ITEMS))
    assert torch.equal(loaded.encode_candidates(ITEMS), model.encode_candidates(ITEMS))


def test_model_card_has_the_budget_table(tiny_model, tmp_path):
    path = tiny_model.save_pretrained(tmp_path / "ckpt", quality={"16x64": {"P@1": 0.5}})
    card = (path / "README.md").read_text()
    assert "| 1x1 | 128 | 128 | – |" in card  # D=64: 1·64·2 bytes, 2·1·1·64 FLOPs
    assert "| 16x64 | 8,192 | 131,072 | 0.5 |" in card


def test_saving_over_a_checkpoint_replaces_it_only_when_complete(tiny_model, tmp_path, monkeypatch):
    path = tiny_model.save_pretrained(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    with torch.no_grad():
        tiny_model.meta_tokens.weight += 1

    def crash(directory):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_model.backbone, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_model.save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging debris


def test_missing_directory_and_offline_hub_ids_are_checkpoint_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist"):
        MetaEmbedModel.from_pretrained(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot download 'someone/metaembed-7b'"):
        MetaEmbedModel.from_pretrained("someone/metaembed-7b")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda p: (p / "config.json").unlink(), "config.json is missing"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00\x01truncated"), "cannot read .*model.safetensors"),
        (lambda p: (p / "config.json").write_text("{not json"), "cannot read .*config.json"),
        (lambda p: (p / "config.json").write_text('{"model_type": "bert"}'), "is not a metaembed config"),
        (lambda p: _edit_config(p, num_candidate_tokens=32), r"holds \['meta_tokens.weight'\]|has shape"),
        (lambda p: _edit_config(p, dim=16), "expected .*projection"),
        (lambda p: _edit_config(p, colour="red"), "unknown keys"),
        (lambda p: (p / "backbone" / "config.json").unlink(), "cannot load backbone from"),
        (lambda p: shutil.rmtree(p / "backbone"), "backbone directory .* is missing"),
    ],
)
def test_broken_checkpoints_raise_checkpoint_errors(tiny_model, tmp_path, damage, message):
    path = tiny_model.save_pretrained(tmp_path / "ckpt")
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        MetaEmbedModel.from_pretrained(path)


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_bf16_loading(tiny_model, tmp_path):
    path = tiny_model.save_pretrained(tmp_path / "ckpt")
    model = MetaEmbedModel.from_pretrained(path, torch_dtype="bfloat16")
    assert model.meta_tokens.weight.dtype == torch.bfloat16
    out = model.encode_queries(ITEMS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, tiny_model.encode_queries(ITEMS), atol=0.1, rtol=0.1)
    with pytest.raises(ValueError, match="torch_dtype must be a floating dtype"):
        MetaEmbedModel.from_pretrained(path, torch_dtype="int8")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_lora_trains_only_adapter_meta_tokens_and_projection_and_round_trips(tiny_backbone, tmp_path, family):
    from metaembed import maxsim

    torch.manual_seed(2)
    model = MetaEmbedModel.from_backbone(tiny_backbone(family), dim=16)
    model.add_lora(r=4, alpha=8, dropout=0.0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("meta_tokens", "projection")) for n in trainable)
    assert any(".language_model." in n and "lora_" in n for n in trainable)
    assert not any(".visual." in n for n in trainable)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        model.add_lora()

    model.train()
    loss = -maxsim(
        model(model.processor(ITEMS, "query"), "query"), model(model.processor(ITEMS, "candidate"), "candidate")
    ).trace()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():  # make the adapter non-trivial, as training would
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)

    path = model.save_pretrained(tmp_path / "ckpt")
    assert (path / "adapter.safetensors").is_file()
    loaded = MetaEmbedModel.from_pretrained(path)
    assert loaded.config.lora == model.config.lora
    assert torch.equal(loaded.encode_queries(ITEMS), model.encode_queries(ITEMS))
    fresh = MetaEmbedModel.from_backbone(tiny_backbone(family), dim=16)
    fresh.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "lora_" not in k and "base_layer" not in k}, strict=False
    )
    assert not torch.allclose(fresh.encode_queries(ITEMS), model.encode_queries(ITEMS))  # the adapter matters


def test_missing_adapter_file_is_a_checkpoint_error(tiny_model, tmp_path):
    tiny_model.add_lora(r=2)
    path = tiny_model.save_pretrained(tmp_path / "ckpt")
    (path / "adapter.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"adapter\.safetensors is missing"):
        MetaEmbedModel.from_pretrained(path)
