"""The MetaEmbed model: backbone adapters, Meta Tokens, processor templates, save/load."""

from __future__ import annotations

from metaembed.model.config import MetaEmbedConfig
from metaembed.model.items import Item
from metaembed.model.modeling import MetaEmbedModel

__all__ = ["Item", "MetaEmbedConfig", "MetaEmbedModel"]
