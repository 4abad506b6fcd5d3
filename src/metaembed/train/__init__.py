"""Training: the Matryoshka Multi-Vector Retrieval (MMR) loss, data readers, distributed helpers, the trainer."""

from __future__ import annotations

from metaembed.lazy import lazy_exports

__all__ = ["LossGroup", "MatryoshkaMultiVectorLoss", "mmr_loss", "variant_groups"]

# loaded on first use: the loss imports torch, which `metaembed train --help` should not wait for
__getattr__ = lazy_exports(__name__, dict.fromkeys(__all__, "metaembed.train.loss"))
