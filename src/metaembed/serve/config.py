"""Limits and knobs of the service, in one dataclass so tests, the CLI and benchmarks share them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from metaembed.serve.errors import ServeConfigError

MiB = 1024 * 1024


@dataclass
class ServeConfig:
    """What the service accepts and how it batches.

    Attributes:
        max_items: items per ``/v1/embeddings`` or ``/v1/index/add`` request.
        max_body_bytes: request body size; larger bodies get 413 before they are read in full.
        max_image_bytes: encoded size of one image (decoded base64 or file on disk).
        max_image_pixels: width × height of one image, checked from the header before decoding
            (a decompression bomb never gets decoded).
        max_aspect_ratio: long side / short side of an image (Qwen-VL's resizer refuses ≥ 200).
        max_text_chars: characters of one text.
        max_k: largest ``k`` of a search.
        image_dir: directory whose files requests may name by relative path; ``None`` disables paths.
        api_key: the key that ``/v1/index/add`` and ``/v1/index/delete`` require; ``None`` disables them.
        batching: merge concurrent requests' encode work into shared forward passes.
        max_batch_items: items per forward pass.
        max_batch_wait_ms: how long the worker waits for more work before running a partial batch.
        queue_size: encode jobs waiting at most; a full queue answers 503.
        request_timeout_s: a request waiting longer than this for its encodings gets 504.
        max_encode_requests: ``/v1/embeddings`` and ``/v1/search`` requests in progress at most; more get an
            immediate 503 (before they take a thread or their body is read).
        max_write_requests: keyed index writes in progress at most (their own lane: a flood of encode
            requests never holds them up).
        max_light_requests: other requests (``/health``, ``/metrics``, docs) in progress at most.
        model_name: the name echoed in responses (``model`` field).
    """

    max_items: int = 64
    max_body_bytes: int = 16 * MiB
    max_image_bytes: int = 8 * MiB
    max_image_pixels: int = 16_000_000
    max_aspect_ratio: float = 150.0
    max_text_chars: int = 16_384
    max_k: int = 1000
    image_dir: Path | None = None
    api_key: str | None = None
    batching: bool = True
    max_batch_items: int = 32
    max_batch_wait_ms: float = 5.0
    queue_size: int = 256
    request_timeout_s: float = 30.0
    max_encode_requests: int = 16
    max_write_requests: int = 8
    max_light_requests: int = 32
    model_name: str = "metaembed"

    @property
    def thread_limit(self) -> int:
        """Worker threads the service needs so that every admitted request gets one at once."""
        return self.max_encode_requests + self.max_write_requests + self.max_light_requests + 8

    def __post_init__(self) -> None:
        for name in (
            "max_items",
            "max_body_bytes",
            "max_image_bytes",
            "max_image_pixels",
            "max_text_chars",
            "max_k",
            "max_batch_items",
            "queue_size",
            "max_encode_requests",
            "max_write_requests",
            "max_light_requests",
        ):
            if getattr(self, name) < 1:
                raise ServeConfigError(name, "must be at least 1", getattr(self, name))
        # written as `not (ok)` so NaN fails too; infinity is refused: an endless wait would hold requests forever
        if not (math.isfinite(self.max_aspect_ratio) and self.max_aspect_ratio >= 1):
            raise ServeConfigError("max_aspect_ratio", "must be a finite number ≥ 1", self.max_aspect_ratio)
        if not (math.isfinite(self.max_batch_wait_ms) and self.max_batch_wait_ms >= 0):
            raise ServeConfigError("max_batch_wait_ms", "must be a finite number ≥ 0", self.max_batch_wait_ms)
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            raise ServeConfigError("request_timeout_s", "must be a finite number > 0", self.request_timeout_s)
        if self.api_key is not None and not self.api_key:
            raise ServeConfigError("api_key", "must be a non-empty string or None", self.api_key)
        if self.image_dir is not None:
            self.image_dir = Path(self.image_dir)
