"""Indexes: persistent budgeted multi-vector stores. They store tensors and never import the model."""

from __future__ import annotations
