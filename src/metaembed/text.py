"""Text validation shared by the model's items and the index's ids (neither imports the other)."""

from __future__ import annotations

from metaembed.errors import InputError


def check_unicode(text: str, where: str) -> str:
    """``text`` if it encodes as UTF-8; lone surrogates (e.g. from a bad JSON escape) get an InputError
    naming ``where`` — tokenisers and JSON files would otherwise fail later with an unhelpful error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(
            f"{where} is not valid Unicode ({error.reason} at position {error.start}): "
            "lone surrogates cannot be encoded as UTF-8"
        ) from None
    return text
