"""Scheduler: the pure batch-formation core with an injected clock, then the threaded driver.

The core (`BatchQueue`) is tested with plain integers for time: no threads, no sleeps. The driver
tests use fake instances with gates (events) to make requests pile up deterministically.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from tributary.errors import Cancelled, Internal, InvalidArgument, Unavailable
from tributary.scheduler import BatchPolicy, QueuePolicy, Scheduler, WorkItem, make_scheduler
from tributary.scheduler.batchqueue import BatchQueue, Entry, Plan, effective_timeout_us
from tributary.stats import ModelStats

US = 1_000  # ns per microsecond


def make_item(
    value: float = 0.0,
    rows: int = 1,
    width: int = 4,
    dtype: type = np.float32,
    outputs: tuple[str, ...] = ("y",),
    **kw,
) -> WorkItem:
    x = np.full((rows, width), value, dtype=dtype)
    return WorkItem(inputs={"x": x}, rows=rows, outputs=outputs, **kw)


def push(q: BatchQueue, now_ns: int, **kw) -> Entry:
    e = Entry(make_item(**kw))
    q.push(e, now_ns)
    return e


def values(plan: Plan) -> list[float]:
    return [float(e.item.inputs["x"].flat[0]) for e in plan.batch]


def batching(**kw) -> BatchPolicy:
    kw.setdefault("max_batch_size", 8)
    return BatchPolicy(dynamic=True, **kw)


def stream(q: BatchQueue, n: int, *, start: int, gap: int = 10 * US) -> list[Entry]:
    """`n` arrivals `gap` apart, from `start`."""
    return [push(q, start + i * gap, value=float(i)) for i in range(n)]


def closed_loop(q: BatchQueue, clients: int) -> int:
    """`clients` clients each send a request (t = 0, 10, 20 us...); they run as one batch and
    finish at t = 1 ms. Returns that time: the clients will now come back one by one."""
    stream(q, clients, start=0)
    plan = q.next_batch((clients - 1) * 10 * US)
    assert len(plan.batch) == clients  # everyone known was already here: no waiting
    q.finished(clients)
    return 1_000 * US


# ---------------------------------------------------------------------------- the pure core


def test_batch_formation_takes_compatible_requests_in_order() -> None:
    q = BatchQueue(batching())
    for i in range(3):
        push(q, 0, value=float(i))
    plan = q.next_batch(0)
    assert values(plan) == [0.0, 1.0, 2.0]
    assert plan.rows == 3 and plan.wait_until_ns is None
    assert len(q) == 0 and q.running == 3
    q.finished(3)
    assert q.running == 0
    assert q.next_batch(0).batch == []


def test_rows_are_counted_not_requests() -> None:
    q = BatchQueue(batching(max_batch_size=8))
    for i in range(3):
        push(q, 0, value=float(i), rows=3)
    first = q.next_batch(0)
    assert values(first) == [0.0, 1.0] and first.rows == 6
    second = q.next_batch(0)
    assert values(second) == [2.0] and second.rows == 3


def test_request_that_does_not_fit_is_skipped_for_a_smaller_one() -> None:
    q = BatchQueue(batching(max_batch_size=8))
    push(q, 0, value=0.0, rows=3)
    push(q, 0, value=1.0, rows=6)
    push(q, 0, value=2.0, rows=2)
    assert values(q.next_batch(0)) == [0.0, 2.0]
    assert values(q.next_batch(0)) == [1.0]


def test_single_request_larger_than_max_runs_alone() -> None:
    q = BatchQueue(batching(max_batch_size=4))
    push(q, 0, value=0.0, rows=6)
    push(q, 0, value=1.0, rows=1)
    plan = q.next_batch(0)
    assert values(plan) == [0.0] and plan.rows == 6
    assert values(q.next_batch(0)) == [1.0]


def test_incompatible_shapes_and_dtypes_go_to_separate_batches() -> None:
    q = BatchQueue(batching())
    push(q, 0, value=0.0, width=4)
    push(q, 0, value=1.0, width=5)
    push(q, 0, value=2.0, width=4)
    push(q, 0, value=3.0, width=4, dtype=np.float64)
    assert values(q.next_batch(0)) == [0.0, 2.0]
    assert values(q.next_batch(0)) == [1.0]
    assert values(q.next_batch(0)) == [3.0]


def test_without_dynamic_batching_each_request_runs_alone() -> None:
    q = BatchQueue(BatchPolicy(max_batch_size=8, dynamic=False))
    push(q, 0, value=0.0)
    push(q, 0, value=1.0)
    assert values(q.next_batch(0)) == [0.0]
    assert values(q.next_batch(0)) == [1.0]


def test_lone_request_at_low_load_does_not_wait_for_the_window() -> None:
    q = BatchQueue(batching(max_queue_delay_us=10_000))
    push(q, 0)
    plan = q.next_batch(0)
    assert len(plan.batch) == 1 and plan.wait_until_ns is None


def test_sequential_client_never_waits_even_with_short_gaps() -> None:
    """One client, one request at a time: gaps are far shorter than the window, but nothing is
    ever in flight when a request arrives, so no other request can come while we wait."""
    q = BatchQueue(batching(max_queue_delay_us=10_000))
    now = 0
    for _ in range(20):
        push(q, now)
        plan = q.next_batch(now)
        assert len(plan.batch) == 1, "a lone request waited for the batch window"
        now += 100 * US  # it runs for 100 us...
        q.finished(1)
        now += 50 * US  # ...and the client sends the next one 50 us after the response


def test_all_known_clients_present_means_no_wait() -> None:
    """Two clients on two instances: when the second request arrives the first is executing,
    so nobody else can come; waiting would only add latency."""
    q = BatchQueue(batching(max_queue_delay_us=10_000))
    push(q, 0, value=0.0)
    assert len(q.next_batch(0).batch) == 1  # instance 1 runs it
    push(q, 5 * US, value=1.0)
    plan = q.next_batch(5 * US)  # instance 2 is free
    assert len(plan.batch) == 1 and plan.wait_until_ns is None


def test_heavy_load_waits_for_returning_clients_and_builds_full_batches() -> None:
    q = BatchQueue(batching(max_batch_size=8, max_queue_delay_us=1_000))
    t = closed_loop(q, 8)
    stream(q, 5, start=t)  # five of the eight clients are back
    plan = q.next_batch(t + 40 * US)
    assert plan.batch == [], "three known clients are about to come back: worth waiting"
    assert plan.wait_until_ns is not None and t + 40 * US < plan.wait_until_ns <= t + 1_000 * US
    stream(q, 3, start=t + 50 * US)
    full = q.next_batch(t + 70 * US)
    assert full.rows == 8 and full.wait_until_ns is None


def test_wait_ends_when_the_stream_goes_quiet_and_lowers_the_estimate() -> None:
    q = BatchQueue(batching(max_batch_size=8, max_queue_delay_us=1_000))
    t = closed_loop(q, 8)
    stream(q, 3, start=t)
    wait = q.next_batch(t + 20 * US).wait_until_ns
    assert wait is not None and wait < t + 1_000 * US
    plan = q.next_batch(wait)  # nobody came by the time we were told to look again
    assert len(plan.batch) == 3
    # Five clients went away: the estimate dropped to those seen, so the next one runs at once.
    push(q, wait + 10 * US)
    assert len(q.next_batch(wait + 10 * US).batch) == 1


def test_window_is_measured_from_the_oldest_request() -> None:
    q = BatchQueue(batching(max_batch_size=1_000, max_queue_delay_us=1_000))
    t = closed_loop(q, 200)
    stream(q, 100, start=t)  # a steady stream from t to t + 990 us
    early = q.next_batch(t + 990 * US)
    assert early.batch == [] and early.wait_until_ns == t + 1_000 * US
    push(q, t + 1_000 * US, value=100.0)
    due = q.next_batch(t + 1_000 * US)  # the oldest came at t: its window is over
    assert due.rows == 101


def test_idle_gap_forgets_the_history() -> None:
    q = BatchQueue(batching(max_batch_size=8, max_queue_delay_us=1_000))
    t = closed_loop(q, 8)
    push(q, t + 10_000 * US)  # a lone request long after the burst
    assert len(q.next_batch(t + 10_000 * US).batch) == 1


def test_zero_delay_never_waits() -> None:
    q = BatchQueue(batching(max_batch_size=8, max_queue_delay_us=0))
    t = closed_loop(q, 8)
    stream(q, 5, start=t)
    assert len(q.next_batch(t + 40 * US).batch) == 5


def test_preferred_size_sends_at_once_instead_of_waiting() -> None:
    q = BatchQueue(batching(max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_us=1_000))
    t = closed_loop(q, 8)
    stream(q, 4, start=t)
    plan = q.next_batch(t + 30 * US)
    assert plan.rows == 4 and plan.wait_until_ns is None


def test_preferred_prefix_is_sent_when_more_would_be_waited_for() -> None:
    q = BatchQueue(batching(max_batch_size=8, preferred_batch_sizes=(3,), max_queue_delay_us=1_000))
    t = closed_loop(q, 8)
    stream(q, 4, start=t)
    plan = q.next_batch(t + 30 * US)
    assert values(plan) == [0.0, 1.0, 2.0]
    rest = q.next_batch(t + 30 * US)
    assert rest.batch == [] and rest.wait_until_ns is not None  # still worth waiting for


def test_priorities_and_default_level() -> None:
    policy = BatchPolicy(max_batch_size=8, priority_levels=3, default_priority_level=2)
    q = BatchQueue(policy)
    assert [q.level_index(p) for p in (0, 1, 2, 3, 4, 99)] == [1, 0, 1, 2, 1, 1]
    push(q, 0, value=3.0, priority=3)
    push(q, 0, value=0.0, priority=0)  # -> level 2
    push(q, 0, value=1.0, priority=1)
    push(q, 0, value=5.0, priority=5)  # beyond the levels -> level 2
    order = [values(q.next_batch(0))[0] for _ in range(4)]
    assert order == [1.0, 0.0, 5.0, 3.0]


def test_batches_fill_in_priority_order() -> None:
    q = BatchQueue(batching(max_batch_size=2, priority_levels=2, default_priority_level=2))
    push(q, 0, value=20.0, priority=2)
    push(q, 0, value=21.0, priority=2)
    push(q, 0, value=10.0, priority=1)
    assert values(q.next_batch(0)) == [10.0, 20.0]
    assert values(q.next_batch(0)) == [21.0]


@pytest.mark.parametrize(
    ("default", "override", "request_us", "expected"),
    [
        (0, False, 0, 0),
        (0, False, 300, 300),  # no default: the request's own timeout is the only one
        (1_000, False, 300, 1_000),  # override not allowed
        (1_000, True, 300, 300),  # lowered
        (1_000, True, 5_000, 1_000),  # never raised
        (1_000, True, 0, 1_000),
    ],
)
def test_effective_timeout(default: int, override: bool, request_us: int, expected: int) -> None:
    policy = QueuePolicy(default_timeout_us=default, allow_timeout_override=override)
    assert effective_timeout_us(policy, request_us) == expected


def test_default_timeout_rejects() -> None:
    q = BatchQueue(BatchPolicy(default_queue_policy=QueuePolicy(default_timeout_us=100)))
    e = push(q, 0)
    assert q.expire(99 * US) == []
    assert q.expire(100 * US) == [e]
    assert isinstance(e.error, Unavailable) and str(e.error) == "Request timeout expired"
    assert e.item.failure_reason == "REJECTED" and len(q) == 0


def test_overridden_timeout_rejects_earlier_and_shows_in_wait_until() -> None:
    qp = QueuePolicy(default_timeout_us=10_000, allow_timeout_override=True)
    q = BatchQueue(BatchPolicy(default_queue_policy=qp))
    short = push(q, 0, value=1.0, timeout_us=100)
    long = push(q, 0, value=2.0, timeout_us=50_000)  # cannot raise the default
    assert long.deadline_ns == 10_000 * US
    assert values(q.next_batch(0)) == [1.0]  # an instance took the short one in time
    plan = q.next_batch(10_000 * US)
    assert plan.batch == [] and plan.dropped == [long]
    assert short.error is None


def test_rejected_requests_are_dropped_by_next_batch() -> None:
    q = BatchQueue(batching(default_queue_policy=QueuePolicy(default_timeout_us=100)))
    old = push(q, 0, value=0.0)
    push(q, 150 * US, value=1.0)
    plan = q.next_batch(150 * US)
    assert values(plan) == [1.0] and plan.dropped == [old]


def test_delay_moves_expired_request_behind_the_others() -> None:
    delay = QueuePolicy(reject_on_timeout=False)
    q = BatchQueue(BatchPolicy(default_queue_policy=delay))
    late = push(q, 0, value=0.0, timeout_us=100)
    push(q, 10 * US, value=1.0)
    push(q, 20 * US, value=2.0)
    assert q.expire(150 * US) == []
    order = [values(q.next_batch(150 * US))[0] for _ in range(3)]
    assert order == [1.0, 2.0, 0.0]
    assert late.error is None


def test_delayed_request_stays_ahead_of_lower_priorities() -> None:
    policy = BatchPolicy(
        priority_levels=2,
        default_priority_level=2,
        priority_queue_policy={1: QueuePolicy(reject_on_timeout=False, default_timeout_us=100)},
    )
    q = BatchQueue(policy)
    push(q, 0, value=1.0, priority=1)
    push(q, 0, value=11.0, priority=1)
    push(q, 0, value=2.0, priority=2)
    order = [values(q.next_batch(500 * US))[0] for _ in range(3)]
    assert order == [1.0, 11.0, 2.0]


def test_queue_full_is_rejected_immediately_per_level() -> None:
    policy = BatchPolicy(
        priority_levels=2,
        default_priority_level=2,
        priority_queue_policy={1: QueuePolicy(max_queue_size=1)},
        default_queue_policy=QueuePolicy(max_queue_size=2),
    )
    q = BatchQueue(policy)
    push(q, 0, priority=1)
    with pytest.raises(Unavailable) as info:
        push(q, 0, priority=1, request_id="r7")
    assert str(info.value) == "[request id: r7] Exceeds maximum queue size"
    push(q, 0, priority=2)
    push(q, 0, priority=2)
    item = make_item(priority=2)
    with pytest.raises(Unavailable, match=r"^\[request id: <id_unknown>\] Exceeds maximum"):
        q.push(Entry(item), 0)
    assert item.failure_reason == "REJECTED"
    assert len(q) == 3


def test_inactive_requests_are_dropped_before_running() -> None:
    q = BatchQueue(batching())
    gone = push(q, 0, value=0.0, is_active=lambda: False)
    push(q, 0, value=1.0)

    def broken() -> bool:
        raise RuntimeError("context torn down")

    crashed = push(q, 0, value=2.0, is_active=broken)
    push(q, 0, value=3.0, is_active=lambda: True)
    plan = q.next_batch(0)
    assert values(plan) == [1.0, 3.0]
    assert plan.dropped == [gone, crashed]
    assert isinstance(gone.error, Cancelled) and gone.item.failure_reason == "CANCELED"
    assert len(q) == 0


# ------------------------------------------------------------------------- the driver


class FakeInstance:
    """y = 2x, z = x + 1. Records each batch; can hold a run until `gate` is set, raise when
    an input holds `fail_value`, or return the wrong number of rows."""

    def __init__(self, name: str = "fake", *, gate: threading.Event | None = None) -> None:
        self.name = name
        self.gate = gate
        self.entered = threading.Event()
        self.batches: list[int] = []
        self.requested: list[tuple[str, ...]] = []
        self.last_inputs: dict[str, np.ndarray] = {}
        self.last_outputs: dict[str, np.ndarray] = {}
        self.fail_value: float | None = None
        self.extra_rows = 0
        self.lock = threading.Lock()
        self.busy = False
        self.on_run = None

    def run(self, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        with self.lock:
            assert not self.busy, "an instance was given two batches at once"
            self.busy = True
        try:
            gate = self.gate  # read before `entered` is set: a test may clear it right after
            self.entered.set()
            if gate is not None:
                assert gate.wait(10), "test gate never opened"
            if self.on_run is not None:
                self.on_run(inputs)
            x = inputs["x"]
            self.batches.append(x.shape[0])
            self.requested.append(tuple(outputs))
            self.last_inputs = inputs
            if self.fail_value is not None and (x == self.fail_value).any():
                raise RuntimeError("kaboom")
            if self.extra_rows:
                x = np.concatenate([x, x[: self.extra_rows]])
            full = {"y": x * 2, "z": x + 1}
            self.last_outputs = {n: full[n] for n in outputs}
            return self.last_outputs
        finally:
            self.busy = False


class Collector:
    """Callback target for `submit`, in completion order."""

    def __init__(self) -> None:
        self.results: list[tuple[str, dict | None, Exception | None]] = []
        self.cond = threading.Condition()

    def callback(self, tag: str):
        def cb(out, err) -> None:
            with self.cond:
                self.results.append((tag, out, err))
                self.cond.notify_all()

        return cb

    def wait(self, n: int) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.results) >= n, timeout=10)
        assert ok, f"only {len(self.results)} of {n} callbacks arrived"

    def by_tag(self) -> dict[str, tuple[dict | None, Exception | None]]:
        return {t: (o, e) for t, o, e in self.results}


def scheduler(instances, policy: BatchPolicy, **kw) -> tuple[Scheduler, ModelStats]:
    stats = ModelStats("m", 1)
    return make_scheduler("m", instances, policy, stats, **kw), stats


Busy = tuple[Scheduler, ModelStats, FakeInstance, threading.Event, Collector]


def busy_direct_scheduler() -> Busy:
    """A direct-mode scheduler whose one instance is held by a running request until `gate`
    is set: the next caller has to queue. Returns (sched, stats, instance, gate, collector)."""
    gate = threading.Event()
    inst = FakeInstance(gate=gate)
    sched, stats = scheduler([inst], BatchPolicy(max_batch_size=4))
    got = Collector()
    sched.submit(make_item(value=1.0), got.callback("busy"))
    assert inst.entered.wait(10)
    return sched, stats, inst, gate, got


def test_direct_mode_runs_inline_and_reports_timings() -> None:
    now = [1_000]
    inst = FakeInstance()
    inst.on_run = lambda _inputs: now.__setitem__(0, now[0] + 5_000)
    sched, stats = scheduler([inst], BatchPolicy(max_batch_size=4), clock=lambda: now[0])
    item = make_item(value=3.0, rows=2)
    out = sched.infer(item)
    np.testing.assert_array_equal(out["y"], np.full((2, 4), 6.0))
    assert list(out) == ["y"]
    assert inst.last_inputs["x"] is item.inputs["x"]  # no copy for a lone request
    assert (item.queue_ns, item.compute_input_ns, item.compute_infer_ns) == (0, 0, 5_000)
    assert item.batch_rows == 2 and item.failure_reason == ""
    snap = stats.snapshot()
    assert snap.execution_count == 1 and snap.batch_stats[2].compute_infer.ns == 5_000
    sched.close(1)


def test_output_row_mismatch_is_an_internal_error() -> None:
    inst = FakeInstance()
    inst.extra_rows = 1
    sched, stats = scheduler([inst], BatchPolicy(max_batch_size=4))
    item = make_item(rows=2)
    with pytest.raises(Internal, match=r"output 'y' of model 'm' has first dimension 3"):
        sched.infer(item)
    assert item.failure_reason == "BACKEND"
    assert stats.snapshot().execution_count == 0
    inst.extra_rows = 0
    assert sched.infer(make_item(rows=2))["y"].shape == (2, 4)  # instance still usable
    sched.close(1)


def test_missing_or_scalar_output_is_an_internal_error() -> None:
    class Odd:
        name = "odd"

        def __init__(self) -> None:
            self.out: dict[str, np.ndarray] = {}

        def run(self, inputs, outputs):
            return self.out

    inst = Odd()
    sched, _ = scheduler([inst], BatchPolicy(max_batch_size=4))
    with pytest.raises(Internal, match=r"^model 'm' did not produce output 'y'$"):
        sched.infer(make_item())
    inst.out = {"y": np.float32(1.0) * np.ones(())}
    with pytest.raises(Internal, match=r"output 'y' of model 'm' has a scalar"):
        sched.infer(make_item())
    sched.close(1)


def test_model_without_batch_dimension_skips_the_row_check() -> None:
    inst = FakeInstance()
    sched, stats = scheduler([inst], BatchPolicy(max_batch_size=0, dynamic=True))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)  # no batch dim: 2 is not a row count
    out = sched.infer(WorkItem(inputs={"x": x}, rows=1, outputs=("y",)))
    np.testing.assert_array_equal(out["y"], x * 2)
    assert stats.snapshot().batch_stats[1].compute_infer.count == 1
    sched.close(1)


def test_batched_requests_get_their_own_rows_and_outputs_as_views() -> None:
    gate = threading.Event()
    inst = FakeInstance(gate=gate)
    sched, stats = scheduler([inst], batching(max_batch_size=8))
    got = Collector()
    sched.submit(make_item(value=9.0), got.callback("first"))
    assert inst.entered.wait(10)  # the instance is busy: the next requests pile up
    items = {
        "a": make_item(value=1.0, rows=2, outputs=("y",)),
        "b": make_item(value=2.0, rows=1, outputs=("z",)),
        "c": make_item(value=3.0, rows=3, outputs=("z", "y")),
    }
    for tag, item in items.items():
        sched.submit(item, got.callback(tag))
    gate.set()
    got.wait(4)
    assert inst.batches == [1, 6]
    assert inst.requested[1] == ("y", "z")  # the union, in first-seen order
    res = got.by_tag()
    a, b, c = res["a"][0], res["b"][0], res["c"][0]
    assert list(a) == ["y"] and list(b) == ["z"] and sorted(c) == ["y", "z"]
    np.testing.assert_array_equal(a["y"], np.full((2, 4), 2.0))
    np.testing.assert_array_equal(b["z"], np.full((1, 4), 3.0))
    np.testing.assert_array_equal(c["y"], np.full((3, 4), 6.0))
    np.testing.assert_array_equal(c["z"], np.full((3, 4), 4.0))
    assert np.shares_memory(a["y"], inst.last_outputs["y"])  # views, not copies
    assert np.shares_memory(c["z"], inst.last_outputs["z"])
    assert items["c"].batch_rows == 6 and items["a"].queue_ns > 0
    snap = stats.snapshot()
    assert snap.execution_count == 2 and sorted(snap.batch_stats) == [1, 6]
    assert snap.pending == 0
    sched.close(1)


def test_backend_error_fails_only_its_batch() -> None:
    gate = threading.Event()
    inst = FakeInstance(gate=gate)
    inst.fail_value = 7.0
    sched, stats = scheduler([inst], batching(max_batch_size=8))
    got = Collector()
    sched.submit(make_item(value=0.0), got.callback("first"))
    assert inst.entered.wait(10)
    sched.submit(make_item(value=7.0), got.callback("bad"))
    sched.submit(make_item(value=7.0), got.callback("bad2"))
    sched.submit(make_item(value=1.0, width=5), got.callback("other"))  # another shape
    gate.set()
    got.wait(4)
    res = got.by_tag()
    for tag in ("bad", "bad2"):
        err = res[tag][1]
        assert isinstance(err, Internal)
        assert "model 'm'" in str(err) and "kaboom" in str(err)
    assert res["other"][1] is None and res["other"][0]["y"].shape == (1, 5)
    assert res["first"][1] is None
    assert sched.infer(make_item(value=2.0))["y"][0, 0] == 4.0  # the instance survived
    assert stats.snapshot().execution_count == 3  # the failed execution is not counted
    sched.close(1)


def test_backend_inference_errors_pass_through() -> None:
    inst = FakeInstance()

    def reject(_inputs) -> None:
        raise InvalidArgument("bad data for model 'm'")

    inst.on_run = reject
    sched, _ = scheduler([inst], batching())
    item = make_item()
    with pytest.raises(InvalidArgument, match="bad data"):
        sched.infer(item)
    assert item.failure_reason == "BACKEND"
    sched.close(1)


def test_direct_mode_timeout_does_not_wait_for_a_free_instance() -> None:
    sched, stats, _, gate, got = busy_direct_scheduler()
    item = make_item(value=2.0, timeout_us=20_000)
    with pytest.raises(Unavailable, match="^Request timeout expired$"):
        sched.infer(item)
    assert not gate.is_set()  # it learned while the instance was still busy
    assert item.failure_reason == "REJECTED"
    assert stats.snapshot().pending == 0
    gate.set()
    got.wait(1)
    assert got.by_tag()["busy"][1] is None
    sched.close(1)


def test_batching_mode_timeout_while_instances_are_busy() -> None:
    gate = threading.Event()
    inst = FakeInstance(gate=gate)
    sched, _ = scheduler(
        [inst], batching(default_queue_policy=QueuePolicy(default_timeout_us=20_000))
    )
    got = Collector()
    sched.submit(make_item(value=1.0), got.callback("busy"))
    assert inst.entered.wait(10)
    with pytest.raises(Unavailable, match="^Request timeout expired$"):
        sched.infer(make_item(value=2.0))
    assert not gate.is_set()
    gate.set()
    got.wait(1)
    sched.close(1)


def test_direct_mode_queue_full_and_cancel() -> None:
    gate = threading.Event()
    inst = FakeInstance(gate=gate)
    policy = BatchPolicy(max_batch_size=4, default_queue_policy=QueuePolicy(max_queue_size=1))
    sched, stats = scheduler([inst], policy)
    got = Collector()
    sched.submit(make_item(value=1.0), got.callback("running"))
    assert inst.entered.wait(10)
    waiting = make_item(value=2.0)
    sched.submit(waiting, got.callback("waiting"))
    assert stats.snapshot().pending == 1
    sched.submit(make_item(value=3.0), got.callback("full"))
    got.wait(1)
    assert isinstance(got.by_tag()["full"][1], Unavailable)
    assert "Exceeds maximum queue size" in str(got.by_tag()["full"][1])
    assert sched.cancel(waiting) is True
    got.wait(2)
    assert isinstance(got.by_tag()["waiting"][1], Cancelled)
    assert waiting.failure_reason == "CANCELED" and stats.snapshot().pending == 0
    assert sched.cancel(waiting) is False
    gate.set()
    got.wait(3)
    assert inst.batches == [1]  # the cancelled request never ran
    sched.close(1)


def test_cancelled_request_is_dropped_in_batching_mode() -> None:
    gate = threading.Event()
    inst = FakeInstance(gate=gate)
    sched, _ = scheduler([inst], batching())
    got = Collector()
    sched.submit(make_item(value=0.0), got.callback("first"))
    assert inst.entered.wait(10)
    alive = [True]
    sched.submit(make_item(value=1.0, is_active=lambda: alive[0]), got.callback("gone"))
    sched.submit(make_item(value=2.0), got.callback("kept"))
    alive[0] = False  # the client gives up while queued
    gate.set()
    got.wait(3)
    res = got.by_tag()
    assert isinstance(res["gone"][1], Cancelled) and res["kept"][1] is None
    assert inst.batches == [1, 1]
    sched.close(1)


def test_preserve_ordering_delivers_in_arrival_order() -> None:
    gate = threading.Event()
    first_ran = threading.Event()

    def hold_first(inputs) -> None:
        if (inputs["x"] == 1.0).any():
            first_ran.set()
            assert gate.wait(10)

    instances = [FakeInstance("a"), FakeInstance("b")]
    second = threading.Event()
    for inst in instances:
        inst.on_run = hold_first
    sched, _ = scheduler(instances, batching(preserve_ordering=True))
    got = Collector()
    sched.submit(make_item(value=1.0), got.callback("1"))
    assert first_ran.wait(10)
    sched.submit(make_item(value=2.0), lambda o, e: (got.callback("2")(o, e), second.set()))
    assert not second.wait(0.05)  # done on the other instance, but held behind "1"
    gate.set()
    got.wait(2)
    assert [t for t, _, _ in got.results] == ["1", "2"]
    sched.close(1)


def test_close_drains_queued_work_then_refuses() -> None:
    gate = threading.Event()
    inst = FakeInstance(gate=gate)
    sched, stats = scheduler([inst], batching(max_batch_size=2))
    got = Collector()
    for i in range(5):
        sched.submit(make_item(value=float(i)), got.callback(str(i)))
    assert inst.entered.wait(10)
    gate.set()
    sched.close(10)
    assert len(got.results) == 5 and all(e is None for _, _, e in got.results)
    assert sum(inst.batches) == 5
    with pytest.raises(Unavailable, match="^Server exiting$"):
        sched.infer(make_item())
    late = Collector()
    sched.submit(make_item(), late.callback("late"))
    assert isinstance(late.results[0][2], Unavailable)
    assert stats.snapshot().pending == 0


def test_close_fails_what_is_left_after_the_timeout() -> None:
    for policy in (batching(), BatchPolicy(max_batch_size=4)):
        gate = threading.Event()
        inst = FakeInstance(gate=gate)
        sched, stats = scheduler([inst], policy)
        got = Collector()
        sched.submit(make_item(value=1.0), got.callback("running"))
        assert inst.entered.wait(10)
        sched.submit(make_item(value=2.0), got.callback("queued"))
        sched.close(0.05)
        got.wait(1)
        err = got.by_tag()["queued"][1]
        assert isinstance(err, Unavailable) and str(err) == "Server exiting"
        gate.set()  # the running one still completes
        got.wait(2)
        assert got.by_tag()["running"][1] is None
        assert stats.snapshot().pending == 0


def test_many_threads_get_exactly_their_own_rows() -> None:
    instances = [FakeInstance("a"), FakeInstance("b")]
    for inst in instances:  # a little simulated compute, so requests pile up while busy
        inst.on_run = lambda _inputs: threading.Event().wait(0.001)
    sched, stats = scheduler(instances, batching(max_batch_size=16, max_queue_delay_us=2_000))
    n_threads, per_thread = 64, 10
    start = threading.Barrier(n_threads)
    errors: list[str] = []

    def client(tid: int) -> None:
        start.wait()
        for k in range(per_thread):
            rows = 1 + (tid + k) % 3
            x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + 1000 * tid + 100 * k
            out = sched.infer(WorkItem(inputs={"x": x}, rows=rows, outputs=("y",)))
            if out["y"].shape != x.shape or not np.array_equal(out["y"], x * 2):
                errors.append(f"thread {tid} request {k} got someone else's rows")

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    sched.close(5)
    assert not errors
    batches = [b for inst in instances for b in inst.batches]
    total_rows = sum(1 + i % 3 for i in range(n_threads * per_thread))
    assert sum(batches) == total_rows
    assert max(batches) <= 16
    assert len(batches) < n_threads * per_thread  # requests were merged
    snap = stats.snapshot()
    assert snap.execution_count == len(batches) and snap.pending == 0
    assert sum(b * d.compute_infer.count for b, d in snap.batch_stats.items()) == total_rows


def test_direct_mode_many_threads_share_the_instance_pool() -> None:
    instances = [FakeInstance("a"), FakeInstance("b")]
    sched, stats = scheduler(instances, BatchPolicy(max_batch_size=4))
    errors: list[str] = []

    def client(tid: int) -> None:
        for k in range(50):
            x = np.full((1, 4), tid * 100 + k, dtype=np.float32)
            out = sched.infer(WorkItem(inputs={"x": x}, rows=1, outputs=("y",)))
            if not np.array_equal(out["y"], x * 2):
                errors.append(f"thread {tid} got a wrong answer")

    _run_clients(client, 16, timeout_s=30)
    sched.close(5)
    assert not errors  # FakeInstance also asserts no instance ran two requests at once
    assert sum(len(i.batches) for i in instances) == 16 * 50
    assert stats.snapshot().pending == 0


def _run_clients(client: Callable[[int], None], count: int, timeout_s: float) -> None:
    """Run `client(0..count-1)` on their own threads at once and wait for all of them."""
    threads = [threading.Thread(target=client, args=(t,)) for t in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
        assert not t.is_alive(), "a client thread never finished"


def _wait_until_idle(sched: Scheduler, inst: FakeInstance) -> None:
    """The instance thread parks itself in the idle set once it has nothing to do."""
    for _ in range(10_000):
        with sched._lock:
            if inst in sched._idle:
                return
        threading.Event().wait(0.001)
    raise AssertionError("instance thread never went idle")


def _idle_batching_instance() -> tuple[FakeInstance, list[str], Scheduler, ModelStats]:
    """One instance with a long batching window, its thread parked idle; `ran_on` collects
    the name of the thread each run happened on."""
    inst = FakeInstance("a")
    ran_on: list[str] = []
    inst.on_run = lambda _inputs: ran_on.append(threading.current_thread().name)
    sched, stats = scheduler([inst], batching(max_batch_size=8, max_queue_delay_us=50_000))
    _wait_until_idle(sched, inst)
    return inst, ran_on, sched, stats


def test_lone_request_runs_inline_on_the_callers_thread() -> None:
    inst, ran_on, sched, stats = _idle_batching_instance()
    x = np.ones((1, 4), dtype=np.float32)
    out = sched.infer(WorkItem(inputs={"x": x}, rows=1, outputs=("y",)))
    assert np.array_equal(out["y"], x * 2)
    assert ran_on == [threading.current_thread().name]  # no hand-off to the instance thread
    assert stats.snapshot().execution_count == 1 and stats.snapshot().pending == 0
    # after the borrow the instance thread works again: a request queued behind a busy
    # instance is run by it, not by its caller
    gate = threading.Event()
    inst.gate = gate
    inst.entered.clear()  # set by the run above; wait for *this* request's run
    first = threading.Thread(
        target=sched.infer, args=(WorkItem(inputs={"x": x}, rows=1, outputs=("y",)),)
    )
    first.start()
    assert inst.entered.wait(5)
    inst.gate = None
    result: list[dict] = []
    second = threading.Thread(
        target=lambda: result.append(
            sched.infer(WorkItem(inputs={"x": x + 1}, rows=1, outputs=("y",)))
        ),
        name="second-caller",
    )
    second.start()
    for _ in range(5_000):  # the second request must be queued before the first finishes
        if stats.snapshot().pending == 1:
            break
        threading.Event().wait(0.001)
    assert stats.snapshot().pending == 1, "the second request never queued"
    gate.set()
    first.join(5)
    second.join(5)
    assert np.array_equal(result[0]["y"], (x + 1) * 2)
    assert ran_on[-1] != "second-caller"
    sched.close(5)


def test_a_finished_borrow_leaves_the_instance_idle_without_waking_its_thread() -> None:
    """After a lone request ran inline and nothing is queued, the instance is free to borrow
    again at once: no wake-up of its thread is needed between two lone requests."""
    inst, ran_on, sched, stats = _idle_batching_instance()
    x = np.ones((1, 4), dtype=np.float32)
    for k in range(5):
        out = sched.infer(WorkItem(inputs={"x": x + k}, rows=1, outputs=("y",)))
        assert np.array_equal(out["y"], (x + k) * 2)
        with sched._lock:  # at once, not once the instance thread got round to it
            assert inst in sched._idle and inst not in sched._borrowed
    assert ran_on == [threading.current_thread().name] * 5
    assert stats.snapshot().execution_count == 5 and stats.snapshot().pending == 0
    sched.close(5)


def test_borrowed_and_queued_runs_never_share_an_instance() -> None:
    """Lone requests borrowing the instance and bursts queued for its thread, interleaved:
    every answer is right, no instance runs two batches at once (FakeInstance asserts it) and
    nothing is left pending."""
    instances = [FakeInstance("a"), FakeInstance("b")]
    sched, stats = scheduler(instances, batching(max_batch_size=4, max_queue_delay_us=200))
    errors: list[str] = []

    def client(tid: int) -> None:
        for k in range(60):
            if (tid + k) % 3 == 0:
                threading.Event().wait(0.0005)  # let the queue drain: the next one is lone
            x = np.full((1, 4), tid * 1000 + k, dtype=np.float32)
            try:  # a run that overlapped another on its instance fails its batch here
                out = sched.infer(WorkItem(inputs={"x": x}, rows=1, outputs=("y",)))
            except Exception as exc:
                errors.append(f"thread {tid} request {k}: {exc}")
                continue
            if not np.array_equal(out["y"], x * 2):
                errors.append(f"thread {tid} request {k} got a wrong answer")

    _run_clients(client, 12, timeout_s=60)
    sched.close(5)
    assert not errors
    assert sum(sum(i.batches) for i in instances) == 12 * 60  # every row ran exactly once
    assert stats.snapshot().pending == 0


def test_a_queued_request_is_not_left_waiting_for_a_borrow_while_an_instance_is_idle() -> None:
    """Three of four instances are borrowed by lone callers and held; a request that queues
    (here through `submit`, which never borrows) must be run by the fourth, idle instance at
    once. The instance threads share one Condition: a single notify can land on the thread
    of a borrowed instance, which goes back to sleep, while the idle instance's thread never
    hears of the work, and the request would wait for a borrow to end."""
    for _trial in range(4):  # which waiter a notify reaches is up to the Condition
        gate = threading.Event()
        instances = [FakeInstance(n) for n in "abcd"]

        def hold(inputs, gate: threading.Event = gate) -> None:
            if (inputs["x"] < 0).any():  # the borrowers' requests: held past got.wait's 10 s
                assert gate.wait(60)

        for inst in instances:
            inst.on_run = hold
        sched, stats = scheduler(instances, batching(max_batch_size=8))
        for inst in instances:
            _wait_until_idle(sched, inst)
        borrowers = [
            threading.Thread(target=sched.infer, args=(make_item(value=-1.0 - i),))
            for i in range(3)
        ]
        for i, t in enumerate(borrowers):
            t.start()
            for _ in range(10_000):  # each lone caller borrows before the next arrives
                with sched._lock:
                    if len(sched._borrowed) == i + 1:
                        break
                threading.Event().wait(0.001)
        with sched._lock:
            assert len(sched._borrowed) == 3 and len(sched._idle) == 1
        got = Collector()
        sched.submit(make_item(value=5.0), got.callback("queued"))
        try:
            got.wait(1)  # the idle instance runs it while the borrowers are still held
            assert not gate.is_set() and all(t.is_alive() for t in borrowers)
            out, err = got.by_tag()["queued"]
            assert err is None and out is not None and np.array_equal(out["y"][0], [10.0] * 4)
        finally:
            gate.set()
            for t in borrowers:
                t.join(10)
            sched.close(5)
        assert stats.snapshot().pending == 0
