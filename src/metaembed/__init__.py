"""metaembed: MetaEmbed multi-vector retrieval with a serve-time budget."""

from __future__ import annotations

from metaembed.budget import Budget
from metaembed.errors import BudgetError, CheckpointError, InputError, MetaEmbedError, ShapeError

__version__ = "0.1.0"

# Imported on first use: scoring pulls in torch (~1 s) and the model transformers (seconds), which code
# that only needs budgets and errors (configs, argument parsing) should not pay for.
_LAZY = {
    "maxsim": "metaembed.scoring",
    "maxsim_from_similarities": "metaembed.scoring",
    "token_similarities": "metaembed.scoring",
    "MetaEmbedModel": "metaembed.model",
    "MetaEmbedConfig": "metaembed.model",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
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
