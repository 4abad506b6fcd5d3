"""Any text model that accepts ``inputs_embeds`` (Qwen2, Llama, Gemma, BERT/MiniLM, ...), via AutoModel.

A query is ``query_prefix + text``, a candidate its text, tokenised with the model's own special
tokens. Position ids are recomputed from the attention mask so left padding does not shift them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import torch

from metaembed.model.backbones.base import Backbone, Processor, hidden_output, require_text_only
from metaembed.model.config import MetaEmbedConfig
from metaembed.model.items import Item
from metaembed.model.meta_tokens import Side


class TextProcessor(Processor):
    def __call__(self, items: Sequence[Item], side: Side, n_meta: int) -> dict[str, torch.Tensor]:
        require_text_only(items, "text")
        prefix = self.config.query_prefix if side == "query" else ""
        texts = [prefix + (self.clean_text(item.text) or "") for item in items]
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        return self.pad_left(ids, n_meta)


class TextBackbone(Backbone):
    families = ("text",)
    # Llama/Qwen-style projections, and BERT-style attention (query/key/value) and dense layers.
    lora_targets = (*Backbone.lora_targets, "query", "key", "value", "dense")

    def __init__(self, model) -> None:
        super().__init__(model)
        self._takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def load_processor(cls, path: str | Path, config: MetaEmbedConfig) -> TextProcessor:
        from transformers import AutoTokenizer

        return TextProcessor(AutoTokenizer.from_pretrained(path), config)

    def forward(
        self, batch: dict[str, torch.Tensor], meta_embeds: torch.Tensor, *, with_inputs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        attention_mask = batch["attention_mask"]
        kwargs = {}
        if self._takes_position_ids:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        outputs = self.model(
            inputs_embeds=self.embed_with_meta(batch["input_ids"], meta_embeds),
            attention_mask=attention_mask,
            **kwargs,
            output_hidden_states=with_inputs,
        )
        return hidden_output(outputs, with_inputs)
