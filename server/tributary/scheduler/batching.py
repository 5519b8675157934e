"""Dynamic batching mode (`dynamic_batching` on a model with a batch dimension).

One thread per instance. A thread that is free asks the queue for a batch (so batches form
when an instance becomes free and grow with load by themselves), concatenates the inputs once,
runs, checks each output's first dimension against the batch rows and hands every request
views of its own rows of its own requested outputs. A lone request arriving at an idle
instance is run inline on its caller's thread instead (same batching decision, two thread
hand-offs fewer).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .base import MAX_WAIT_S, Scheduler, latch
from .batchqueue import DONE, BatchPolicy, Entry, WorkItem
from .batchrun import Instance, run_batch


class BatchingScheduler(Scheduler):
    """Requests queue and run in batches formed when an instance becomes free."""

    def _setup(self, policy: BatchPolicy) -> None:
        self._ordered = policy.preserve_ordering
        # Instances whose thread is waiting for work, and instances a caller borrowed to run
        # its lone request inline (see `_enqueue_or_borrow`).
        self._idle: set[Instance] = set()
        self._borrowed: set[Instance] = set()
        self._threads: list[threading.Thread] = []
        for inst in self._instances:
            t = threading.Thread(
                target=self._worker,
                args=(inst,),
                name=f"{self.model_name}/{inst.name}",
                daemon=True,
            )
            self._threads.append(t)
            t.start()

    def infer(self, item: WorkItem) -> dict[str, np.ndarray]:
        entry = Entry(item)
        entry.latch = latch()
        borrowed = self._enqueue_or_borrow(entry)
        if borrowed is not None:
            return self._run_borrowed(entry, *borrowed)
        try:
            self._await(entry)
        except BaseException:
            self._leave_queue(entry)  # a taken entry simply runs and is discarded
            raise
        if entry.error is not None:
            raise entry.error
        return entry.result  # type: ignore[return-value]

    def _wait_quiet(self, end: float) -> None:
        for t in self._threads:
            t.join(max(end - time.monotonic(), 0.0))
        with self._lock:
            while self._borrowed:  # callers still running inline
                left = end - time.monotonic()
                if left <= 0 or not self._cv.wait(left):
                    break

    def _enqueue(self, entry: Entry) -> None:
        with self._lock:
            if self._closing:
                raise self._refuse(entry)
            self._queue.push(entry, self._clock())
            self._stats.pending(1)
            self._wake_one()

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
            self._wake_one()
        if dropped:
            self._finish(dropped)
        return None

    def _wake_one(self) -> None:
        """Tell one instance thread that work is queued (call with the lock held).

        The threads share one Condition, and the thread of a borrowed instance goes back to
        sleep when woken. A single notify that reaches it is lost while another instance sits
        idle, and the work would wait for the borrow to end. So while any instance is
        borrowed every thread is woken (there are few of them); otherwise every waiter acts
        on a wake-up (an idle thread takes the work, one waiting out a window re-decides)
        and one is enough."""
        if self._borrowed:
            self._cv.notify_all()
        else:
            self._cv.notify()

    def _run_borrowed(
        self, entry: Entry, inst: Instance, batch: list[Entry], rows: int
    ) -> dict[str, np.ndarray]:
        try:
            run_batch(self._run_ctx, batch, rows, inst)
        finally:
            with self._lock:
                self._borrowed.discard(inst)
                self._queue.finished(len(batch))
                if len(self._queue) or self._closing:
                    self._cv.notify_all()  # its thread resumes: queued work, or exit
                else:
                    # Nothing to do: the instance is idle again without waking its thread
                    # (it sleeps until an arrival notifies it). At low load that is a
                    # thread wake-up saved per request.
                    self._idle.add(inst)
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
                        # (a finished borrower may have marked it idle while we slept)
                        self._idle.discard(inst)
                        break
                    wait = plan.wait_until_ns
                    if wait is None:
                        self._idle.add(inst)  # nothing queued: a caller may borrow us
                    else:
                        self._idle.discard(inst)  # waiting out a window: not free to borrow
                    self._cv.wait(
                        None if wait is None else min(max(wait - now, 0) / 1e9, MAX_WAIT_S)
                    )
                    self._idle.discard(inst)
                if plan.batch and len(queue):
                    self._wake_one()  # the rest may suit an idle sibling
            if plan.dropped:
                self._finish(plan.dropped)
            if plan.batch:
                run_batch(self._run_ctx, plan.batch, plan.rows, inst)
                with self._lock:
                    queue.finished(len(plan.batch))
                self._finish(plan.batch)
