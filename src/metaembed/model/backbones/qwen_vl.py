"""Qwen2-VL and Qwen2.5-VL (transformers ``Qwen2VLModel`` / ``Qwen2_5_VLModel``).

Templates follow the official MetaEmbed processor (``use_simple_prompt``): a query is
``<|im_start|>user\\n[vision]Query: {text}<|im_end|><|endoftext|>`` + 10 × ``<|endoftext|>`` + ``\\n``;
a candidate drops ``Query: `` and the 10 augmentation tokens. Images go through the backbone's own
Qwen2-VL image processor (the PIL implementation: no torchvision needed), and M-RoPE positions are
recomputed on the extended ids, so Meta Tokens get ordinary 1-D text positions after the content.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from metaembed.model.backbones.base import Backbone, Processor, hidden_output
from metaembed.model.config import MetaEmbedConfig
from metaembed.model.items import Item
from metaembed.model.meta_tokens import Side

PAD = "<|endoftext|>"


class QwenVLProcessor(Processor):
    def __init__(self, tokenizer, image_processor, config: MetaEmbedConfig) -> None:
        super().__init__(tokenizer, config)
        self.image_processor = image_processor
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.merge_size = int(getattr(image_processor, "merge_size", 2))

    def save_pretrained(self, directory: Path) -> None:
        super().save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    def template(self, text: str, side: Side, image_tokens: int) -> str:
        vision = f"<|vision_start|>{'<|image_pad|>' * image_tokens}<|vision_end|>" if image_tokens else ""
        if side == "query":
            augmentation = PAD * self.config.query_augmentation_tokens
            return f"<|im_start|>user\n{vision}{self.config.query_prefix}{text}<|im_end|>{PAD}{augmentation}\n"
        return f"<|im_start|>user\n{vision}{text}<|im_end|>{PAD}\n"

    def __call__(self, items: Sequence[Item], side: Side, n_meta: int) -> dict[str, torch.Tensor]:
        images = [self._fit(item.image) for item in items if item.image is not None]
        vision = self.image_processor(images=images, return_tensors="pt") if images else {}
        tokens_per_image = iter((vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist() if images else [])
        texts = []
        for item in items:
            text = self.clean_text(item.text)
            if text is None:
                text = self.config.image_only_text
            texts.append(self.template(text, side, next(tokens_per_image) if item.image is not None else 0))
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        batch = self.pad_left(ids, n_meta)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        if images:
            batch["pixel_values"] = vision["pixel_values"]
            batch["image_grid_thw"] = vision["image_grid_thw"]
        return batch

    def _fit(self, image: Image.Image) -> Image.Image:
        """Upscale images below the minimum side (Qwen-VL's patch grid needs ≥ 28 px), keeping the aspect."""
        side = self.config.min_image_side
        if min(image.size) >= side:
            return image
        scale = side / min(image.size)
        return image.resize((max(side, round(image.width * scale)), max(side, round(image.height * scale))))


class QwenVLBackbone(Backbone):
    families = ("qwen2_vl", "qwen2_5_vl")
    # The official regex restricted to the language model (the vision tower stays as pretrained).
    lora_targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        return tuple(self.model.language_model.layers)

    @classmethod
    def load_processor(cls, path: str | Path, config: MetaEmbedConfig) -> QwenVLProcessor:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        # The PIL image processor is the one that works without torchvision (never install it here).
        return QwenVLProcessor(
            AutoTokenizer.from_pretrained(path), Qwen2VLImageProcessorPil.from_pretrained(path), config
        )

    def forward(
        self, batch: dict[str, torch.Tensor], meta_embeds: torch.Tensor, *, with_inputs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        position_ids, _ = self.model.get_rope_index(
            input_ids,
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=attention_mask,
        )
        outputs = self.model(
            input_ids=input_ids,  # only locates <|image_pad|> positions; embeddings come from inputs_embeds
            inputs_embeds=self.embed_with_meta(input_ids, meta_embeds),
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=batch.get("image_grid_thw"),
            mm_token_type_ids=batch["mm_token_type_ids"],
            use_cache=False,
            output_hidden_states=with_inputs,
        )
        return hidden_output(outputs, with_inputs)
