"""Where metaembed keeps files it derives once and reuses: ``$METAEMBED_CACHE``, else ``~/.cache/metaembed``.

One place for every room (the model's converted decoders, evaluation's extracted image archives), so a
user moves all of it with one variable.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("METAEMBED_CACHE") or Path.home() / ".cache" / "metaembed")
