"""What can be encoded: text, an image, or both — normalised into one :class:`Item` type.

Accepted inputs: ``str`` (text), ``PIL.Image.Image``, ``pathlib.Path`` (an image file), or a mapping
``{"text": str | None, "image": PIL image | path | None}``. A plain ``str`` is always text, never a
path: pass ``Path("cat.png")`` (or ``{"image": "cat.png"}``) for a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from metaembed.errors import InputError
from metaembed.text import check_unicode

ItemLike = str | Image.Image | os.PathLike | Mapping[str, Any]

# Qwen2-VL's resize rule (and most patch-based vision towers) refuse images this elongated.
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class Item:
    text: str | None = None
    image: Image.Image | None = None

    @property
    def size_hint(self) -> int:
        """A cheap cost estimate used to batch similar-sized items together."""
        pixels = self.image.width * self.image.height if self.image is not None else 0
        return len(self.text or "") + pixels // 196


def load_image(source: Image.Image | str | os.PathLike, where: str) -> Image.Image:
    """An RGB PIL image from a PIL image or a file path; InputError naming ``where`` if unreadable."""
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{where}: image file {str(path)!r} does not exist")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise InputError(f"{where}: cannot read image {str(path)!r}: {error}") from error
    if image.width < 1 or image.height < 1:
        raise InputError(f"{where}: image has no pixels ({image.width}×{image.height})")
    if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
        raise InputError(
            f"{where}: image is {image.width}×{image.height}; the aspect ratio must be at most {MAX_ASPECT_RATIO}:1"
        )
    if image.mode == "RGB":
        return image
    if image.mode.startswith(("I", "F")):
        image = _wide_to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # transparent clip art and icons: composite on white, as they are shown, not on black
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grayscale image scaled to 8 bits (Pillow's own convert clips at 255).

    ``I;16*`` holds 16-bit samples (0-65535). ``I`` and ``F`` say nothing about their range, so it is read from
    the values: floats within [0, 1] are the unit range, values up to 255 are already 8-bit, larger ones are
    16-bit samples (what 16-bit PNG and TIFF decoders produce); anything outside is clipped to that range.
    """
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        full = 65535.0
    else:
        peak = float(np.nanmax(values)) if values.size else 0.0
        full = 1.0 if image.mode == "F" and peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
    scaled = np.clip(np.nan_to_num(values, nan=0.0) * (255.0 / full), 0, 255)
    return Image.fromarray(np.round(scaled).astype(np.uint8))  # 2-D uint8: mode "L"


def check_text(text: str, where: str) -> str:
    """``text`` if it can be tokenised; lone surrogates (e.g. from a bad JSON escape) are rejected."""
    return check_unicode(text, f"{where}: text")


def to_item(value: ItemLike, index: int = 0) -> Item:
    """Normalise one user input into an Item; ``index`` names it in error messages."""
    where = f"item {index}"
    if isinstance(value, Item):
        return value
    if isinstance(value, str):
        return Item(text=check_text(value, where))
    if isinstance(value, Image.Image | os.PathLike):
        return Item(image=load_image(value, where))
    if isinstance(value, Mapping):
        unknown = set(value) - {"text", "image"}
        if unknown:
            raise InputError(f"{where}: unknown keys {sorted(unknown)}; an item dict has 'text' and/or 'image'")
        text, image = value.get("text"), value.get("image")
        if text is not None and not isinstance(text, str):
            raise InputError(f"{where}: 'text' must be a str, got {type(text).__name__}")
        if text is None and image is None:
            raise InputError(f"{where}: has neither 'text' nor 'image'")
        text = None if text is None else check_text(text, where)
        return Item(text=text, image=None if image is None else load_image(image, where))
    raise InputError(
        f"{where}: cannot encode a {type(value).__name__}; pass a str (text), a PIL image, a pathlib.Path "
        "(image file) or a dict with 'text' and/or 'image'"
    )


def to_items(values: Sequence[ItemLike], offset: int = 0) -> list[Item]:
    return [to_item(value, offset + i) for i, value in enumerate(values)]


def check_batch(values: Any) -> Sequence[ItemLike]:
    """The input as a non-empty sequence of items; a single item is rejected with a hint."""
    if isinstance(values, str | Image.Image | os.PathLike | Mapping):
        raise InputError("encode takes a list of items; wrap a single item in a list")
    if not isinstance(values, Sequence):
        raise InputError(f"encode takes a list of items, got {type(values).__name__}")
    if len(values) == 0:
        raise InputError("encode got an empty list; pass at least one item")
    return values
