"""Per-model-version scheduler: hands requests to model instances, batching them when asked.

The rules (priority levels, queue policy, which requests form a batch, when waiting for more
is worth it) live in `tributary.batchqueue`, pure and clock-injected; one execution (concatenate,
run, check, split into views) is `tributary.batchrun`. This module adds the threads and locks.
It knows numpy and the error family, never protobuf or gRPC.

Two modes, chosen by `BatchPolicy.batching` (dynamic batching on a model with a batch dim):

- Batching: one thread per instance. A thread that is free asks the queue for a batch (so
  batches form when an instance becomes free and grow with load by themselves), concatenates
  the inputs once, runs, checks each output's first dimension against the batch rows and hands
  every request views of its own rows of its own requested outputs.
- Direct: no threads. `infer` runs the request inline on the caller's thread on a free instance
  (no hand-off: the fastest path). When none is free, callers wait in the same priority queue
  (queue size, timeouts, cancellation apply) and a finishing caller hands its instance straight
  to the next waiter. `submit` runs on a small executor sized to the instance count.

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
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .batchqueue import (
    DONE,
    QUEUED,
    TAKEN,
    BatchPolicy,
    BatchQueue,
    Callback,
    Entry,
    QueuePolicy,
    SequenceFlags,
    WorkItem,
)
from .batchrun import BatchContext, Instance, run_batch
from .errors import Cancelled, InferenceError, Unavailable
from .stats import ModelStats

__all__ = [
    "BatchPolicy",
    "Callback",
    "Closed",
    "Instance",
    "QueuePolicy",
    "Scheduler",
    "SequenceFlags",
    "WorkItem",
]

_log = logging.getLogger(__name__)

_MAX_WAIT_S = 3600.0
"""The longest single wait on a lock or condition: longer deadlines are waited out in steps,
so no client-supplied timeout can reach a platform limit (time_t) in a wait call."""


class Closed(Unavailable):
    """A request this scheduler refused, or dropped from its queue, because it is closing.

    At shutdown that is the answer. When a reload or unload retired the scheduler, the
    request had resolved its version just before the swap; the servicer routes it again."""


def _latch() -> threading.Lock:
    """A one-shot signal: cheaper than an Event, released exactly once by the completer."""
    lock = threading.Lock()
    lock.acquire()
    return lock


def _fire(entry: Entry) -> None:
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
    """Queues, batches and runs requests for one loaded model version."""

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
        self._batching = self._queue.batching
        self._run_ctx = BatchContext(model_name, policy.max_batch_size > 0, stats, clock)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._closing = False
        self._stopped = False
        self._ordered = policy.preserve_ordering and self._batching
        self._order_lock = threading.RLock()
        self._held: dict[int, Entry] = {}
        self._next_seq = 0
        self._free: list[Instance] = []
        # Batching mode: instances whose thread is waiting for work, and instances a caller
        # borrowed to run its lone request inline (see `_enqueue_or_borrow`).
        self._idle: set[Instance] = set()
        self._borrowed: set[Instance] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._threads: list[threading.Thread] = []
        if self._batching:
            for inst in self._instances:
                t = threading.Thread(
                    target=self._worker, args=(inst,), name=f"{model_name}/{inst.name}", daemon=True
                )
                self._threads.append(t)
                t.start()
        else:
            self._free = list(self._instances)

    # -- public API ---------------------------------------------------------------------

    def infer(self, item: WorkItem) -> dict[str, np.ndarray]:
        """Run one request and return views of its rows of its requested outputs. Blocks the
        calling thread; raises an InferenceError (with `item.failure_reason` set) on failure."""
        entry = Entry(item)
        if not self._batching:
            return self._infer_direct(entry)
        entry.latch = _latch()
        borrowed = self._enqueue_or_borrow(entry)
        if borrowed is not None:
            return self._run_borrowed(entry, *borrowed)
        try:
            self._await(entry)
        except BaseException:
            self._abandon(entry)
            raise
        if entry.error is not None:
            raise entry.error
        return entry.result  # type: ignore[return-value]

    def submit(self, item: WorkItem, callback: Callback) -> None:
        """Non-blocking `infer`: `callback(outputs, None)` or `callback(None, error)` runs
        exactly once, on whichever thread completes the request (an instance thread, the
        direct-mode executor, a thread that noticed its timeout) or, for an immediate refusal
        (queue full, shutting down), on the calling thread before `submit` returns. It must
        be quick and must not block."""
        entry = Entry(item)
        entry.callback = callback
        try:
            if self._batching:
                self._enqueue(entry)
                return
            inst = self._acquire_or_enqueue(entry)
        except InferenceError as exc:
            callback(None, exc)
            return
        if inst is not None:
            self._executor_for_direct().submit(self._run_direct_async, entry, inst)

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
        if self._batching:
            for t in self._threads:
                t.join(max(end - time.monotonic(), 0.0))
            with self._lock:
                while self._borrowed:  # callers still running inline
                    left = end - time.monotonic()
                    if left <= 0 or not self._cv.wait(left):
                        break
        else:
            with self._lock:
                while len(self._queue) or len(self._free) < len(self._instances):
                    left = end - time.monotonic()
                    if left <= 0 or not self._cv.wait(left):
                        break
        with self._lock:
            self._stopped = True
            leftovers = self._queue.drain()
            if leftovers:
                self._stats.pending(-len(leftovers))
            self._cv.notify_all()
        for e in leftovers:
            e.fail(Closed("Server exiting"), "OTHER")
        self._finish(leftovers)
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    # -- batching mode ------------------------------------------------------------------

    @staticmethod
    def _refuse(entry: Entry) -> InferenceError:
        error = Closed("Server exiting")
        entry.fail(error, "OTHER")
        return error

    def _enqueue(self, entry: Entry) -> None:
        with self._lock:
            if self._closing:
                raise self._refuse(entry)
            self._queue.push(entry, self._clock())
            self._stats.pending(1)
            self._cv.notify()

    def _enqueue_or_borrow(self, entry: Entry) -> tuple[Instance, list[Entry], int] | None:
        """Queue `entry`; if it is alone, an instance thread is idle and the queue's own
        decision is to run it now (no batch window worth waiting for), borrow that instance
        instead so the caller runs it inline. This saves two thread hand-offs per request at
        low load; the batching decision itself is the same one the instance thread would make.
        """
        dropped: list[Entry] = []
        with self._lock:
            if self._closing:
                raise self._refuse(entry)
            now = self._clock()
            self._queue.push(entry, now)
            self._stats.pending(1)
            if self._idle and len(self._queue) == 1 and not self._ordered:
                plan = self._queue.next_batch(now)
                dropped = plan.dropped
                gone = len(plan.batch) + len(dropped)
                if gone:
                    self._stats.pending(-gone)
                if plan.batch:
                    inst = self._idle.pop()
                    self._borrowed.add(inst)
                    return inst, plan.batch, plan.rows
            self._cv.notify()
        if dropped:
            self._finish(dropped)
        return None

    def _run_borrowed(
        self, entry: Entry, inst: Instance, batch: list[Entry], rows: int
    ) -> dict[str, np.ndarray]:
        try:
            run_batch(self._run_ctx, batch, rows, inst)
        finally:
            with self._lock:
                self._borrowed.discard(inst)
                self._queue.finished(len(batch))
                self._cv.notify_all()  # its thread may resume; queued work may be waiting
        entry.state = DONE
        if entry.error is not None:
            raise entry.error
        return entry.result  # type: ignore[return-value]

    def _worker(self, inst: Instance) -> None:
        """One instance's loop: wait for a batch worth running, run it, repeat."""
        queue = self._queue
        while True:
            with self._lock:
                while True:
                    if self._stopped or (self._closing and not len(queue)):
                        self._idle.discard(inst)
                        return
                    if inst in self._borrowed:  # a caller is running on it inline
                        self._cv.wait()
                        continue
                    now = self._clock()
                    plan = queue.next_batch(now, flush=self._closing)
                    gone = len(plan.batch) + len(plan.dropped)
                    if gone:
                        self._stats.pending(-gone)
                        break
                    wait = plan.wait_until_ns
                    if wait is None:
                        self._idle.add(inst)  # nothing queued: a caller may borrow us
                    self._cv.wait(
                        None if wait is None else min(max(wait - now, 0) / 1e9, _MAX_WAIT_S)
                    )
                    self._idle.discard(inst)
                if plan.batch and len(queue):
                    self._cv.notify()  # the rest may suit an idle sibling
            if plan.dropped:
                self._finish(plan.dropped)
            if plan.batch:
                run_batch(self._run_ctx, plan.batch, plan.rows, inst)
                with self._lock:
                    queue.finished(len(plan.batch))
                self._finish(plan.batch)

    def _finish(self, entries: list[Entry]) -> None:
        """Complete entries; with preserve_ordering, strictly in arrival order."""
        if not self._ordered:
            for e in entries:
                e.state = DONE
                _fire(e)
            return
        with self._order_lock:
            for e in entries:
                e.state = DONE
                self._held[e.seq] = e
            while (ready := self._held.pop(self._next_seq, None)) is not None:
                self._next_seq += 1
                _fire(ready)

    def _await(self, entry: Entry) -> None:
        """Block until `entry` completes; leave the queue by ourselves when its REJECT
        deadline passes, so the caller learns promptly even while all instances are busy."""
        latch = entry.latch
        assert latch is not None
        if entry.deadline_ns and entry.reject:
            while entry.state == QUEUED:
                left = (entry.deadline_ns - self._clock()) / 1e9
                if latch.acquire(timeout=min(max(left, 0.0), _MAX_WAIT_S)):
                    return
                if entry.deadline_ns > self._clock():
                    continue  # a long deadline is waited out in steps
                with self._lock:
                    expired = self._queue.expire(self._clock()) if entry.state == QUEUED else []
                    if expired:
                        self._stats.pending(-len(expired))
                if expired:
                    self._finish(expired)
        latch.acquire()

    # -- direct mode ----------------------------------------------------------------------

    def _acquire_or_enqueue(self, entry: Entry) -> Instance | None:
        """A free instance for `entry` now, or None after queueing it (raises when refused)."""
        with self._lock:
            if self._closing:
                raise self._refuse(entry)
            now = self._clock()
            if self._free and not len(self._queue):
                entry.enqueue_ns = now
                entry.state = TAKEN
                return self._free.pop()
            self._queue.push(entry, now)
            self._stats.pending(1)
            return None

    def _infer_direct(self, entry: Entry) -> dict[str, np.ndarray]:
        entry.latch = _latch()
        inst = self._acquire_or_enqueue(entry)
        if inst is None:
            try:
                self._await(entry)  # released when an instance is handed over, or on failure
            except BaseException:
                self._abandon(entry)
                raise
            if entry.error is not None:
                raise entry.error
            inst = entry.instance
        active = entry.item.is_active
        try:
            if active is not None and not active():
                entry.fail(Cancelled("Request was cancelled"), "CANCELED")
            else:
                run_batch(self._run_ctx, [entry], entry.item.rows, inst)
        finally:
            self._release(inst)
        entry.state = DONE
        if entry.error is not None:
            raise entry.error
        return entry.result  # type: ignore[return-value]

    def _run_direct_async(self, entry: Entry, inst: Instance) -> None:
        try:
            run_batch(self._run_ctx, [entry], entry.item.rows, inst)
        finally:
            self._release(inst)
        entry.state = DONE
        _fire(entry)

    def _release(self, inst: Instance) -> None:
        """Give `inst` to the next waiter (priority, then FIFO), or back to the pool."""
        with self._lock:
            if not len(self._queue):  # nobody waiting: the common case
                self._free.append(inst)
                if self._closing:
                    self._cv.notify_all()
                return
            plan = self._queue.next_batch(self._clock(), flush=True)
            gone = len(plan.batch) + len(plan.dropped)
            if gone:
                self._stats.pending(-gone)
            nxt = plan.batch[0] if plan.batch else None
            if nxt is None:
                self._free.append(inst)
                if self._closing:
                    self._cv.notify_all()
        self._finish(plan.dropped)
        if nxt is None:
            return
        nxt.instance = inst
        if nxt.callback is None:
            nxt.latch.release()  # type: ignore[union-attr]
        else:
            self._executor_for_direct().submit(self._run_direct_async, nxt, inst)

    def _abandon(self, entry: Entry) -> None:
        """The caller of `infer` stops waiting (an exception while it waited): take `entry` out
        of the queue, or, when an instance was already handed to it, give that instance on so
        it can never be lost. Batching mode: a taken entry simply runs and is discarded."""
        with self._lock:
            if self._queue.remove(entry):
                self._stats.pending(-1)
                return
        if self._batching:
            return
        entry.latch.acquire()  # type: ignore[union-attr]  # the hand-over is under way
        if entry.error is None and entry.instance is not None:
            self._release(entry.instance)

    def _executor_for_direct(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=len(self._instances), thread_name_prefix=self.model_name
                )
            return self._executor
