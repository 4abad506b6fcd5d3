"""Where a checkpoint lives and in which dtype to load it: the arguments of ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch

from metaembed.errors import CheckpointError


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local checkpoint directory, or a Hugging Face hub id ``owner/name`` downloaded to the hub cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"checkpoint directory {text!r} does not exist (and it is not a hub id 'owner/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text))
    except Exception as error:  # offline, unknown repo, auth: the hub library raises many types
        raise CheckpointError(f"cannot download {text!r} from the Hugging Face hub: {error}") from error


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``torch_dtype`` of ``from_pretrained``: a floating dtype, its name, or ``None`` (keep the stored one)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        dtype = getattr(torch, str(value).replace("torch.", ""))
    except AttributeError:
        dtype = None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating dtype like 'float32' or 'bfloat16', got {value!r}")
    return dtype
