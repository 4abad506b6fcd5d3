"""Image helpers for the service tests (importable: conftest puts this directory on sys.path)."""

from __future__ import annotations

import base64
import io


def png_bytes(width: int = 40, height: int = 32, colour=(200, 30, 30), fmt: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
