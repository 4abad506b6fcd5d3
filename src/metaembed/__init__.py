"""metaembed: MetaEmbed multi-vector retrieval with a serve-time budget."""

from __future__ import annotations

from metaembed.budget import Budget
from metaembed.errors import BudgetError, CheckpointError, InputError, MetaEmbedError, ShapeError
from metaembed.scoring import maxsim, maxsim_from_similarities, token_similarities

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "BudgetError",
    "CheckpointError",
    "InputError",
    "MetaEmbedError",
    "ShapeError",
    "__version__",
    "maxsim",
    "maxsim_from_similarities",
    "token_similarities",
]
