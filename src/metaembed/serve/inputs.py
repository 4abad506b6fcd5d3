"""Request items → model items, with every check that keeps hostile input away from the model.

An item is text, an image, or both. Images come as base64 data URLs (``data:image/png;base64,...``)
or as a path relative to the server's ``--image-dir``. Everything is checked before decoding: encoded
bytes, the pixel count from the header (a decompression bomb is never decoded), the aspect ratio (the
Qwen-VL resizer refuses extreme ones), the format, and that a path stays inside the image directory
after symlinks are resolved. Texts must be valid Unicode (JSON can carry lone surrogates, which the
tokenizer cannot encode).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from metaembed.errors import InputError
from metaembed.model import items
from metaembed.model.items import Item, load_image
from metaembed.serve.config import ServeConfig
from metaembed.serve.errors import BadRequestError, PayloadTooLargeError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


def check_text(text: str, where: str, max_chars: int) -> str:
    """The text if it is at most ``max_chars`` long and valid Unicode (encodable as UTF-8)."""
    if len(text) > max_chars:
        raise PayloadTooLargeError(f"{where}: text has {len(text):,} characters; at most {max_chars:,}")
    try:
        return items.check_text(text, where)
    except InputError as error:
        raise BadRequestError(f"{error}; lone surrogates such as '\\ud800' cannot be encoded") from error


def decode_data_url(url: str, where: str, config: ServeConfig) -> bytes:
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise BadRequestError(f"{where}: an image must be a base64 data URL like 'data:image/png;base64,...'")
    mime = (match.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise BadRequestError(f"{where}: data URL has media type {mime!r}; expected image/*")
    payload = url[match.end() :]
    # 4 base64 characters carry 3 bytes: refuse before decoding anything too large
    if len(payload) * 3 // 4 > config.max_image_bytes + 3:
        raise PayloadTooLargeError(
            f"{where}: image is about {len(payload) * 3 // 4:,} bytes; at most {config.max_image_bytes:,}"
        )
    try:
        data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadRequestError(f"{where}: image data is not valid base64: {error}") from error
    if not data:
        raise BadRequestError(f"{where}: image data is empty")
    return data


def read_image_path(relative: str, where: str, config: ServeConfig) -> bytes:
    if config.image_dir is None:
        raise BadRequestError(
            f"{where}: image paths are disabled on this server (start it with --image-dir); "
            "send the image as a base64 data URL instead"
        )
    if not relative or "\x00" in relative:
        raise BadRequestError(f"{where}: empty or invalid image path")
    path = Path(relative)
    if path.is_absolute() or path.drive:
        raise BadRequestError(f"{where}: image path {relative!r} must be relative to the server's image directory")
    root = config.image_dir.resolve()
    try:
        resolved = (root / path).resolve(strict=True)
    except (OSError, RuntimeError):
        raise BadRequestError(f"{where}: image path {relative!r} does not exist under the image directory") from None
    if not resolved.is_relative_to(root):
        raise BadRequestError(f"{where}: image path {relative!r} leads outside the image directory")
    if not resolved.is_file():
        raise BadRequestError(f"{where}: image path {relative!r} is not a file")
    size = resolved.stat().st_size
    if size > config.max_image_bytes:
        raise PayloadTooLargeError(f"{where}: image file is {size:,} bytes; at most {config.max_image_bytes:,}")
    try:
        with open(resolved, "rb", opener=_no_follow_opener) as handle:
            return handle.read(config.max_image_bytes + 1)
    except OSError as error:
        raise BadRequestError(f"{where}: cannot read image path {relative!r}: {error.strerror}") from None


def _no_follow_opener(path: str, flags: int) -> int:
    # the path is already resolved; refuse a symlink swapped in since (a race with resolve())
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


def decode_image(data: bytes, where: str, config: ServeConfig) -> Image.Image:
    """An RGB image from encoded bytes, refusing bombs, unknown formats and extreme shapes before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        # Pillow refuses headers above its own limit (far above ours) while opening, before we can read the size
        raise PayloadTooLargeError(
            f"{where}: image is over {Image.MAX_IMAGE_PIXELS:,} pixels (by its header); at most "
            f"{config.max_image_pixels:,}"
        ) from None
    except UnidentifiedImageError:
        raise BadRequestError(f"{where}: not an image (supported formats: {', '.join(IMAGE_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise BadRequestError(f"{where}: not a readable image: {error}") from None
    with opened:
        width, height = opened.size
        if width < 1 or height < 1:
            raise BadRequestError(f"{where}: image has no pixels ({width}×{height})")
        if width * height > config.max_image_pixels:
            raise PayloadTooLargeError(
                f"{where}: image is {width}×{height} = {width * height:,} pixels; at most {config.max_image_pixels:,}"
            )
        ratio = max(width, height) / min(width, height)
        if ratio > config.max_aspect_ratio:
            raise BadRequestError(
                f"{where}: image is {width}×{height}, aspect ratio {ratio:.0f}:1; at most {config.max_aspect_ratio:g}:1"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                opened.seek(0)
                opened.load()
                image = opened.copy()
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombWarning) as error:
            raise BadRequestError(f"{where}: image data is truncated or corrupt: {error}") from None
    try:
        return load_image(image, where)
    except (OSError, ValueError) as error:
        raise BadRequestError(f"{where}: cannot convert image to RGB: {error}") from None


def image_from_reference(reference: str, where: str, config: ServeConfig) -> Image.Image:
    """A data URL or a path under the image directory → a checked RGB image."""
    if reference.lower().startswith("data:"):
        data = decode_data_url(reference, where, config)
    else:
        data = read_image_path(reference, where, config)
    return decode_image(data, where, config)


def to_item(text: str | None, image: str | None, where: str, config: ServeConfig) -> Item:
    if text is None and image is None:
        raise BadRequestError(f"{where}: has neither 'text' nor 'image'")
    return Item(
        text=None if text is None else check_text(text, where, config.max_text_chars),
        image=None if image is None else image_from_reference(image, where, config),
    )
