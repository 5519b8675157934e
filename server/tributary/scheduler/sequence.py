"""Sequence batching: stateful models see the requests of one sequence in order, one at a time.

A model with `sequence_batching` in its config gets this scheduler instead of the plain one
(docs/model-config.md#sequence-batching). Each request names its sequence with the
`sequence_id` parameter (int or string) and marks its first and last request with
`sequence_start` / `sequence_end`; the codec parses and bounds them into `WorkItem.sequence`.

Slots. Every instance owns a fixed number of batch slots: `max(1, max_batch_size)` with the
direct strategy, `max_candidate_sequences` (default the same) with oldest. A starting sequence
takes the free slot with the lowest index over all instances (so sequences spread over
instances before two share one) and keeps it until its END request has run, until it has been
idle for `max_sequence_idle_microseconds`, or until it is cancelled. With no free slot the
sequence waits in a backlog (FIFO) for one. A sequence's requests wait in its own queue; only
the head runs, and a slot's instance runs one batch at a time, so a sequence's requests run
strictly in order and never two at once.

Batches. Each instance's thread forms its batches from its own slots:
- direct: one row per slot, rows 0..(highest slot with a ready request); a slot without one
  gets a null row (copies of another row's inputs with READY false), so a sequence keeps its
  row. `max_queue_delay_microseconds` with `minimum_slot_utilization` may hold the batch for
  more ready slots.
- oldest: up to `max(1, max_batch_size)` ready sequences, oldest head request first, no null
  rows; the batch waits up to `max_queue_delay_microseconds` for a preferred size or a full
  batch; `preserve_ordering` completes requests in arrival order.
Control inputs (START, END, READY, CORRID) and implicit state inputs are added per row here;
clients never send them.

Implicit state (`sequence_batching.state`): after each execution the state outputs' rows are
kept with their sequence and fed back as the state inputs of its next request; START resets a
sequence to the initial state. The rules above are in `SequenceTable`, pure and fed a clock
value by the caller so they are unit tested without threads; `SequenceScheduler` adds the
threads, the lock and execution.

Bounds (docs/limits.md): open sequences are at most the slots plus `MAX_BACKLOG_SEQUENCES`
waiting for one; a sequence holds at most `MAX_QUEUED_PER_SEQUENCE` queued requests; idle
sequences are released; backlogged sequences whose client went away are dropped within
`BACKLOG_CHECK_NS`. Beyond a bound a request is refused with UNAVAILABLE.
"""

from __future__ import annotations

import functools
import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import Cancelled, InferenceError, Internal, InvalidArgument, Unavailable
from ..stats import ModelStats
from .base import MAX_WAIT_S, Closed, Scheduler, latch
from .batchqueue import QUEUED, TAKEN, BatchPolicy, Entry, WorkItem, batch_key
from .batchrun import BatchContext, Instance, run_instance, stamp

__all__ = [
    "MAX_BACKLOG_SEQUENCES",
    "MAX_QUEUED_PER_SEQUENCE",
    "Control",
    "SequencePolicy",
    "SequenceScheduler",
    "SequenceTable",
    "StateSpec",
]

_log = logging.getLogger(__name__)

MAX_BACKLOG_SEQUENCES = 4096
"""Sequences waiting for a free slot, per model version. Triton's backlog is unbounded; a flood
of START requests without END would grow it without limit."""
MAX_QUEUED_PER_SEQUENCE = 1024
"""Requests of one sequence waiting for their turn (a client may pipeline them on a stream)."""
BACKLOG_CHECK_NS = 250_000_000
"""How often backlogged sequences are checked for clients that went away (deadline passed,
stream cancelled): such a sequence leaves the backlog, its requests fail as cancelled, and its
waiting caller's thread is freed, instead of holding a backlog place (and a unary call's thread)
until a slot frees, which an active sequence may never do."""
START, END, READY, CORRID = "START", "END", "READY", "CORRID"


@dataclass(frozen=True)
class Control:
    """One control input the server feeds. Boolean kinds use `false`/`true` of `dtype`;
    CORRID carries the sequence's ID in `dtype` (object for TYPE_STRING), `wire` naming the
    type as error texts show it (UINT64, BYTES, ...)."""

    kind: str
    name: str
    dtype: Any  # a numpy dtype
    false: Any = 0
    true: Any = 1
    wire: str = ""


@dataclass(frozen=True)
class StateSpec:
    """One implicit state: fed as `input_name`, read back from `output_name`. `initial` is the
    value of one sequence's state (no batch dimension); None means zeros, variable dims 0."""

    input_name: str
    output_name: str
    dtype: Any  # a numpy dtype
    dims: tuple[int, ...]
    initial: np.ndarray | None = None

    def start_value(self) -> np.ndarray:
        return self._start

    @functools.cached_property
    def _start(self) -> np.ndarray:
        value = self.initial
        if value is None:
            value = np.zeros(tuple(max(d, 0) for d in self.dims), dtype=self.dtype)
        value.flags.writeable = False  # shared by every sequence that starts
        return value


@dataclass(frozen=True)
class SequencePolicy:
    """What the model config says about sequence batching, free of protobuf."""

    max_batch_size: int = 0
    oldest: bool = False
    max_sequence_idle_us: int = 1_000_000
    controls: tuple[Control, ...] = ()
    states: tuple[StateSpec, ...] = ()
    max_candidate_sequences: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    minimum_slot_utilization: float = 0.0
    preserve_ordering: bool = False
    max_backlog: int = MAX_BACKLOG_SEQUENCES
    max_queued_per_sequence: int = MAX_QUEUED_PER_SEQUENCE

    @property
    def slots_per_instance(self) -> int:
        if self.oldest and self.max_candidate_sequences > 0:
            return self.max_candidate_sequences
        return max(1, self.max_batch_size)

    @property
    def batch_cap(self) -> int:
        return max(1, self.max_batch_size)

    def control(self, kind: str) -> Control | None:
        return next((c for c in self.controls if c.kind == kind), None)

    def idle_inputs(self, rows: int) -> dict[str, np.ndarray]:
        """Control inputs of `rows` not-ready rows and the states' start values: what a run
        outside any sequence (warmup) adds to the config's inputs."""
        batched = self.max_batch_size > 0
        lead = (rows, 1) if batched else (1,)
        out: dict[str, np.ndarray] = {}
        for c in self.controls:
            if c.kind == CORRID and c.wire == "BYTES":
                out[c.name] = np.full(lead, "", dtype=object)
            else:
                out[c.name] = np.full(lead, 0 if c.kind == CORRID else c.false, dtype=c.dtype)
        for s in self.states:
            value = s.start_value()
            out[s.input_name] = np.stack([value] * rows) if batched else value
        return out


class _Seq:
    """One open sequence: its queue, its slot (None while in the backlog) and its state."""

    __slots__ = ("id", "queue", "slot", "last_ns", "state", "running", "cancelled", "expire_ns")

    def __init__(self, seq_id: int | str, now: int) -> None:
        self.id = seq_id
        self.queue: deque[Entry] = deque()
        self.slot: _Slot | None = None
        self.last_ns = now
        self.state: dict[str, np.ndarray] | None = None
        self.running = False
        self.cancelled = False
        self.expire_ns = 0  # backlog only: a request's timeout (0 = none)


class _Slot:
    __slots__ = ("instance", "index", "seq")

    def __init__(self, instance: int, index: int) -> None:
        self.instance = instance
        self.index = index
        self.seq: _Seq | None = None


@dataclass
class SeqPlan:
    """What an instance should run now: `rows` in batch order (entry None = a null row), or
    nothing and look again at `wait_until_ns`. `dropped` left their queues (cancelled) with
    their error set; the driver completes them."""

    rows: list[tuple[_Slot, Entry | None]]
    wait_until_ns: int | None
    dropped: list[Entry]


def _seq_text(seq_id: int | str) -> str:
    return str(seq_id)


class SequenceTable:
    """The pure core: slot assignment, backlog, per-sequence queues, batch formation, idle
    release. Not thread-safe (the scheduler calls it under its lock); never reads a clock."""

    def __init__(self, model: str, instances: int, policy: SequencePolicy) -> None:
        self.model = model
        self.policy = policy
        self.slots = [
            [_Slot(i, j) for j in range(policy.slots_per_instance)] for i in range(instances)
        ]
        self._free: list[tuple[int, int]] = [
            (j, i) for i in range(instances) for j in range(policy.slots_per_instance)
        ]
        heapq.heapify(self._free)
        self._by_id: dict[int | str, _Seq] = {}
        self._backlog: deque[_Seq] = deque()
        self._where: dict[WorkItem, _Seq] = {}
        self._arrivals = 0
        self.queued = 0
        self.next_reap_ns = 0
        self._corrid = policy.control(CORRID)

    # -- arrivals -------------------------------------------------------------------------

    def open_sequences(self) -> int:
        return sum(1 for row in self.slots for s in row if s.seq is not None) + len(self._backlog)

    def knows(self, seq_id: int | str) -> bool:
        return seq_id in self._by_id

    def check(self, item: WorkItem) -> None:
        """Triton's request checks, before anything is queued (INVALID_ARGUMENT)."""
        model = self.model
        if self.policy.max_batch_size > 0 and item.rows > 1:
            raise InvalidArgument(
                f"inference request to model '{model}' must specify batch-size 1 due to "
                "requirements of sequence batcher"
            )
        flags = item.sequence
        if flags is None or flags.id == 0 or flags.id == "":
            raise InvalidArgument(
                f"inference request to model '{model}' must specify a non-zero or non-empty "
                "correlation ID"
            )
        corrid = self._corrid
        if corrid is not None:
            is_str = isinstance(flags.id, str)
            if is_str != (corrid.wire == "BYTES"):
                got = "BYTES" if is_str else "UINT64"
                raise InvalidArgument(
                    f"sequence batching control 'CORRID' data-type is '{got}', but model "
                    f"'{model}' expects '{corrid.wire}'"
                )

    def enqueue(self, entry: Entry, now: int) -> int | None:
        """Queue a checked request; returns the instance whose thread should look (None:
        the sequence waits in the backlog). Raises for a sequence that did not START and for
        the open-sequence bounds."""
        flags = entry.item.sequence
        assert flags is not None
        seq = self._by_id.get(flags.id)
        if seq is None:
            if not flags.start:
                raise InvalidArgument(
                    f"inference request for sequence {_seq_text(flags.id)} to model "
                    f"'{self.model}' must specify the START flag on the first request of the "
                    "sequence"
                )
            if not self._free and len(self._backlog) >= self.policy.max_backlog:
                raise Unavailable(
                    f"inference request for sequence {_seq_text(flags.id)} to model "
                    f"'{self.model}' was refused: all {self._slot_count()} sequence slots are "
                    f"taken and {len(self._backlog)} sequences already wait for one"
                )
            seq = _Seq(flags.id, now)
            if self._free:
                self._assign(seq)
            else:
                self._backlog.append(seq)
            if not flags.end:
                self._by_id[flags.id] = seq
        else:
            if len(seq.queue) >= self.policy.max_queued_per_sequence:
                raise Unavailable(
                    f"inference request for sequence {_seq_text(flags.id)} to model "
                    f"'{self.model}' was refused: {len(seq.queue)} requests of the sequence "
                    "are already queued"
                )
            if flags.end:
                del self._by_id[flags.id]
        if seq.slot is None and self.next_reap_ns:  # 0: the first reap (at once) is due
            self.next_reap_ns = min(self.next_reap_ns, now + BACKLOG_CHECK_NS)
        if seq.slot is None and entry.item.timeout_us > 0:
            deadline = now + entry.item.timeout_us * 1000
            seq.expire_ns = min(seq.expire_ns or deadline, deadline)
            if self.next_reap_ns:
                self.next_reap_ns = min(self.next_reap_ns, deadline)
        entry.enqueue_ns = now
        entry.seq = self._arrivals
        self._arrivals += 1
        entry.state = QUEUED
        seq.queue.append(entry)
        seq.last_ns = now
        self._where[entry.item] = seq
        self.queued += 1
        return seq.slot.instance if seq.slot is not None else None

    def _slot_count(self) -> int:
        return sum(len(row) for row in self.slots)

    def _assign(self, seq: _Seq) -> _Slot:
        index, instance = heapq.heappop(self._free)
        slot = self.slots[instance][index]
        slot.seq = seq
        seq.slot = slot
        seq.expire_ns = 0
        return slot

    def _release(self, seq: _Seq, woken: set[int]) -> None:
        """Free `seq`'s slot, or hand it to the oldest backlogged sequence."""
        slot = seq.slot
        if slot is None:
            return
        seq.slot = None
        slot.seq = None
        if self._by_id.get(seq.id) is seq:
            del self._by_id[seq.id]
        if self._backlog:
            nxt = self._backlog.popleft()
            slot.seq = nxt
            nxt.slot = slot
            nxt.expire_ns = 0
            woken.add(slot.instance)
        else:
            heapq.heappush(self._free, (slot.index, slot.instance))

    def _drop_all(self, seq: _Seq, error: InferenceError, reason: str) -> list[Entry]:
        dropped = list(seq.queue)
        seq.queue.clear()
        for e in dropped:
            self._where.pop(e.item, None)
            e.fail(error, reason)
        self.queued -= len(dropped)
        return dropped

    def cancel(self, item: WorkItem, woken: set[int]) -> list[Entry]:
        """The client gave up on a queued request: as Triton does, the whole sequence is
        cancelled (its queued requests fail, its slot is freed once nothing of it runs)."""
        seq = self._where.get(item)
        if seq is None:
            return []
        return self._cancel_seq(seq, woken)

    def _cancel_seq(self, seq: _Seq, woken: set[int]) -> list[Entry]:
        dropped = self._drop_all(seq, Cancelled("Request was cancelled"), "CANCELED")
        if self._by_id.get(seq.id) is seq:
            del self._by_id[seq.id]
        if seq.slot is None:
            try:
                self._backlog.remove(seq)
            except ValueError:
                pass
        elif seq.running:
            seq.cancelled = True
        else:
            self._release(seq, woken)
        return dropped

    # -- batch formation ---------------------------------------------------------------------

    def next_batch(self, instance: int, now: int, *, flush: bool = False) -> SeqPlan:
        """The batch instance `instance` should run now (rows taken off their queues), or
        when to look again. `flush` (closing) runs what is ready without waiting."""
        dropped: list[Entry] = []
        woken: set[int] = set()
        ready: list[tuple[_Slot, Entry]] = []
        for slot in self.slots[instance]:
            seq = slot.seq
            if seq is None or not seq.queue or seq.running:
                continue
            head = seq.queue[0]
            if head.item.is_active is not None and not _still_wanted(head.item):
                dropped += self._cancel_seq(seq, woken)
                continue
            ready.append((slot, head))
        if not ready:
            return SeqPlan([], None, dropped)
        policy = self.policy
        if policy.oldest:
            ready.sort(key=lambda r: r[1].seq)
        key = self._key(ready[0])
        chosen = [r for r in ready if self._key(r) == key][: policy.batch_cap]
        oldest = min(e.enqueue_ns for _, e in chosen)
        delay_ns = policy.max_queue_delay_us * 1000
        if not flush and delay_ns and now < oldest + delay_ns:
            if policy.oldest:
                full = (
                    len(chosen) >= policy.batch_cap or len(chosen) in policy.preferred_batch_sizes
                )
            else:
                util = policy.minimum_slot_utilization
                full = util <= 0 or len(chosen) / policy.batch_cap >= util
            if not full:
                return SeqPlan([], oldest + delay_ns, dropped)
        rows: list[tuple[_Slot, Entry | None]]
        if policy.oldest:
            rows = [(slot, e) for slot, e in chosen]
        else:
            by_index = {slot.index: e for slot, e in chosen}
            top = max(by_index)
            rows = [(self.slots[instance][j], by_index.get(j)) for j in range(top + 1)]
        for slot, e in rows:
            if e is None:
                continue
            seq = slot.seq
            assert seq is not None
            seq.queue.popleft()
            seq.running = True
            self._where.pop(e.item, None)
            e.state = TAKEN
            self.queued -= 1
        return SeqPlan(rows, None, dropped)

    def _key(self, ready: tuple[_Slot, Entry]) -> tuple[Any, ...]:
        """Rows batch together when their inputs and states have equal shapes."""
        slot, entry = ready
        seq = slot.seq
        flags = entry.item.sequence
        kept = seq.state if seq is not None else None
        if flags is not None and flags.start:
            kept = None  # START: the row gets the initial state
        states = tuple(
            (s.input_name, (s.start_value() if kept is None else kept[s.input_name]).shape)
            for s in self.policy.states
        )
        return (batch_key(entry.item.inputs), states)

    def finished(self, rows: Sequence[tuple[_Slot, Entry | None]], now: int) -> set[int]:
        """A batch ran: its sequences may take their next request; END frees the slot.
        Returns the instances that got a backlogged sequence."""
        woken: set[int] = set()
        for slot, e in rows:
            if e is None:
                continue
            seq = slot.seq
            if seq is None:
                continue
            seq.running = False
            seq.last_ns = now
            flags = e.item.sequence
            if seq.cancelled or (flags is not None and flags.end and not seq.queue):
                self._release(seq, woken)
        return woken

    # -- idle release and expiry -------------------------------------------------------------

    def reap(self, now: int) -> tuple[list[Entry], set[int]]:
        """Release sequences idle for max_sequence_idle (nothing queued, nothing running);
        fail backlogged sequences whose request timeout passed. Cheap until `next_reap_ns`."""
        woken: set[int] = set()
        dropped: list[Entry] = []
        if now < self.next_reap_ns:
            return dropped, woken
        idle_ns = self.policy.max_sequence_idle_us * 1000
        nxt = now + idle_ns
        for row in self.slots:
            for slot in row:
                seq = slot.seq
                if seq is None or seq.running or seq.queue:
                    continue
                due = seq.last_ns + idle_ns
                if due <= now:
                    _log.debug("model '%s': sequence %s idle, slot released", self.model, seq.id)
                    self._release(seq, woken)
                else:
                    nxt = min(nxt, due)
        if self._backlog:
            keep: deque[_Seq] = deque()
            for seq in self._backlog:
                head = seq.queue[0].item if seq.queue else None
                if seq.expire_ns and seq.expire_ns <= now:
                    dropped += self._drop_all(
                        seq,
                        Unavailable("timeout of the corresponding sequence has been expired"),
                        "REJECTED",
                    )
                elif head is not None and head.is_active is not None and not _still_wanted(head):
                    # its client went away: as a cancel would, the whole sequence goes
                    dropped += self._drop_all(seq, Cancelled("Request was cancelled"), "CANCELED")
                else:
                    keep.append(seq)
                    if seq.expire_ns:
                        nxt = min(nxt, seq.expire_ns)
                    continue
                if self._by_id.get(seq.id) is seq:
                    del self._by_id[seq.id]
            self._backlog = keep
            if keep:
                nxt = min(nxt, now + BACKLOG_CHECK_NS)
        self.next_reap_ns = nxt
        return dropped, woken

    def drain(self) -> list[Entry]:
        """Everything still queued (shutdown); every slot and the backlog are freed."""
        dropped: list[Entry] = []
        for row in self.slots:
            for slot in row:
                if slot.seq is not None:
                    dropped += list(slot.seq.queue)
                    slot.seq.queue.clear()
                    slot.seq.slot = None
                    slot.seq = None
        for seq in self._backlog:
            dropped += list(seq.queue)
        self._backlog.clear()
        self._by_id.clear()
        self._where.clear()
        self._free = [(s.index, s.instance) for row in self.slots for s in row]
        heapq.heapify(self._free)
        self.queued = 0
        return dropped


def _still_wanted(item: WorkItem) -> bool:
    try:
        return bool(item.is_active())  # type: ignore[misc]
    except Exception:
        return False


class SequenceScheduler(Scheduler):
    """Threads, lock and execution around a `SequenceTable`: one thread per instance."""

    def __init__(
        self,
        model_name: str,
        instances: Sequence[Instance],
        policy: SequencePolicy,
        stats: ModelStats,
        *,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.policy = policy  # read by `_setup`, which the base constructor calls
        batch = BatchPolicy(max_batch_size=policy.max_batch_size)
        super().__init__(model_name, instances, batch, stats, clock=clock)

    def _setup(self, batch: BatchPolicy) -> None:
        policy = self.policy
        self._table = SequenceTable(self.model_name, len(self._instances), policy)
        self._ctx = BatchContext(
            self.model_name, policy.max_batch_size > 0, self._stats, self._clock
        )
        self._cvs = [threading.Condition(self._lock) for _ in self._instances]
        self._idle_cv = threading.Condition(self._lock)
        self._running = 0
        self._ordered = policy.preserve_ordering
        self._threads = [
            threading.Thread(
                target=self._worker,
                args=(i,),
                name=f"{self.model_name}/{inst.name}",
                daemon=True,
            )
            for i, inst in enumerate(self._instances)
        ]
        for t in self._threads:
            t.start()

    # -- public API (the same as the plain scheduler's) ------------------------------------

    def infer(self, item: WorkItem) -> dict[str, np.ndarray]:
        entry = Entry(item)
        entry.latch = latch()
        self._enqueue(entry)
        entry.latch.acquire()
        if entry.error is not None:
            raise entry.error
        return entry.result  # type: ignore[return-value]

    def cancel(self, item: WorkItem) -> bool:
        woken: set[int] = set()
        with self._lock:
            dropped = self._table.cancel(item, woken)
            if dropped:
                self._stats.pending(-len(dropped))
            self._wake(woken)
        self._finish(dropped)
        return bool(dropped)

    def close(self, timeout_s: float) -> None:
        """Refuse new sequences, let queued requests run within `timeout_s`, then fail what is
        left with "Server exiting" and free every slot (open sequences end here)."""
        end = time.monotonic() + max(timeout_s, 0.0)
        with self._lock:
            self._closing = True
            self._wake(range(len(self._cvs)))
            while self._table.queued or self._running:
                left = end - time.monotonic()
                if left <= 0 or not self._idle_cv.wait(min(left, MAX_WAIT_S)):
                    break
            self._stopped = True
            leftovers = self._table.drain()
            if leftovers:
                self._stats.pending(-len(leftovers))
            self._wake(range(len(self._cvs)))
        for e in leftovers:
            e.fail(Closed("Server exiting"), "OTHER")
        self._finish(leftovers)

    # -- internals ------------------------------------------------------------------------

    def _wake(self, instances: Any) -> None:
        for i in instances:
            self._cvs[i].notify()

    def _enqueue(self, entry: Entry) -> None:
        item = entry.item
        try:
            with self._lock:
                if self._stopped:
                    raise Closed("Server exiting")
                self._table.check(item)
                flags = item.sequence
                assert flags is not None
                if self._closing and (flags.start or not self._table.knows(flags.id)):
                    # A retired version takes no new sequences: a reload routes them again.
                    raise Closed("Server exiting")
                target = self._table.enqueue(entry, self._clock())
                self._stats.pending(1)
                if target is not None:
                    self._cvs[target].notify()
                else:  # backlogged: its deadline and client checks may come before any wait
                    self._cvs[0].notify()
        except InferenceError as exc:
            entry.fail(exc, "REJECTED" if isinstance(exc, Unavailable) else "OTHER")
            raise

    def _worker(self, i: int) -> None:
        table = self._table
        cv = self._cvs[i]
        inst = self._instances[i]
        while True:
            with self._lock:
                while True:
                    if self._stopped:
                        return
                    now = self._clock()
                    reaped, woken = table.reap(now)
                    self._wake(woken - {i})
                    plan = table.next_batch(i, now, flush=self._closing)
                    gone = len(reaped) + len(plan.dropped) + sum(1 for _, e in plan.rows if e)
                    if gone:
                        self._stats.pending(-gone)
                    if plan.rows or plan.dropped or reaped:
                        if plan.rows:
                            self._running += 1
                        break
                    wait = table.next_reap_ns
                    if plan.wait_until_ns is not None:
                        wait = min(wait, plan.wait_until_ns) if wait else plan.wait_until_ns
                    if self._closing and not table.queued and not self._running:
                        self._idle_cv.notify_all()
                    timeout = None if not wait else min(max(wait - now, 0) / 1e9, MAX_WAIT_S)
                    cv.wait(timeout)
            self._finish(reaped + plan.dropped)
            if not plan.rows:
                continue
            try:
                self._run(plan.rows, inst)
            finally:
                with self._lock:
                    self._running -= 1
                    self._wake(table.finished(plan.rows, self._clock()) - {i})
                    self._idle_cv.notify_all()
            self._finish([e for _, e in plan.rows if e is not None])

    def _run(self, rows: list[tuple[_Slot, Entry | None]], inst: Instance) -> None:
        """Execute one batch: add controls and states per row, run, split, keep new states."""
        ctx, clock, policy = self._ctx, self._clock, self.policy
        batched = policy.max_batch_size > 0
        real = [(slot, e) for slot, e in rows if e is not None]
        t0 = clock()
        t1 = t2 = t0
        try:
            inputs = self._inputs(rows, real, batched)
            names = tuple(
                dict.fromkeys(
                    [n for _, e in real for n in e.item.outputs]
                    + [s.output_name for s in policy.states]
                )
            )
            t1 = clock()
            outputs = run_instance(inst, inputs, names, self.model_name)
            t2 = clock()
            n = len(rows)
            for name in names:
                a = outputs.get(name)
                if a is None:
                    raise Internal(f"model '{self.model_name}' did not produce output '{name}'")
                if batched and (a.ndim == 0 or a.shape[0] != n):
                    raise Internal(
                        f"output '{name}' of model '{self.model_name}' does not have the batch "
                        f"size {n} as its first dimension"
                    )
            for r, (slot, e) in enumerate(rows):
                if e is None:
                    continue
                if batched:
                    e.result = {o: outputs[o][r : r + 1] for o in e.item.outputs}
                else:
                    e.result = {o: outputs[o] for o in e.item.outputs}
                if policy.states and slot.seq is not None:
                    slot.seq.state = {
                        s.input_name: np.array(
                            outputs[s.output_name][r] if batched else outputs[s.output_name],
                            dtype=s.dtype,
                        )
                        for s in policy.states
                    }
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, InferenceError)
                else Internal(f"failed to run a batch of model '{self.model_name}': {exc}")
            )
            for _, e in real:
                e.fail(error, "BACKEND")
                e.result = None
            stamp([e for _, e in real], t0, t1, t2, clock(), len(rows))
            return
        t3 = clock()
        stamp([e for _, e in real], t0, t1, t2, t3, len(rows))
        ctx.stats.execution(
            batch_rows=len(rows),
            compute_input_ns=t1 - t0,
            compute_infer_ns=t2 - t1,
            compute_output_ns=t3 - t2,
        )

    def _inputs(
        self,
        rows: list[tuple[_Slot, Entry | None]],
        real: list[tuple[_Slot, Entry]],
        batched: bool,
    ) -> dict[str, np.ndarray]:
        policy = self.policy
        rep = real[0][1].item
        inputs: dict[str, np.ndarray] = {}
        if len(rows) == 1:
            inputs.update(rep.inputs)
        else:
            for name, arr in rep.inputs.items():
                null = np.zeros_like(arr) if arr.dtype != object else np.full_like(arr, "")
                inputs[name] = np.concatenate(
                    [e.item.inputs[name] if e is not None else null for _, e in rows]
                )
        lead = (len(rows), 1) if batched else (1,)
        for control in policy.controls:
            values: list[Any] = []
            for _, e in rows:
                flags = e.item.sequence if e is not None else None
                if control.kind == CORRID:
                    values.append(_corrid_value(control, flags.id if flags else None))
                    continue
                if control.kind == START:
                    on = flags is not None and flags.start
                elif control.kind == END:
                    on = flags is not None and flags.end
                else:
                    on = e is not None
                values.append(control.true if on else control.false)
            if control.kind == CORRID and control.wire == "BYTES":
                arr = np.array(values, dtype=object).reshape(lead)
            elif control.kind == CORRID:
                arr = np.array(values, dtype=np.uint64).astype(control.dtype).reshape(lead)
            else:
                arr = np.array(values, dtype=control.dtype).reshape(lead)
            inputs[control.name] = arr
        for spec in policy.states:
            per_row: list[np.ndarray] = []
            for slot, e in rows:
                seq = slot.seq
                flags = e.item.sequence if e is not None else None
                if e is None or seq is None or seq.state is None or (flags and flags.start):
                    per_row.append(spec.start_value())
                else:
                    per_row.append(seq.state[spec.input_name])
            if batched:
                inputs[spec.input_name] = np.stack(per_row)
            else:
                inputs[spec.input_name] = per_row[0]
        return inputs


def _corrid_value(control: Control, seq_id: int | str | None) -> Any:
    """The CORRID of one row: Triton copies the uint64 ID's low bytes into narrower types."""
    if control.wire == "BYTES":
        return seq_id if isinstance(seq_id, str) else ""  # ONNX Runtime strings are str
    if not isinstance(seq_id, int):
        return 0
    bits = np.dtype(control.dtype).itemsize * 8
    return seq_id & ((1 << bits) - 1)
