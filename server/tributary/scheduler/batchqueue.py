"""The pure core of the scheduler: priority queues, queue policy and batch formation.

Nothing here starts a thread, sleeps or reads a clock: every method takes `now_ns`, so the
rules (which request runs next, with whom, and whether it is worth waiting for more) are unit
tested with plain integers. The scheduler modes (`direct.py`, `batching.py`) drive it under
their lock.

Queue policy (docs/model-config.md#batching). Requests go to priority level
1..`priority_levels` (1 is the highest); priority 0 or beyond the last level means
`default_priority_level`, Triton's rule (a default outside 1..levels falls back to the lowest
level). Each level has its own `QueuePolicy`:

- `max_queue_size` (0 = unbounded) counts queued requests of that level; full → `Unavailable`
  "Exceeds maximum queue size", immediately.
- Timeout, our reading of Triton: the level's `default_timeout_us` applies; a request's own
  `timeout_us` can only *lower* it, and only with `allow_timeout_override` — except when the
  default is 0 (no timeout), where the request's timeout is the only one and applies as given.
  The timeout covers time in the queue, not execution.
- On expiry, REJECT removes the request with `Unavailable` "Request timeout expired"; DELAY moves
  it behind every not-yet-expired request of its level (still ahead of lower levels).

Batch formation (`next_batch`, called when an instance is free): the head is the oldest request
of the highest non-empty level (not-yet-delayed before delayed). Compatible requests (same input
names, dtypes and non-batch shapes) are added in queue order while their ROWS fit in
`max_batch_size`; incompatible ones are skipped, left for a later batch. A single request larger
than `max_batch_size` still runs alone. Requests whose `is_active()` is False are dropped with
`Cancelled` before they run.

When to send, and the adaptive window (the product requirement: a lone request at low load must
not pay the batch window for nothing, while heavy load still builds full batches). Send now when
the batch is full (max rows, or a compatible request did not fit), when its rows equal a preferred
size, when the window (`max_queue_delay_us` from the OLDEST request in the batch) has passed, or
when closing. Otherwise wait only if another request is predicted inside the window:
  1. someone is missing: `peak`, the most requests seen in the system (queued + executing) at
     an arrival, exceeds how many are in it now. A client sending one request at a time
     cannot send another while its request is here, so when every client we know of is already
     queued or executing, waiting only adds latency. This is what keeps a lone sequential
     client, or N clients on N instances, from ever waiting;
  2. the stream is flowing: an EWMA (alpha 1/4) of inter-arrival gaps predicts the next arrival
     before the window closes (last_arrival + gap <= window end), and the last arrival is
     recent (now - last_arrival <= patience = max(2 * gap, 20 us)).
Then it waits until min(window end, last_arrival + patience), re-deciding on every arrival. A
wait that ends without the missing requests (window over, stream quiet) lowers `peak` to the
number present, so a wrong estimate costs one window at most; an idle gap longer than twice the
window forgets both estimates. If a preferred size was passed on the way (rows hit it exactly
with more behind), that prefix is sent instead of waiting. Triton instead always holds a batch
below its preferred/max size for the whole `max_queue_delay`: at low load every request pays it.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import Cancelled, InferenceError, Unavailable

if TYPE_CHECKING:
    from ..stats import ModelStats

QUEUED, TAKEN, DONE = 0, 1, 2
"""Entry states. Only the holder of the scheduler lock moves an entry between them."""

Callback = Callable[[dict[str, np.ndarray] | None, InferenceError | None], None]
"""How `Scheduler.submit` reports: (outputs, None) on success, (None, error) on failure."""

_ALPHA = 0.25
_MIN_PATIENCE_NS = 20_000
_SCAN_LIMIT = 512
"""At most this many requests are examined beyond the head per batch, so a long queue of
incompatible shapes cannot make batch formation quadratic."""


@dataclass(frozen=True)
class QueuePolicy:
    """One priority level's ModelQueuePolicy. `reject_on_timeout` False means DELAY."""

    reject_on_timeout: bool = True
    default_timeout_us: int = 0
    allow_timeout_override: bool = False
    max_queue_size: int = 0


@dataclass(frozen=True)
class BatchPolicy:
    """What the model config says about scheduling (max_batch_size + dynamic_batching)."""

    max_batch_size: int = 0
    dynamic: bool = False
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 0
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = field(default_factory=QueuePolicy)
    priority_queue_policy: Mapping[int, QueuePolicy] = field(default_factory=dict)

    @property
    def batching(self) -> bool:
        """Requests are merged only with dynamic batching on a model with a batch dimension."""
        return self.dynamic and self.max_batch_size > 0


@dataclass(frozen=True, slots=True)
class SequenceFlags:
    """A request's sequence parameters (docs/protocol.md#sequences), parsed and bounded by the
    codec. `id` is the correlation ID: an int (the int64 parameter read as uint64, as Triton
    reads it) or a string; 0 and "" mean the request names no sequence."""

    id: int | str
    start: bool = False
    end: bool = False


@dataclass(eq=False)
class WorkItem:
    """One request as the scheduler sees it. The fields after `request_id` are outputs: the
    scheduler fills them before the request completes (successfully or not), and the caller
    records them as per-request statistics (`count_success`, `ModelStats.request_failure`)."""

    inputs: dict[str, np.ndarray]
    rows: int
    outputs: tuple[str, ...]
    priority: int = 0
    timeout_us: int = 0
    is_active: Callable[[], bool] | None = None
    request_id: str = ""
    sequence: SequenceFlags | None = None  # set when the request carries sequence parameters
    # Filled by the scheduler (nanoseconds of its clock). The two starts are absolute (0: not
    # reached) so tracing can place the queue and compute spans; the rest are durations.
    queue_start_ns: int = field(default=0, init=False)
    compute_start_ns: int = field(default=0, init=False)
    queue_ns: int = field(default=0, init=False)
    compute_input_ns: int = field(default=0, init=False)
    compute_infer_ns: int = field(default=0, init=False)
    compute_output_ns: int = field(default=0, init=False)
    batch_rows: int = field(default=0, init=False)
    failure_reason: str = field(default="", init=False)

    def count_success(self, stats: ModelStats, total_ns: int) -> None:
        """Record this request as a success in `stats`, with the timings the scheduler
        stamped on it (one rule for a request and for an ensemble's step)."""
        stats.request_success(
            total_ns=total_ns,
            queue_ns=self.queue_ns,
            compute_input_ns=self.compute_input_ns,
            compute_infer_ns=self.compute_infer_ns,
            compute_output_ns=self.compute_output_ns,
            rows=self.rows,
            now_ms=time.time_ns() // 1_000_000,
        )


@dataclass(eq=False, slots=True, weakref_slot=True)
class Entry:
    """A queued WorkItem plus the scheduler's bookkeeping for it (identity-compared)."""

    item: WorkItem
    level: int = 0
    key: tuple[Any, ...] = ()
    enqueue_ns: int = 0
    deadline_ns: int = 0
    reject: bool = True
    delayed: bool = False
    seq: int = -1
    state: int = QUEUED
    result: dict[str, np.ndarray] | None = None
    error: InferenceError | None = None
    instance: Any = None
    latch: threading.Lock | None = None
    callback: Callback | None = None

    def fail(self, error: InferenceError, reason: str) -> None:
        self.error = error
        self.item.failure_reason = reason


@dataclass
class Plan:
    """What a free instance should do now: run `batch` (may be empty), else look again at
    `wait_until_ns` (None: only when something arrives). `dropped` entries left the queue
    (expired or cancelled) with their error set; the driver must complete them."""

    batch: list[Entry]
    rows: int
    wait_until_ns: int | None
    dropped: list[Entry]


def _still_wanted(item: WorkItem) -> bool:
    """Ask `is_active`; a callback that raises counts as "client gone", never as a crash."""
    try:
        return bool(item.is_active())  # type: ignore[misc]
    except Exception:
        return False


def request_prefix(request_id: str) -> str:
    """Triton's `[request id: <id>] ` prefix on queue errors (docs/protocol.md#errors)."""
    return f"[request id: {request_id or '<id_unknown>'}] "


def batch_key(inputs: Mapping[str, np.ndarray]) -> tuple[Any, ...]:
    """Requests with equal keys can be concatenated along the first dimension."""
    return tuple((name, a.dtype, a.shape[1:]) for name, a in sorted(inputs.items()))


def effective_timeout_us(policy: QueuePolicy, request_timeout_us: int) -> int:
    """The queue timeout of one request (0 = none); see the module docstring for the rule."""
    default = policy.default_timeout_us
    if request_timeout_us <= 0:
        return default
    if default == 0:
        return request_timeout_us
    if policy.allow_timeout_override:
        return min(default, request_timeout_us)
    return default


class _Level:
    __slots__ = ("policy", "main", "delayed")

    def __init__(self, policy: QueuePolicy) -> None:
        self.policy = policy
        self.main: deque[Entry] = deque()
        self.delayed: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self.main) + len(self.delayed)


class BatchQueue:
    """Priority queues + batch formation for one model version. Not thread-safe by design: the
    scheduler serialises calls under its own lock."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self.batching = policy.batching
        self._max_rows = policy.max_batch_size if self.batching else 0
        self._preferred = frozenset(
            p for p in policy.preferred_batch_sizes if 0 < p <= policy.max_batch_size
        )
        self._delay_ns = policy.max_queue_delay_us * 1000 if self.batching else 0
        n = max(policy.priority_levels, 0)
        if n == 0:
            self._levels = [_Level(policy.default_queue_policy)]
            self._default_index = 0
        else:
            self._levels = [
                _Level(policy.priority_queue_policy.get(lv, policy.default_queue_policy))
                for lv in range(1, n + 1)
            ]
            d = policy.default_priority_level
            self._default_index = d - 1 if 1 <= d <= n else n - 1
        self._count = 0
        self._running = 0
        self._seq = 0
        # Weak references, so a request that left the queue early is not kept alive (with its
        # tensors) until its deadline passes; stale heap slots are skipped lazily.
        self._deadlines: list[tuple[int, int, weakref.ref[Entry]]] = []
        self._tiebreak = itertools.count()
        self._last_arrival_ns: int | None = None
        self._gap_ns: float | None = None
        self._peak = 0  # estimated number of concurrent clients (see the module docstring)

    def __len__(self) -> int:
        return self._count

    @property
    def running(self) -> int:
        """Requests taken into batches and not yet `finished` (batching mode only)."""
        return self._running

    def level_index(self, priority: int) -> int:
        """0-based index of the level serving `priority` (index 0 is level 1, the highest)."""
        if 1 <= priority <= len(self._levels) and self.policy.priority_levels > 0:
            return priority - 1
        return self._default_index

    def push(self, entry: Entry, now_ns: int) -> None:
        """Queue `entry` or raise Unavailable when its level is full (nothing is changed then)."""
        item = entry.item
        index = self.level_index(item.priority)
        level = self._levels[index]
        qp = level.policy
        if qp.max_queue_size and len(level) >= qp.max_queue_size:
            error = Unavailable(request_prefix(item.request_id) + "Exceeds maximum queue size")
            entry.fail(error, "REJECTED")
            raise error
        entry.level = index
        entry.enqueue_ns = item.queue_start_ns = now_ns
        entry.state = QUEUED
        entry.seq = self._seq
        self._seq += 1
        timeout_us = effective_timeout_us(qp, item.timeout_us)
        if timeout_us:
            entry.deadline_ns = now_ns + timeout_us * 1000
            entry.reject = qp.reject_on_timeout
            heapq.heappush(
                self._deadlines, (entry.deadline_ns, next(self._tiebreak), weakref.ref(entry))
            )
        if self.batching:
            entry.key = batch_key(item.inputs)
            if self._delay_ns:
                self._note_arrival(now_ns)
        level.main.append(entry)
        self._count += 1

    def find(self, item: WorkItem) -> Entry | None:
        """The queued entry of `item`, if any (a scan: only for rare events like cancel)."""
        for e in self._iter_queued():
            if e.item is item:
                return e
        return None

    def remove(self, entry: Entry) -> bool:
        """Take a still-queued entry out (caller gave up); False if it already left."""
        if entry.state != QUEUED:
            return False
        self._unlink(entry)
        entry.state = DONE
        return True

    def drain(self) -> list[Entry]:
        """Remove and return everything queued (shutdown)."""
        out = [e for level in self._levels for e in (*level.main, *level.delayed)]
        for e in out:
            self._unlink(e)
            e.state = DONE
        return out

    def finished(self, n_requests: int) -> None:
        """`n_requests` taken by `next_batch` finished executing."""
        self._running -= n_requests

    def expire(self, now_ns: int) -> list[Entry]:
        """Apply timeouts due by `now_ns`: REJECT entries are removed and returned with their
        error set; DELAY entries move behind their level's non-expired requests."""
        out: list[Entry] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now_ns:
            e = heapq.heappop(heap)[2]()
            if e is None or e.state != QUEUED:
                continue
            if e.reject:
                self._unlink(e)
                e.state = DONE
                e.fail(Unavailable("Request timeout expired"), "REJECTED")
                out.append(e)
            elif not e.delayed:
                level = self._levels[e.level]
                level.main.remove(e)
                level.delayed.append(e)
                e.delayed = True
        return out

    def next_batch(self, now_ns: int, *, flush: bool = False) -> Plan:
        """Decide for a free instance (see the module docstring). `flush` (shutdown) never
        waits for more."""
        dropped = self.expire(now_ns) if self._deadlines else []
        if not self._count:
            return Plan([], 0, self._next_deadline(), dropped)
        batch: list[Entry] = []
        rows = 0
        cut = 0  # len(batch) when rows last equalled a preferred size
        full = False
        key: tuple[Any, ...] | None = None
        scanned = 0
        max_rows = self._max_rows
        for e in self._iter_queued():
            if batch:
                scanned += 1
                if scanned > _SCAN_LIMIT:
                    break
                if e.key != key:
                    continue
                if rows + e.item.rows > max_rows:
                    full = True
                    continue
            if e.item.is_active is not None and not _still_wanted(e.item):
                dropped.append(e)
                continue
            batch.append(e)
            rows += e.item.rows
            if not self.batching:
                break
            key = e.key
            if rows in self._preferred:
                cut = len(batch)
            if rows >= max_rows:
                full = True
                break
        for e in dropped:
            if e.state == QUEUED:
                self._unlink(e)
                e.state = DONE
                e.fail(Cancelled("Request was cancelled"), "CANCELED")
        if not batch:
            return Plan([], 0, self._next_deadline(), dropped)
        take = len(batch)
        if self.batching and not (full or flush or cut == take) and self._delay_ns:
            window_end = min(e.enqueue_ns for e in batch) + self._delay_ns
            until = self._predict_wait(now_ns, window_end)
            if until is not None:
                if not cut:
                    deadline = self._next_deadline()
                    if deadline is not None:
                        until = min(until, deadline)
                    return Plan([], 0, until, dropped)
                take = cut
        if take < len(batch):
            batch = batch[:take]
            rows = sum(e.item.rows for e in batch)
        for e in batch:
            self._unlink(e)
            e.state = TAKEN
        if self.batching:
            self._running += len(batch)
        return Plan(batch, rows, None, dropped)

    # -- internals ------------------------------------------------------------------------

    def _iter_queued(self) -> Iterator[Entry]:
        for level in self._levels:
            yield from level.main
            yield from level.delayed

    def _unlink(self, e: Entry) -> None:
        level = self._levels[e.level]
        q = level.delayed if e.delayed else level.main
        if q[0] is e:
            q.popleft()
        else:
            q.remove(e)
        self._count -= 1

    def _next_deadline(self) -> int | None:
        heap = self._deadlines
        while heap and ((e := heap[0][2]()) is None or e.state != QUEUED):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _note_arrival(self, now_ns: int) -> None:
        last = self._last_arrival_ns
        self._last_arrival_ns = now_ns
        if last is not None and now_ns - last > 2 * self._delay_ns:
            self._gap_ns = None  # the stream was idle: forget what it looked like before
            self._peak = 0
            last = None
        self._peak = max(self._peak, self._count + self._running + 1)
        if last is not None:
            gap = float(now_ns - last)
            self._gap_ns = (
                gap if self._gap_ns is None else self._gap_ns + (gap - self._gap_ns) * _ALPHA
            )

    def _predict_wait(self, now_ns: int, window_end_ns: int) -> int | None:
        """When to look again if more requests are predicted inside the window, else None."""
        in_system = self._count + self._running
        if self._peak <= in_system:
            return None  # every client we know of is already queued or running
        gap = self._gap_ns
        last = self._last_arrival_ns
        if gap is not None and last is not None and now_ns < window_end_ns:
            patience = max(2.0 * gap, _MIN_PATIENCE_NS)
            if now_ns - last <= patience and last + gap <= window_end_ns:
                until = int(min(window_end_ns, last + patience))
                if until > now_ns:
                    return until
        self._peak = in_system  # the clients we expected did not come in time: fewer of them
        return None
