"""Tiny random Qwen2-VL / Qwen2.5-VL backbones (and a Gemma 3 text decoder) written to a local directory.

There is no model hub in tests or CI, so tests (and users checking an install) build a real
transformers VLM from a config — the same classes and code paths as Qwen/Qwen2-VL-2B, only smaller and
random — with a byte-level BPE tokenizer trained on the spot and the real Qwen2-VL image processor.
The directory then loads like any Hugging Face checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *VISION_TOKENS)
GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # Gemma's ids 0-4, in its order

# A little real text so the tokenizer learns ordinary merges (it is random otherwise).
_CORPUS = [
    "Query: a photo of a cat sitting on a red chair",
    "Describe the image. Represent the given image for classification.",
    "Find me an everyday image that matches the given caption: two dogs running on the beach.",
    "The quick brown fox jumps over the lazy dog. Retrieve an image of this news caption.",
    "Represent the given image with the following question: what colour is the bus?",
    "page 3: quarterly revenue grew by twelve percent while operating costs fell",
] * 4


def make_tokenizer(vocab_size: int = 1000):
    """A Qwen2 fast tokenizer (byte-level BPE) with the Qwen-VL special tokens, trained in well under a second."""
    from transformers import Qwen2TokenizerFast

    bpe = _train_bpe(SPECIAL_TOKENS, vocab_size)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=bpe, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def make_tiny_gemma3_text(directory: str | Path, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny random Gemma 3 text decoder (``Gemma3TextModel``) with a Gemma-style tokenizer.

    The same classes as Gemma 3 270M — scaled embeddings, sliding and full attention layers — so the
    gemma-mini backbone runs its real code paths on it (``make_gemma_mini_backbone(dir, decoder=...)``).
    """
    from transformers import Gemma3TextConfig, Gemma3TextModel, PreTrainedTokenizerFast

    directory = Path(directory)
    pad, eos, bos, unk, mask = GEMMA_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(GEMMA_SPECIAL_TOKENS, 1000),
        pad_token=pad,
        eos_token=eos,
        bos_token=bos,
        unk_token=unk,
        mask_token=mask,
    )
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=hidden_size // 4,
        layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"],
        sliding_window=512,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    Gemma3TextModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _train_bpe(special_tokens: tuple[str, ...], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    return bpe


def make_tiny_backbone(
    directory: str | Path,
    family: str = "qwen2_vl",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    max_pixels: int = 112 * 112,
) -> Path:
    """Write a tiny random ``family`` ("qwen2_vl" or "qwen2_5_vl") VLM with tokenizer and image processor.

    Returns the directory, loadable with ``MetaEmbedModel.from_backbone(directory)``.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2VLConfig, Qwen2VLModel
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    directory = Path(directory)
    tokenizer = make_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    head_dim = hidden_size // 4
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "mrope_section": _mrope_section(head_dim), "rope_theta": 10000.0},
        max_position_embeddings=2048,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
    )
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    common_vision = dict(num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    torch.manual_seed(seed)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2, **common_vision)
        model = Qwen2VLModel(Qwen2VLConfig(text_config=text, vision_config=vision, **tokens))
    elif family == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=hidden_size,
            intermediate_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
            **common_vision,
        )
        model = Qwen2_5_VLModel(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens))
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose 'qwen2_vl' or 'qwen2_5_vl'")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels).save_pretrained(directory)
    return directory


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (temporal, height, width) like Qwen's [16, 24, 24]."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]
