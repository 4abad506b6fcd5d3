"""The configuration a MetaEmbed checkpoint is saved with (``config.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from metaembed.errors import CheckpointError

MODEL_TYPE = "metaembed"
META_LAYOUTS = ("reference", "own")


@dataclass
class MetaEmbedConfig:
    """Everything besides weights that decides what a MetaEmbed model computes.

    Attributes:
        backbone_family: adapter in ``metaembed.model.backbones`` ("qwen2_vl", "qwen2_5_vl", "text").
        num_query_tokens: R_q, query-side Meta Tokens (paper: 16).
        num_candidate_tokens: R_c, candidate-side Meta Tokens (paper: 64).
        dim: output width of an optional linear projection; ``None`` keeps the hidden size (the paper's
            main configuration).
        meta_layout: "reference" appends all R_q + R_c Meta Tokens to every input (the official code);
            "own" appends only the side's own tokens. Under causal attention the query vectors are
            identical either way (M_q precedes M_c), so "own" only makes queries cheaper; candidates
            differ (M_c no longer attends to M_q), so a model must be trained with the layout it serves.
        query_prefix: text put before a query's text (reference: "Query: ").
        query_augmentation_tokens: pad tokens appended to queries, ColPali-style (reference: 10).
        image_only_text: the text an image-only item is given (reference: "Describe the image.").
        max_text_tokens: longer texts are truncated to this many tokens before templating.
        min_image_side: smaller images are upscaled to this side (Qwen-VL needs ≥ 28 px).
        backbone_path: where the backbone weights live, relative to the checkpoint directory.
        lora: the peft ``LoraConfig`` arguments of the backbone's LoRA adapter, or ``None`` without one.
        pooling: how the output vectors are read. "meta" (MetaEmbed): the Meta-Token states. The paper's
            baselines append no Meta Tokens: "last" = the last token's state (one vector), "mean" = masked
            mean over valid tokens (one vector), "split-X" = the valid tokens cut into X contiguous chunks,
            each mean-pooled (X vectors per item), or "split-QxC" for Q query and C candidate chunks.
        meta_anchor: ``None`` (the paper): vector i is Meta Token i's last state. ``"mean"``: vector i is
            the masked mean of the content states plus a zero-initialised linear map of Meta Token i's state,
            so a fresh model starts exactly at mean pooling and training adds what each Meta Token learns.
            For backbones whose pretrained read-out is the mean (sentence encoders such as the mini model's
            MiniLM), where Meta Tokens learned from scratch lag far behind it (docs/results.md).
            ``"slots"``: as ``"mean"``, but vector i starts from the content averaged with the attention
            weights Meta Token i wins against the other Meta Tokens of its ladder group (candidates
            [0,1) [1,4) [4,8) [8,16) [16,64), queries [0,1) [1,2) [2,4) [4,8) [8,16)): the slots of a
            group split each content token between them, so their vectors cannot all be the same mean
            (``metaembed.model.readout``). Vector 0, alone in its group, starts at the content mean.
        slot_values: what the slot read-out (``meta_anchor: "slots"``) averages over the content tokens:
            ``"states"``, their last hidden states; ``"states+inputs"``, those plus the states entering the
            first layer. Attention mixes tokens on the way up, so the last states of a page's cells resemble
            each other; the first layer's input still holds each cell's own picture, which is what lets the
            slots of a larger budget keep different parts of a page apart.
        lone_slot: how a slot alone in its ladder group (candidate vector 0, query vectors 0 and 1) reads the
            content under ``meta_anchor: "slots"``: ``"mean"``, the plain content mean; ``"attention"``, a
            softmax over the content tokens with the slot's own query, so only a loss that scores the first
            vector alone teaches it to summarise the whole item.
    """

    backbone_family: str
    num_query_tokens: int = 16
    num_candidate_tokens: int = 64
    dim: int | None = None
    meta_layout: str = "reference"
    query_prefix: str = "Query: "
    query_augmentation_tokens: int = 10
    image_only_text: str = "Describe the image."
    max_text_tokens: int = 1024
    min_image_side: int = 28
    backbone_path: str = "backbone"
    lora: dict | None = None
    pooling: str = "meta"
    meta_anchor: str | None = None
    slot_values: str = "states"
    lone_slot: str = "mean"

    def __post_init__(self) -> None:
        pooled_vectors(self.pooling, "query", self.num_query_tokens, self.num_candidate_tokens)  # validates
        if self.meta_layout not in META_LAYOUTS:
            raise ValueError(f"meta_layout must be one of {META_LAYOUTS}, got {self.meta_layout!r}")
        if self.meta_anchor not in META_ANCHORS:
            raise ValueError(f"meta_anchor must be one of {META_ANCHORS}, got {self.meta_anchor!r}")
        if self.slot_values not in SLOT_VALUES:
            raise ValueError(f"slot_values must be one of {SLOT_VALUES}, got {self.slot_values!r}")
        if self.slot_values != "states" and self.meta_anchor != "slots":
            raise ValueError(f"slot_values={self.slot_values!r} applies to meta_anchor='slots' only")
        if self.lone_slot not in LONE_SLOTS:
            raise ValueError(f"lone_slot must be one of {LONE_SLOTS}, got {self.lone_slot!r}")
        if self.lone_slot != "mean" and self.meta_anchor != "slots":
            raise ValueError(f"lone_slot={self.lone_slot!r} applies to meta_anchor='slots' only")
        if self.meta_anchor is not None and self.pooling != "meta":
            raise ValueError(f"meta_anchor applies to Meta-Token pooling only, not pooling={self.pooling!r}")
        for name in ("num_query_tokens", "num_candidate_tokens", "max_text_tokens", "min_image_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be a positive int or None, got {self.dim}")

    def vectors(self, side: str) -> int:
        """How many output vectors an item on ``side`` gets under this config's pooling."""
        return pooled_vectors(self.pooling, side, self.num_query_tokens, self.num_candidate_tokens)

    def to_json_file(self, path: Path) -> None:
        path.write_text(json.dumps({"model_type": MODEL_TYPE, **asdict(self)}, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls, path: Path) -> MetaEmbedConfig:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"cannot read {path}: {error}") from error
        if not isinstance(data, dict) or data.pop("model_type", None) != MODEL_TYPE:
            raise CheckpointError(f"{path} is not a metaembed config (model_type must be {MODEL_TYPE!r})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{path} has unknown keys {unknown}; written by a newer metaembed?")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path} is not a valid metaembed config: {error}") from error


META_ANCHORS = (None, "mean", "slots")
SLOT_VALUES = ("states", "states+inputs")
LONE_SLOTS = ("mean", "attention")
POOLINGS = ("meta", "last", "mean", "split-X", "split-QxC")


def pooled_vectors(pooling: str, side: str, num_query_tokens: int, num_candidate_tokens: int) -> int:
    """Vectors per item for a pooling name; ValueError naming the allowed forms for a bad one."""
    if pooling == "meta":
        return num_query_tokens if side == "query" else num_candidate_tokens
    if pooling in ("last", "mean"):
        return 1
    if isinstance(pooling, str) and pooling.startswith("split-"):
        parts = pooling.removeprefix("split-").split("x")
        if len(parts) in (1, 2) and all(p.isdigit() and int(p) >= 1 for p in parts):
            counts = [int(p) for p in parts]
            return counts[0] if side == "query" or len(counts) == 1 else counts[1]
    raise ValueError(f"pooling must be one of {POOLINGS} (X, Q, C positive ints, e.g. 'split-16x64'), got {pooling!r}")
