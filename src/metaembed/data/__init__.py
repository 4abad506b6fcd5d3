"""Builders for the real offline datasets (OpenClipArt, emoji) in the MMEB train / eval schemas.

``build_dataset(source, raw, out)`` reads the raw packages fetched by ``scripts/fetch_resources.sh``,
cleans the texts, renders every image to a fixed-size PNG on white, splits items by a hash of their key and
writes ``<out>/<source>/`` (manifest, images, train and eval JSONL). The output is byte-identical
across runs on the same inputs and library versions.
"""

from __future__ import annotations

from metaembed.data.build import SOURCES, BuildOptions, build_dataset, verify_dataset
from metaembed.data.errors import ImageSkippedWarning, MissingRawDataError
from metaembed.errors import DataError

__all__ = [
    "SOURCES",
    "BuildOptions",
    "DataError",
    "ImageSkippedWarning",
    "MissingRawDataError",
    "build_dataset",
    "verify_dataset",
]
