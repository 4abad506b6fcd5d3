"""Training: the Matryoshka Multi-Vector Retrieval (MMR) loss, data readers, distributed helpers, the trainer."""

from __future__ import annotations

from metaembed.train.loss import LossGroup, MatryoshkaMultiVectorLoss, mmr_loss, variant_groups

__all__ = ["LossGroup", "MatryoshkaMultiVectorLoss", "mmr_loss", "variant_groups"]
