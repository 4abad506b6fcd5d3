"""The exceptions metaembed raises for bad input.

Every error a user can cause is one of these, with a message that says what was wrong and what is
allowed. They subclass the matching built-in (``ValueError``, ``FileNotFoundError``) so code that
already catches those keeps working.
"""

from __future__ import annotations


class MetaEmbedError(Exception):
    """Base class of every error metaembed raises on purpose."""


class BudgetError(MetaEmbedError, ValueError):
    """A budget that cannot be parsed, or that asks for more vectors than exist."""


class ShapeError(MetaEmbedError, ValueError):
    """A tensor with the wrong rank, size or dtype."""


class InputError(MetaEmbedError, ValueError):
    """An item that cannot be encoded: empty batch, unreadable image, unsupported type."""


class CheckpointError(MetaEmbedError, FileNotFoundError):
    """A checkpoint directory that is missing, incomplete or not a metaembed checkpoint."""


class EvalError(MetaEmbedError, ValueError):
    """The evaluation room's root: a measure or ranking that does not fit, a result file that cannot be read."""


class DataError(MetaEmbedError, ValueError):
    """Data that cannot be read or built: a missing source, a bad spec, a record that breaks its schema.

    The one data subtree: training readers, the evaluation loaders and the dataset builders all raise it
    (or a subclass), so ``except DataError`` catches every data problem whichever room found it.
    """


class RecordError(DataError):
    """One record that cannot be used; the message starts with where it is (``file:line``)."""
