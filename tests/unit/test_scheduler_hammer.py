"""Every path that takes an instance gives it back: timeouts, cancellations, failures, and a
caller that stops waiting because of an exception.

The driver is hammered from many threads with a mix of all of them; afterwards every instance
must be free (a gated request per instance runs at once) and the pending gauge must be zero.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from test_scheduler import (
    Collector,
    FakeInstance,
    batching,
    busy_direct_scheduler,
    make_item,
    scheduler,
)

from tributary.errors import InferenceError
from tributary.scheduler import BatchPolicy, QueuePolicy


def _all_instances_free(sched, instances: list[FakeInstance]) -> None:
    """Run one gated request per instance at the same time: each must reach an instance.

    The gated requests have the policy's default queue timeout (a request may only shorten
    it), so on a loaded machine one can expire before a free instance takes it. That is the
    queue policy working, not a lost instance: it is tried again, and only a request that
    neither ran nor expired fails the test."""
    for _attempt in range(5):
        gate = threading.Event()
        for inst in instances:
            inst.gate = gate
            inst.entered.clear()
            inst.fail_value = None
        got = Collector()
        for i in range(len(instances)):
            # different widths: never merged into one batch, so each needs its own instance
            sched.submit(make_item(value=100.0 + i, width=4 + i), got.callback(str(i)))
        try:
            # shorter than FakeInstance's own 10 s wait for the gate, so a request that did
            # enter is released before it gives up
            entered = [inst.entered.wait(4) for inst in instances]
        finally:
            gate.set()
        got.wait(len(instances))
        errors = [err for _, _, err in got.results if err is not None]
        if all(entered):
            assert not errors
            return
        missing = [inst.name for inst, ok in zip(instances, entered, strict=True) if not ok]
        assert errors, f"instance(s) {missing} were never given back"
        assert all("Request timeout expired" in str(e) for e in errors), errors
    pytest.fail("the gated requests expired in the queue five times in a row")


def _hammer(sched, instances: list[FakeInstance], *, seconds: float = 1.5) -> int:
    rng = random.Random(7)
    for inst in instances:
        inst.fail_value = 13.0
        inst.on_run = lambda _inputs: time.sleep(rng.random() * 0.002)
    done = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(seed: int) -> None:
        r = random.Random(seed)
        while time.monotonic() < stop:
            choice = r.random()
            kw: dict = {}
            if choice < 0.2:
                kw["timeout_us"] = r.choice([1, 50, 500])
            elif choice < 0.3:
                kw["timeout_us"] = 2**62  # far beyond any platform wait limit
            elif choice < 0.4:
                kw["is_active"] = lambda: False  # client already gone
            value = 13.0 if r.random() < 0.15 else float(r.randint(0, 9))
            item = make_item(value=value, rows=r.randint(1, 3), **kw)
            if r.random() < 0.5:
                try:
                    sched.infer(item)
                except InferenceError:
                    pass
            else:
                ev = threading.Event()
                sched.submit(item, lambda _o, _e, ev=ev: ev.set())
                if r.random() < 0.3:
                    sched.cancel(item)
                assert ev.wait(10), "a submitted request never completed"
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a client thread hung"
    for inst in instances:
        inst.on_run = None
    return done[0]


@pytest.mark.parametrize(
    "policy",
    [
        BatchPolicy(max_batch_size=8),
        batching(max_queue_delay_us=200),
        batching(
            max_queue_delay_us=100,
            priority_levels=2,
            default_priority_level=2,
            default_queue_policy=QueuePolicy(default_timeout_us=300, allow_timeout_override=True),
            preserve_ordering=True,
        ),
    ],
    ids=["direct", "batching", "batching-ordered-timeouts"],
)
def test_hammered_scheduler_gives_every_instance_back(policy: BatchPolicy) -> None:
    instances = [FakeInstance(f"i{n}") for n in range(2)]
    sched, stats = scheduler(instances, policy)
    served = _hammer(sched, instances)
    assert served > 100
    assert stats.snapshot().pending == 0
    _all_instances_free(sched, instances)
    assert stats.snapshot().pending == 0
    sched.close(5)


def test_direct_mode_huge_timeout_waits_and_keeps_the_instance() -> None:
    """A queued caller with a 2^62 us timeout used to die in the wait (time_t overflow) while
    staying queued, so the instance handed to it later was never returned."""
    sched, stats, inst, gate, got = busy_direct_scheduler()
    result: list[object] = []
    waiter = threading.Thread(
        target=lambda: result.append(sched.infer(make_item(value=2.0, timeout_us=2**62)))
    )
    waiter.start()
    time.sleep(0.05)  # let it queue behind the busy instance
    gate.set()
    waiter.join(10)
    assert not waiter.is_alive() and len(result) == 1
    got.wait(1)
    assert stats.snapshot().pending == 0
    inst.gate = None
    sched.infer(make_item(value=3.0))  # the instance is free again
    sched.close(1)


def test_caller_interrupted_while_queued_leaves_nothing_behind(monkeypatch) -> None:
    """Whatever interrupts a waiting caller, its queue entry goes and no instance is lost."""
    sched, stats, inst, gate, got = busy_direct_scheduler()

    def boom(entry) -> None:
        raise OverflowError("timestamp out of range for platform time_t")

    monkeypatch.setattr(sched, "_await", boom)
    with pytest.raises(OverflowError):
        sched.infer(make_item(value=2.0))
    assert stats.snapshot().pending == 0
    monkeypatch.undo()
    gate.set()
    got.wait(1)
    inst.gate = None
    sched.infer(make_item(value=3.0))
    sched.close(1)
