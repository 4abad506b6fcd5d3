"""Errors and warnings of the dataset builders (under :class:`metaembed.errors.DataError`)."""

from __future__ import annotations

from metaembed.errors import DataError

FETCH_HINT = "run scripts/fetch_resources.sh (or `make data`) to download the raw sources into data/raw"


class MissingRawDataError(DataError, FileNotFoundError):
    """A raw source file or folder that should have been fetched is absent."""


class ImageSkippedWarning(UserWarning):
    """A source image that could not be decoded (or is absurdly large) was left out of the dataset."""
