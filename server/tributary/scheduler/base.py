"""What every scheduling mode shares: the interface, completion, waiting, ordering, closing.

A scheduler hands one loaded model version's requests to its instances. Each mode is a class
of its own (`direct.py`, `batching.py`), built by `make_scheduler` (in `__init__.py`); the
rules of the queue live in `batchqueue.py` (pure, clock-injected) and one execution in
`batchrun.py`. Modes import this module and those two, never each other. Nothing here knows
protobuf or gRPC.

How the caller gets timings and the failure reason: the scheduler writes them onto the
`WorkItem` before the request completes (before `infer` returns or raises, before `submit`'s
callback runs): `queue_ns` (enqueue → execution start), `compute_input_ns` (concatenation),
`compute_infer_ns` (Instance.run), `compute_output_ns` (checks and split), `batch_rows` (rows
of the execution it ran in) and, on failure, `failure_reason` ("REJECTED" queue full or timeout,
"CANCELED", "BACKEND", "OTHER" e.g. shutdown). The caller records the request with
`ModelStats.request_success/request_failure`; the scheduler records only executions
(`ModelStats.execution`, successful ones) and the pending gauge.

Timeouts: a blocked `infer` caller waits on its own latch with its deadline and removes itself
when it passes, so it never waits for an instance to learn it timed out. Requests sent with
`submit` expire whenever the queue is next looked at (an arrival, a free instance, or an idle
instance thread's timer). Cancellation: `is_active()` is checked just before a request joins a
batch; `cancel(item)` removes a still-queued request at once (e.g. from a gRPC done-callback).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import Cancelled, InferenceError, Unavailable
from ..stats import ModelStats
from .batchqueue import DONE, QUEUED, BatchPolicy, BatchQueue, Callback, Entry, WorkItem
from .batchrun import BatchContext, Instance

_log = logging.getLogger("tributary.scheduler")

MAX_WAIT_S = 3600.0
"""The longest single wait on a lock or condition: longer deadlines are waited out in steps,
so no client-supplied timeout can reach a platform limit (time_t) in a wait call."""


class Closed(Unavailable):
    """A request this scheduler refused, or dropped from its queue, because it is closing.

    At shutdown that is the answer. When a reload or unload retired the scheduler, the
    request had resolved its version just before the swap; the data plane routes it again."""


def latch() -> threading.Lock:
    """A one-shot signal: cheaper than an Event, released exactly once by the completer."""
    lock = threading.Lock()
    lock.acquire()
    return lock


def fire(entry: Entry) -> None:
    """Complete `entry` towards its caller: release its latch or run its callback."""
    cb = entry.callback
    if cb is None:
        entry.latch.release()  # type: ignore[union-attr]
        return
    try:
        cb(entry.result, entry.error)
    except Exception:  # a caller's bug must not kill an instance thread
        _log.exception("scheduler callback failed")


class Scheduler:
    """Queues and runs requests for one loaded model version (the modes subclass this)."""

    def __init__(
        self,
        model_name: str,
        instances: Sequence[Instance],
        policy: BatchPolicy,
        stats: ModelStats,
        *,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if not instances:
            raise ValueError(f"model '{model_name}' has no instances")
        self.model_name = model_name
        self._instances = tuple(instances)
        self._stats = stats
        self._clock = clock
        self._queue = BatchQueue(policy)
        self._run_ctx = BatchContext(model_name, policy.max_batch_size > 0, stats, clock)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._closing = False
        self._stopped = False
        self._ordered = False  # completions strictly in arrival order (preserve_ordering)
        self._order_lock = threading.RLock()
        self._held: dict[int, Entry] = {}
        self._next_seq = 0
        self._setup(policy)

    def _setup(self, policy: BatchPolicy) -> None:
        """The mode's own state and threads, after the shared state exists."""

    # -- the interface every mode offers -------------------------------------------------

    def infer(self, item: WorkItem) -> dict[str, np.ndarray]:
        """Run one request and return views of its rows of its requested outputs. Blocks the
        calling thread; raises an InferenceError (with `item.failure_reason` set) on failure."""
        raise NotImplementedError

    def submit(self, item: WorkItem, callback: Callback) -> None:
        """Non-blocking `infer`: `callback(outputs, None)` or `callback(None, error)` runs
        exactly once, on whichever thread completes the request or, for an immediate refusal
        (queue full, shutting down), on the calling thread before `submit` returns. It must
        be quick and must not block."""
        entry = Entry(item)
        entry.callback = callback
        try:
            self._enqueue(entry)
        except InferenceError as exc:
            callback(None, exc)

    def _enqueue(self, entry: Entry) -> None:
        """Queue `entry` for the mode's workers, or raise its refusal (modes that queue)."""
        raise NotImplementedError

    def cancel(self, item: WorkItem) -> bool:
        """Fail a still-queued request with Cancelled now; False when it already left the
        queue (running requests cannot be stopped; their result is simply not wanted)."""
        with self._lock:
            entry = self._queue.find(item)
            if entry is None or not self._queue.remove(entry):
                return False
            self._stats.pending(-1)
        entry.fail(Cancelled("Request was cancelled"), "CANCELED")
        self._finish([entry])
        return True

    def close(self, timeout_s: float) -> None:
        """Stop accepting (new requests get Unavailable "Server exiting"), let queued and
        running work finish within `timeout_s`, then fail what is still queued. A batch still
        running after the timeout completes normally on its (daemon) thread."""
        end = time.monotonic() + max(timeout_s, 0.0)
        with self._lock:
            self._closing = True
            self._cv.notify_all()
        self._wait_quiet(end)
        with self._lock:
            self._stopped = True
            leftovers = self._queue.drain()
            if leftovers:
                self._stats.pending(-len(leftovers))
            self._cv.notify_all()
        for e in leftovers:
            e.fail(Closed("Server exiting"), "OTHER")
        self._finish(leftovers)
        self._closed()

    # -- hooks for the modes ---------------------------------------------------------------

    def _wait_quiet(self, end: float) -> None:
        """Wait (until monotonic `end` at most) for queued and running work to finish."""

    def _closed(self) -> None:
        """After close: release what the mode holds (threads end by themselves)."""

    # -- shared machinery ------------------------------------------------------------------

    @staticmethod
    def _refuse(entry: Entry) -> InferenceError:
        error = Closed("Server exiting")
        entry.fail(error, "OTHER")
        return error

    def _finish(self, entries: list[Entry]) -> None:
        """Complete entries; with preserve_ordering, strictly in arrival order."""
        if not self._ordered:
            for e in entries:
                e.state = DONE
                fire(e)
            return
        with self._order_lock:
            for e in entries:
                e.state = DONE
                self._held[e.seq] = e
            while (ready := self._held.pop(self._next_seq, None)) is not None:
                self._next_seq += 1
                fire(ready)

    def _await(self, entry: Entry) -> None:
        """Block until `entry` completes; leave the queue by ourselves when its REJECT
        deadline passes, so the caller learns promptly even while all instances are busy."""
        lock = entry.latch
        assert lock is not None
        if entry.deadline_ns and entry.reject:
            while entry.state == QUEUED:
                left = (entry.deadline_ns - self._clock()) / 1e9
                if lock.acquire(timeout=min(max(left, 0.0), MAX_WAIT_S)):
                    return
                if entry.deadline_ns > self._clock():
                    continue  # a long deadline is waited out in steps
                with self._lock:
                    expired = self._queue.expire(self._clock()) if entry.state == QUEUED else []
                    if expired:
                        self._stats.pending(-len(expired))
                if expired:
                    self._finish(expired)
        lock.acquire()

    def _leave_queue(self, entry: Entry) -> bool:
        """Take a still-queued `entry` out (its caller stopped waiting); False if it left."""
        with self._lock:
            if self._queue.remove(entry):
                self._stats.pending(-1)
                return True
        return False
