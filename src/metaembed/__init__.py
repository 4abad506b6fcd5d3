"""metaembed: MetaEmbed multi-vector retrieval with a serve-time budget."""

from __future__ import annotations

from metaembed.budget import Budget
from metaembed.errors import BudgetError, CheckpointError, InputError, MetaEmbedError, ShapeError
from metaembed.scoring import maxsim, maxsim_from_similarities, token_similarities

__version__ = "0.1.0"


def __getattr__(name: str):
    # The model pulls in transformers (seconds to import); scoring and budgets should not pay for it.
    if name in ("MetaEmbedModel", "MetaEmbedConfig"):
        from metaembed import model

        return getattr(model, name)
    raise AttributeError(f"module 'metaembed' has no attribute {name!r}")


__all__ = [
    "Budget",
    "BudgetError",
    "CheckpointError",
    "InputError",
    "MetaEmbedConfig",
    "MetaEmbedError",
    "MetaEmbedModel",
    "ShapeError",
    "__version__",
    "maxsim",
    "maxsim_from_similarities",
    "token_similarities",
]
