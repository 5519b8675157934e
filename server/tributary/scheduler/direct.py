"""Direct mode (no `dynamic_batching`): each request runs alone on a free instance.

No threads of its own: `infer` runs the request inline on the caller's thread on a free
instance (no hand-off: the fastest path). When none is free, callers wait in the same priority
queue (queue size, timeouts, cancellation apply) and a finishing caller hands its instance
straight to the next waiter. `submit` runs on a small executor sized to the instance count.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import Cancelled, InferenceError
from .base import Scheduler, latch
from .batchqueue import DONE, TAKEN, BatchPolicy, Callback, Entry, WorkItem
from .batchrun import Instance, run_batch


class DirectScheduler(Scheduler):
    """Requests run one at a time per instance, on the caller's thread where possible."""

    def _setup(self, policy: BatchPolicy) -> None:
        self._free: list[Instance] = list(self._instances)
        self._executor: ThreadPoolExecutor | None = None

    def infer(self, item: WorkItem) -> dict[str, np.ndarray]:
        entry = Entry(item)
        entry.latch = latch()
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

    def submit(self, item: WorkItem, callback: Callback) -> None:
        entry = Entry(item)
        entry.callback = callback
        try:
            inst = self._acquire_or_enqueue(entry)
        except InferenceError as exc:
            callback(None, exc)
            return
        if inst is not None:
            self._executor_for_async().submit(self._run_async, entry, inst)

    def _wait_quiet(self, end: float) -> None:
        with self._lock:
            while len(self._queue) or len(self._free) < len(self._instances):
                left = end - time.monotonic()
                if left <= 0 or not self._cv.wait(left):
                    break

    def _closed(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)

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

    def _run_async(self, entry: Entry, inst: Instance) -> None:
        try:
            run_batch(self._run_ctx, [entry], entry.item.rows, inst)
        finally:
            self._release(inst)
        self._finish([entry])

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
            self._executor_for_async().submit(self._run_async, nxt, inst)

    def _abandon(self, entry: Entry) -> None:
        """The caller of `infer` stops waiting (an exception while it waited): take `entry` out
        of the queue, or, when an instance was already handed to it, give that instance on so
        it can never be lost."""
        if self._leave_queue(entry):
            return
        entry.latch.acquire()  # type: ignore[union-attr]  # the hand-over is under way
        if entry.error is None and entry.instance is not None:
            self._release(entry.instance)

    def _executor_for_async(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=len(self._instances), thread_name_prefix=self.model_name
                )
            return self._executor
