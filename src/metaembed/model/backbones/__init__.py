"""Backbone adapters, one small file per family, found by family name."""

from __future__ import annotations

from pathlib import Path

from metaembed.model.backbones.base import Backbone, Processor
from metaembed.model.backbones.gemma_mini import GemmaMiniBackbone, is_gemma_mini_backbone
from metaembed.model.backbones.mini import MiniBackbone, is_mini_backbone
from metaembed.model.backbones.qwen_vl import QwenVLBackbone
from metaembed.model.backbones.text import TextBackbone

ADAPTERS: tuple[type[Backbone], ...] = (QwenVLBackbone, MiniBackbone, GemmaMiniBackbone, TextBackbone)
FAMILIES: dict[str, type[Backbone]] = {family: adapter for adapter in ADAPTERS for family in adapter.families}


def adapter_for(family: str) -> type[Backbone]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown backbone family {family!r}; known: {sorted(FAMILIES)}") from None


def detect_family(name_or_path: str | Path) -> str:
    """The adapter family of a backbone directory or hub id: mini and gemma-mini by their settings files,
    Qwen-VL by ``config.model_type``, anything else through the text path."""
    if is_mini_backbone(name_or_path):
        return "mini"
    if is_gemma_mini_backbone(name_or_path):
        return "gemma-mini"
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    return model_type if model_type in FAMILIES else "text"


__all__ = ["ADAPTERS", "FAMILIES", "Backbone", "Processor", "adapter_for", "detect_family"]
