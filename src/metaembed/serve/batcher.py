"""Dynamic batching: one worker thread owns the model; concurrent requests share its forward passes.

Requests put encode jobs on a bounded queue and wait on a future. The worker takes the first waiting
job, then keeps collecting jobs of the same side for at most ``max_batch_wait_ms`` or until it holds
``max_batch_items`` items, and runs them through the model together (items sorted by size so little
padding is wasted). Urgent jobs (keyed index writes) are taken before any waiting bulk job and batched only with
other urgent jobs, so a flood of embeddings requests delays a write by the batch in progress at most (merged with
bulk work, a one-item write would wait for a full batch of it). A full queue is refused at once (503), and so is
bulk work that would wait longer than ``max_wait_s`` for the forward pass in progress and the items queued ahead
of it (measured seconds per item × those items): a request count alone cannot bound the wait, since a request
holds 1 to ``max_items`` items and a machine shared with other work encodes slower at times, and work refused at
once beats work that times out. A caller that waits too long gives up (504) and its job is skipped if the worker has
not started it. If a merged batch fails, each job is re-run on its own, so one bad request cannot fail the others; a
job that still fails with a ValueError/TypeError from preprocessing is reported as a 400 for that request only.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from metaembed.errors import MetaEmbedError
from metaembed.model.items import Item
from metaembed.model.meta_tokens import Side
from metaembed.serve.errors import BadRequestError, OverloadedError

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One job's result: ``(n, R, D)`` float32 embeddings and the tokens each item used."""

    embeddings: torch.Tensor
    tokens: list[int]


@dataclass
class _Job:
    items: Sequence[Item]
    side: Side
    urgent: bool = False
    queued: bool = True  # its items count in the batcher's backlog
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


URGENT, BULK, STOP = 0, 1, 2  # queue priorities: the stop marker comes after every job already queued


class EncodeBatcher:
    """A bounded queue in front of a single model-owning worker thread."""

    def __init__(
        self,
        model,
        *,
        batching: bool = True,
        max_batch_items: int = 32,
        max_batch_wait_ms: float = 5.0,
        queue_size: int = 256,
        max_wait_s: float | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.model = model
        self.max_wait_s = max_wait_s
        self.batching = batching
        self.max_batch_items = max_batch_items
        self.max_batch_wait_s = max_batch_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: queue.PriorityQueue[tuple[int, int, _Job | None]] = queue.PriorityQueue(maxsize=queue_size)
        self._order = itertools.count()  # first come, first served within a priority
        self._pending: _Job | None = None  # a job taken from the queue that did not fit the last batch
        self._backlog = 0  # items submitted and not yet started (queued or pending)
        self._running = 0  # items in the forward pass in progress
        self._backlog_lock = threading.Lock()
        self._seconds_per_item: float | None = None  # smoothed over recent forward passes; None until the first
        self._thread = threading.Thread(target=self._run, name="metaembed-encode", daemon=True)
        self._stopped = threading.Event()
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    @property
    def expected_wait_s(self) -> float:
        """Seconds a new job would wait for the forward pass in progress and the items queued ahead of it.

        0 until a forward pass was measured. An urgent job skips the queued items but not the pass in progress.
        """
        return (self._backlog + self._running) * (self._seconds_per_item or 0.0)

    def submit(self, items: Sequence[Item], side: Side, *, urgent: bool = False) -> Future:
        """Queue items for encoding; the future resolves to :class:`Encoded` (or the error)."""
        if self._stopped.is_set():
            raise OverloadedError("the encoder is shutting down")
        job = _Job(items, side, urgent)
        with self._backlog_lock:
            wait = self.expected_wait_s
            if not urgent and self.max_wait_s is not None and wait > self.max_wait_s:
                raise OverloadedError(
                    f"the encoder has about {wait:.0f} s of work queued (at most {self.max_wait_s:g} s is accepted); "
                    "retry shortly"
                )
            try:
                self._queue.put_nowait((URGENT if urgent else BULK, next(self._order), job))
            except queue.Full:
                raise OverloadedError(
                    f"the encode queue is full ({self._queue.maxsize} requests waiting); retry shortly"
                ) from None
            self._backlog += len(items)
        job.future.add_done_callback(lambda _: self._dequeued(job))  # a cancelled job (504) leaves the backlog now
        return job.future

    def _dequeued(self, job: _Job) -> None:
        with self._backlog_lock:
            if job.queued:
                job.queued = False
                self._backlog -= len(job.items)

    def close(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        with contextlib.suppress(queue.Full):
            self._queue.put((STOP, next(self._order), None), timeout=timeout)
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------ worker
    def _next(self, timeout: float | None) -> _Job | None:
        if self._pending is not None:
            job, self._pending = self._pending, None
            return job
        _, _, job = self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        return job

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            job = self._next(None)
            if job is None:
                return
            jobs = [job]
            if self.batching:
                jobs += self._collect(job)
            self._running = sum(len(taken.items) for taken in jobs)  # before they leave the backlog: no dip
            for taken in jobs:
                self._dequeued(taken)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._encode_jobs(jobs)
            self._running = 0
            if self._stopped.is_set() and self._queue.empty() and self._pending is None:
                return

    def _collect(self, first: _Job) -> list[_Job]:
        """More jobs of the same side and urgency, until the batch is full or the wait is over."""
        more: list[_Job] = []
        count = len(first.items)
        deadline = time.perf_counter() + self.max_batch_wait_s
        while count < self.max_batch_items:
            try:
                job = self._next(deadline - time.perf_counter())
            except queue.Empty:
                break
            if job is None:  # shutting down: finish what we hold
                self._stopped.set()
                break
            if job.side != first.side or job.urgent != first.urgent or count + len(job.items) > self.max_batch_items:
                self._pending = job
                break
            more.append(job)
            count += len(job.items)
        return more

    def _encode_jobs(self, jobs: list[_Job]) -> None:
        try:
            results = self._encode_many([job.items for job in jobs], jobs[0].side)
        except Exception as error:
            if len(jobs) == 1:
                jobs[0].future.set_exception(_user_error(error))
                return
            for job in jobs:  # isolate the failing request
                try:
                    job.future.set_result(self._encode_many([job.items], job.side)[0])
                except Exception as single_error:
                    job.future.set_exception(_user_error(single_error))
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)

    def _encode_many(self, groups: list[Sequence[Item]], side: Side) -> list[Encoded]:
        flat = [item for group in groups for item in group]
        start = time.perf_counter()
        model = self.model
        n_meta = model._slots(side).count
        order = sorted(range(len(flat)), key=lambda i: flat[i].size_hint)
        out = torch.empty(len(flat), model.num_vectors(side), model.embedding_dim, dtype=torch.float32)
        tokens = [0] * len(flat)
        with torch.inference_mode():
            for begin in range(0, len(flat), self.max_batch_items):
                index = order[begin : begin + self.max_batch_items]
                batch = model.processor_impl([flat[i] for i in index], side, n_meta)
                out[index] = model(batch, side).cpu()
                lengths = (batch["attention_mask"].sum(dim=1) - n_meta).tolist()
                for i, length in zip(index, lengths, strict=True):
                    tokens[i] = int(length)
        seconds = time.perf_counter() - start
        per_item = seconds / max(1, len(flat))
        previous = self._seconds_per_item
        self._seconds_per_item = per_item if previous is None else 0.7 * previous + 0.3 * per_item
        if self.on_batch is not None:
            self.on_batch(len(flat), seconds)
        results, begin = [], 0
        for group in groups:
            results.append(Encoded(out[begin : begin + len(group)], tokens[begin : begin + len(group)]))
            begin += len(group)
        return results


def _user_error(error: Exception) -> Exception:
    """Errors the input caused stay 4xx; anything else is a server error and is logged."""
    if isinstance(error, MetaEmbedError):
        return error
    if isinstance(error, ValueError | TypeError | UnicodeError):
        return BadRequestError(f"the model cannot encode this input: {error}")
    log.exception("encode failed", exc_info=error)
    return error
