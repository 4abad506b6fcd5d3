"""metaembed: MetaEmbed multi-vector retrieval with a serve-time budget."""

from __future__ import annotations

from metaembed.budget import Budget
from metaembed.errors import BudgetError, CheckpointError, InputError, MetaEmbedError, ShapeError
from metaembed.lazy import lazy_exports

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


__getattr__ = lazy_exports(__name__, _LAZY)


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
