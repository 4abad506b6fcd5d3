"""Backbone adapters, one small file per family, found by family name."""

from __future__ import annotations

from metaembed.model.backbones.base import Backbone, Processor
from metaembed.model.backbones.qwen_vl import QwenVLBackbone
from metaembed.model.backbones.text import TextBackbone

ADAPTERS: tuple[type[Backbone], ...] = (QwenVLBackbone, TextBackbone)
FAMILIES: dict[str, type[Backbone]] = {family: adapter for adapter in ADAPTERS for family in adapter.families}


def adapter_for(family: str) -> type[Backbone]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown backbone family {family!r}; known: {sorted(FAMILIES)}") from None


def detect_family(model_type: str) -> str:
    """The adapter family for a transformers ``config.model_type``: Qwen-VL by name, else the text path."""
    return model_type if model_type in FAMILIES else "text"


__all__ = ["ADAPTERS", "FAMILIES", "Backbone", "Processor", "adapter_for", "detect_family"]
