"""The backbone protocol: one small adapter per model family.

An adapter owns two things: a :class:`Processor` that turns items into padded tensors (with the
Meta-Token slots already appended) and a :class:`Backbone` module whose forward writes the Meta-Token
embeddings into those slots and returns the last hidden states. Everything else — read-out,
projection, normalisation, save/load — is shared in :class:`~metaembed.model.MetaEmbedModel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from metaembed.errors import InputError
from metaembed.model.config import MetaEmbedConfig
from metaembed.model.items import Item
from metaembed.model.meta_tokens import Side

IMAGE_PLACEHOLDER = "<|image_1|>\n"  # MMEB / MoCa write this into texts; images enter through the template


class Processor:
    """Items → a left-padded batch whose last ``n_meta`` positions are Meta-Token slots."""

    def __init__(self, tokenizer, config: MetaEmbedConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.pad_token_id = _pad_id(tokenizer)

    def __call__(self, items: Sequence[Item], side: Side, n_meta: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save_pretrained(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(directory)

    def clean_text(self, text: str | None) -> str | None:
        """Drop the MMEB image placeholder and cut the text to ``max_text_tokens`` tokens."""
        if text is None:
            return None
        text = text.replace(IMAGE_PLACEHOLDER, "").replace("<|image_1|>", "")
        limit = self.config.max_text_tokens
        if len(text) > limit:  # a token is at least one character: shorter texts cannot exceed the limit
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > limit:
                text = self.tokenizer.decode(ids[:limit])
        return text

    def pad_left(self, sequences: list[list[int]], n_meta: int) -> dict[str, torch.Tensor]:
        """Append ``n_meta`` slot ids to each sequence, then left-pad: the slots end every row."""
        rows = [seq + [self.pad_token_id] * n_meta for seq in sequences]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class Backbone(nn.Module):
    """Wraps a transformers model; ``forward`` returns last hidden states ``(B, T, H)``."""

    families: ClassVar[tuple[str, ...]] = ()
    # peft target_modules for LoRA: the language model's projections (the official recipe's targets).
    lora_targets: ClassVar[str | list[str]] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | None) -> Backbone:
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(path, dtype=dtype))

    @classmethod
    def load_processor(cls, path: str | Path, config: MetaEmbedConfig) -> Processor:
        raise NotImplementedError

    def decoder_layers(self) -> Sequence[nn.Module]:
        """The language model's transformer layers in order: the units a sharded (FSDP) run splits over its
        processes. Empty where the adapter does not name them (that backbone then trains replicated only)."""
        return ()

    def save_pretrained(self, directory: Path) -> None:
        """Save the base weights (a LoRA adapter, if any, is saved separately by the model)."""
        self.model.save_pretrained(directory, state_dict=base_state_dict(self.model))

    def embed_with_meta(self, input_ids: torch.Tensor, meta_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the last ``meta_embeds.shape[1]`` positions replaced by the Meta Tokens."""
        embeds = self.model.get_input_embeddings()(input_ids)
        n_meta = meta_embeds.shape[1]
        if n_meta == 0:  # pooling baselines carry no Meta Tokens
            return embeds
        return torch.cat([embeds[:, :-n_meta], meta_embeds.to(embeds.dtype)], dim=1)

    def forward(
        self, batch: dict[str, torch.Tensor], meta_embeds: torch.Tensor, *, with_inputs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, H)`` last hidden states; with ``with_inputs`` also the states entering the first layer
        (the embedding layer's output), for read-outs that pool token-local features (``slot_values``)."""
        raise NotImplementedError


def hidden_output(outputs, with_inputs: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """What :meth:`Backbone.forward` returns from a transformers output run with ``output_hidden_states``."""
    if with_inputs:
        return outputs.last_hidden_state, outputs.hidden_states[0]
    return outputs.last_hidden_state


def base_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights without LoRA adapters, under their original (pre-injection) names."""
    return {
        name.replace(".base_layer.", "."): tensor for name, tensor in module.state_dict().items() if "lora_" not in name
    }


def require_text_only(items: Sequence[Item], family: str) -> None:
    for i, item in enumerate(items):
        if item.image is not None:
            raise InputError(f"item {i}: backbone family {family!r} reads text only; this item has an image")


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
