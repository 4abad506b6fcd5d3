"""The model a recipe trains: its backbone resolved, Meta Tokens and read-out fresh or from a checkpoint,
LoRA added, a warm start copied in — and, from a checkpoint's trained tensors, the finished model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from metaembed.errors import CheckpointError
from metaembed.train.loss import TrainConfigError, variant_pooling
from metaembed.train.recipe import Recipe

log = logging.getLogger("metaembed.train")


def build_model(recipe: Recipe, workdir: Path):
    """The model a recipe trains: fresh Meta Tokens on a backbone (or a checkpoint), LoRA, pooling."""
    from metaembed import MetaEmbedModel

    m = recipe.model
    pooling = variant_pooling(recipe.loss.variant)
    if m.init_from:
        model = MetaEmbedModel.from_pretrained(m.init_from, torch_dtype=m.torch_dtype)
        if model.config.pooling != pooling:
            raise TrainConfigError(
                f"model.init_from has pooling {model.config.pooling!r} but loss.variant "
                f"{recipe.loss.variant!r} trains {pooling!r}"
            )
    else:
        model = MetaEmbedModel.from_backbone(
            resolve_backbone(m.backbone, workdir),
            family=m.family,
            torch_dtype=m.torch_dtype,
            num_query_tokens=m.num_query_tokens,
            num_candidate_tokens=m.num_candidate_tokens,
            dim=m.dim,
            meta_layout=m.meta_layout,
            max_text_tokens=m.max_text_tokens,
            pooling=pooling,
            meta_anchor=m.meta_anchor if pooling == "meta" else None,  # baselines of the same recipe: no anchor
            slot_values=m.slot_values if pooling == "meta" and m.meta_anchor == "slots" else "states",
            lone_slot=m.lone_slot if pooling == "meta" and m.meta_anchor == "slots" else "mean",
            meta_init=m.meta_init if pooling == "meta" else "normal",
        )
    lora = recipe.lora
    if lora.enabled and model.config.lora is None:
        model.add_lora(lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.init_lora_weights)
    elif not lora.enabled and model.config.lora is None:
        frozen = getattr(model.backbone, "vision", None)
        for parameter in model.backbone.parameters():
            parameter.requires_grad = True
        if frozen is not None:  # the mini backbone's cached vision tower stays frozen
            frozen.requires_grad_(False)
    model.meta_tokens.weight.requires_grad = pooling == "meta"  # baselines carry no Meta Tokens
    if m.warm_start:
        warm_start(model, m.warm_start)
    if recipe.train.gradient_checkpointing:
        model.backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def warm_start(model, source_dir: str) -> int:
    """Copies the trained backbone weights (LoRA adapter, the mini projector) of the model in ``source_dir``
    into ``model``'s trainable backbone parameters of the same name; Meta Tokens and read-out stay fresh.

    Why: a new read-out (other anchor, more text tokens, larger pages) need not relearn the text↔image
    alignment an earlier run already paid for. Every trainable backbone tensor must be found with the
    same shape, so a different LoRA rank or backbone is an error, not a silent partial copy.
    """
    from metaembed import MetaEmbedModel

    source = MetaEmbedModel.from_pretrained(source_dir).backbone.state_dict()
    targets = {name: p for name, p in model.backbone.named_parameters() if p.requires_grad}
    missing = [name for name, p in targets.items() if name not in source or source[name].shape != p.shape]
    if missing:
        raise TrainConfigError(
            f"model.warm_start {source_dir}: {len(missing)} of {len(targets)} trainable backbone tensors have "
            f"no match of the same shape there (e.g. {missing[0]}); same backbone and LoRA settings needed"
        )
    with torch.no_grad():
        for name, parameter in targets.items():
            parameter.copy_(source[name].to(parameter.dtype))
    log.info("warm start: %d backbone tensors from %s", len(targets), source_dir)
    return len(targets)


def trained_model(recipe: Recipe, workdir: Path, tensors: dict[str, torch.Tensor]):
    """The recipe's model, built whole on this process, with the trained ``tensors`` (a checkpoint's
    ``trainable.safetensors``) copied in: how a sharded run writes its final model, and how any checkpoint
    becomes a model directory. Frozen weights come from the backbone files, as in training."""
    model = build_model(recipe, workdir)
    parameters = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(parameters))
    if unknown:
        raise CheckpointError(f"trained tensors not in the recipe's model: {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor.to(parameters[name].dtype))
    return model


def resolve_backbone(spec: str, workdir: Path) -> str:
    """A backbone directory for ``spec``: ``tiny:FAMILY``, ``mini[:SIZE]`` and ``gemma-mini[:SIZE]`` are built
    under ``workdir``."""
    if spec.startswith("tiny:"):
        from metaembed.model.tiny import make_tiny_backbone

        target = workdir / f"backbone-tiny-{spec[5:]}"
        if not (target / "config.json").is_file():
            make_tiny_backbone(target, spec[5:])
        return str(target)
    family, _, size = spec.partition(":")
    if family in ("mini", "gemma-mini"):  # the pip-tower backbones: a settings file, the image size in the name
        from metaembed.model.backbones.gemma_mini import make_gemma_mini_backbone
        from metaembed.model.backbones.mini import make_mini_backbone

        make = make_mini_backbone if family == "mini" else make_gemma_mini_backbone
        size = int(size) if size else 128
        return str(make(workdir / f"backbone-{family}-{size}", image_size=size))
    return spec
