"""What every route shares: the model's shape, the encoder, the index and its lock, the limits.

The routers (:mod:`~metaembed.serve.embeddings`, :mod:`~metaembed.serve.search`, :mod:`~metaembed.serve.writes`,
:mod:`~metaembed.serve.health`) each take one :class:`Service`, so none of them reaches into another.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from metaembed.auto_budget import POLICY_FILE, AutoBudget
from metaembed.errors import BudgetError
from metaembed.model.items import Item
from metaembed.serve import schemas
from metaembed.serve.batcher import EncodeBatcher, Encoded
from metaembed.serve.config import ServeConfig
from metaembed.serve.errors import (
    BadRequestError,
    EncodeTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PolicyUnavailableError,
)
from metaembed.serve.inputs import to_item
from metaembed.serve.metrics import Metrics
from metaembed.serve.rwlock import RWLock

log = logging.getLogger(__name__)

COUNT_EVERY_S = 1.0  # /health recounts the index in the background at most this often


class Service:
    """The state behind the routes of one app, and the steps several routes take."""

    def __init__(
        self, model, index, config: ServeConfig, metrics: Metrics, model_dir: str | os.PathLike[str] | None = None
    ) -> None:
        self.config, self.index, self.metrics = config, index, metrics
        self.model_dir = model_dir
        self._policy: tuple[tuple, AutoBudget] | None = None  # (the file's path, inode, mtime and size; its policy)
        self._policy_lock = threading.Lock()
        self.n_query, self.n_candidate = model.num_vectors("query"), model.num_vectors("candidate")
        self.dim = model.embedding_dim
        self.batcher = EncodeBatcher(
            model,
            batching=config.batching,
            max_batch_items=config.max_batch_items,
            max_batch_wait_ms=config.max_batch_wait_ms,
            queue_size=config.queue_size,
            # half the timeout: the estimate leaves out the batch in progress and the request's own encode
            max_wait_s=config.request_timeout_s / 2,
            on_batch=metrics.observe_batch,
        )
        self.index_lock = RWLock()
        # The item count /health reports, kept here so /health never touches the index (a read-only index's count
        # reloads its manifest, a Qdrant count is a network call): set by every write, recounted in the background.
        self.index_size: int | None = None
        self._counter = ThreadPoolExecutor(1, thread_name_prefix="metaembed-count")
        self._counting: Future | None = None
        self._counted_at = time.monotonic()
        if index is not None:
            self._recount()

    def close(self) -> None:
        self.batcher.close()
        self._counter.shutdown(wait=True)
        closer = getattr(self.index, "close", None)
        if callable(closer):
            closer()

    # ------------------------------------------------------------------------------ encoding
    def parse_items(self, values: Sequence[str | schemas.InputItem], what: str) -> list[Item]:
        if len(values) > self.config.max_items:
            raise PayloadTooLargeError(f"{len(values)} {what}; at most {self.config.max_items} per request", what)
        items = []
        for i, value in enumerate(values):
            where = f"{what}[{i}]"
            if isinstance(value, str):
                items.append(to_item(value, None, where, self.config))
            else:
                items.append(to_item(value.text, value.image, where, self.config))
        return items

    def encode(self, items: list[Item], side: str, *, urgent: bool = False) -> Encoded:
        timeout = self.config.request_timeout_s
        future = self.batcher.submit(items, side, urgent=urgent)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            message = f"encoding did not finish within {timeout:g} s (server busy); retry later"
            raise EncodeTimeoutError(message) from None

    # ------------------------------------------------------------------------------- the index
    def require_index(self):
        if self.index is None:
            raise NotFoundError("this server has no index (start it with --index PATH)")
        return self.index

    def require_writable_index(self):
        store = self.require_index()
        if getattr(store, "read_only", False):
            raise PermissionDeniedError("index writes are disabled: this server serves its index read-only")
        return store

    def auto_policy(self) -> AutoBudget:
        """The ``auto`` policy: the one stored beside the index, else in the model folder (as ``metaembed search``).

        Looked up per request, so a policy calibrated into the index while the server runs is used from the next
        search on; the file is parsed again only when it changed. Errors name no server path: a missing policy is
        the client's 400, a broken one the server's 503 (the path goes to the log).
        """
        store = self.require_index()
        if getattr(store, "backend", None) != "embedded":
            raise BadRequestError(
                'budget "auto" runs on the embedded index; this server uses another backend', "budget"
            )
        found = AutoBudget.locate(store.path, self.model_dir)
        if found is None:
            raise BadRequestError(
                f'budget "auto" needs a calibrated policy ({POLICY_FILE}) beside the index or the model, and this '
                "server has none; its operator can make one with `metaembed plan calibrate --save-to "
                "INDEX_OR_MODEL_DIR`, or search at a fixed budget such as 4x8",
                "budget",
            )
        try:
            stat = found.stat()
            key = (str(found), stat.st_ino, stat.st_mtime_ns, stat.st_size)
            with self._policy_lock:
                if self._policy is None or self._policy[0] != key:
                    self._policy = key, AutoBudget.load(found).validate(self.n_query, self.n_candidate)
                return self._policy[1]
        except (OSError, BudgetError) as error:
            log.error("the auto-budget policy %s cannot be used: %s", found, error)
            raise PolicyUnavailableError(
                "the server's auto-budget policy cannot be used (the server log says why); search at a fixed budget"
            ) from None

    def auto_policy_or_none(self) -> AutoBudget | None:
        """The ``auto`` policy, or None where there is none to use (for what the page offers)."""
        try:
            return self.auto_policy()
        except (BadRequestError, NotFoundError, PolicyUnavailableError):
            return None

    @property
    def writes_enabled(self) -> bool:
        if self.config.api_key is None or self.index is None:
            return False
        return not getattr(self.index, "read_only", False)

    def counted(self) -> int | None:
        """The last item count seen, without waiting; starts a recount in a thread when it is over a second old.

        Another process may write a read-only server's index (or a Qdrant collection), so the count is refreshed;
        the recount holds the read lock, so it cannot overwrite a newer count set by a write. Called on the event
        loop only (one caller at a time).
        """
        if self.index is None:
            return None
        idle = self._counting is None or self._counting.done()
        if idle and time.monotonic() - self._counted_at >= COUNT_EVERY_S:
            self._counted_at = time.monotonic()
            self._counting = self._counter.submit(self._recount)
        return self.index_size

    def _recount(self) -> None:
        try:
            with self.index_lock.read():
                self.index_size = len(self.index)
        except Exception as error:  # /health stays a liveness answer; a search or write reports the index's state
            log.warning("counting the index's items failed: %s", error)
