"""The memory estimate's sizes against the real thing: parameter and LoRA counts of a transformers Qwen2.5-VL
built from a config, the bytes autograd keeps per token and decoder layer (measured with saved-tensor hooks),
the published sizes of the 3B and 7B checkpoints, and the strategy arithmetic on the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metaembed.errors import MetaEmbedError
from metaembed.train.footprint import (
    QWEN2_5_VL,
    QwenVLShape,
    RunShape,
    backbone_parameters,
    estimate,
    layer_activation_bytes,
    lora_parameters,
)
from metaembed.train.recipe import load_recipe

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture(scope="module")
def qwen25(tiny_backbone):
    """A tiny random Qwen2.5-VL (transformers' own class) and the shape read from its config."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_backbone("qwen2_5_vl"))
    text, vision = model.config.text_config, model.config.vision_config
    shape = QwenVLShape(
        text.vocab_size,
        text.hidden_size,
        text.intermediate_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.num_key_value_heads,
        vision_depth=vision.depth,
        vision_hidden=vision.hidden_size,
        vision_intermediate=vision.intermediate_size,
        spatial_merge=vision.spatial_merge_size,
        patch_size=vision.patch_size,
        temporal_patch=vision.temporal_patch_size,
    )
    return model, shape


def _with_lora(model, r: int, dropout: float):
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    from metaembed.model.backbones.qwen_vl import QwenVLBackbone

    model = copy.deepcopy(model)
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=dropout, target_modules=QwenVLBackbone.lora_targets)
    inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "lora_" in name
    return model.train()


def test_parameter_and_lora_counts_equal_the_transformers_model(qwen25):
    model, shape = qwen25
    assert backbone_parameters(shape) == sum(p.numel() for p in model.parameters())
    adapted = _with_lora(model, 4, 0.0)
    assert lora_parameters(shape, 4) == sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n)


def test_published_sizes_of_the_3b_and_7b_checkpoints():
    three, seven = QWEN2_5_VL["Qwen/Qwen2.5-VL-3B-Instruct"], QWEN2_5_VL["Qwen/Qwen2.5-VL-7B-Instruct"]
    assert round(backbone_parameters(three) / 1e9, 2) == 3.75  # tied head: the count on its model page
    assert round((backbone_parameters(seven) + seven.vocab_size * seven.hidden_size) / 1e9, 2) == 8.29  # + head


def _saved_bytes_per_token(model, layers: int, tokens: int) -> int:
    """Bytes of the tensors autograd keeps in a forward of the first ``layers`` decoder layers (weights aside)."""
    language = model.language_model
    everything = language.layers
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def keep(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    language.layers = torch.nn.ModuleList(everything[:layers])
    try:
        torch.manual_seed(0)
        ids = torch.randint(0, language.config.vocab_size, (1, tokens))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            language(input_ids=ids, use_cache=False)
    finally:
        language.layers = everything
    return sum(seen.values()) / tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_bytes_per_token_and_layer_are_what_autograd_keeps(qwen25, dtype, dropout):
    model, shape = qwen25
    adapted = _with_lora(model, 4, dropout).to(dtype)
    # the second layer, whose input carries gradient (the first one's input, frozen embeddings, does not)
    measured = _saved_bytes_per_token(adapted, 2, 64) - _saved_bytes_per_token(adapted, 1, 64)
    size = torch.tensor([], dtype=dtype).element_size()
    assert measured == layer_activation_bytes(shape, size, 4, dropout > 0, mask_bytes=size)  # CPU masks: dtype
    adapted.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    kept = _saved_bytes_per_token(adapted, 2, 64) - _saved_bytes_per_token(adapted, 1, 64)
    assert kept == shape.hidden_size * size  # checkpointed: only the layer's input


def test_sharding_divides_the_static_memory_and_gradcache_the_activations():
    recipe = load_recipe(RECIPES / "metaembed-7b.yaml", ["train.cache_chunk_size=null"])
    run = RunShape.from_recipe(recipe, content_tokens=512)
    ddp, fsdp = estimate(run, "ddp", 8), estimate(run, "fsdp", 8)
    shape = QWEN2_5_VL["Qwen/Qwen2.5-VL-7B-Instruct"]
    trainable = lora_parameters(shape, 32) + 80 * shape.hidden_size
    assert ddp.weights == (backbone_parameters(shape) + trainable) * 2  # bf16
    assert (ddp.gradients, ddp.optimizer) == (4 * trainable, 4 * trainable)
    assert (fsdp.gradients, fsdp.optimizer) == (2 * trainable // 8, 4 * trainable // 8)
    assert ddp.weights / 8 < fsdp.weights < ddp.weights / 2  # the root (embeddings, vision) stays whole
    assert ddp.activations == fsdp.activations
    chunked = estimate(
        RunShape.from_recipe(load_recipe(RECIPES / "metaembed-7b.yaml", ["train.cache_chunk_size=16"]), 512), "fsdp", 8
    )
    assert chunked.activations < fsdp.activations / 8  # 16 items at a time instead of 48 + 96


def test_the_estimate_names_what_it_cannot_size():
    with pytest.raises(MetaEmbedError, match="no config numbers for 'Qwen/Qwen2-VL-2B-Instruct'"):
        RunShape.from_recipe(
            load_recipe(RECIPES / "metaembed-7b.yaml", ["model.backbone=Qwen/Qwen2-VL-2B-Instruct"]), 512
        )
    with pytest.raises(MetaEmbedError, match="covers LoRA runs"):
        RunShape.from_recipe(load_recipe(RECIPES / "metaembed-7b.yaml", ["lora.enabled=false"]), 512)
    with pytest.raises(MetaEmbedError, match="strategy must be ddp or fsdp"):
        estimate(RunShape.from_recipe(load_recipe(RECIPES / "metaembed-7b.yaml"), 512), "zero3", 8)


def test_the_table_in_the_docs_is_what_the_benchmark_prints():
    import runpy

    benchmark = runpy.run_path(str(RECIPES.parent / "benchmarks" / "train_memory.py"))
    assert benchmark["table"](8, 512, 16) in (RECIPES.parent / "docs" / "train.md").read_text()
