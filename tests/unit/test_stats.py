"""ModelStats: Triton's counting rules, histogram buckets, and snapshot consistency."""

from __future__ import annotations

import threading

from tributary.stats import (
    BATCH_SIZE_BUCKETS,
    FAILURE_REASONS,
    LATENCY_BUCKETS_US,
    Duration,
    ModelStats,
)


def _success(stats: ModelStats, *, total_us: int, queue_us: int, rows: int, now_ms: int) -> None:
    stats.request_success(
        total_ns=total_us * 1000,
        queue_ns=queue_us * 1000,
        compute_input_ns=10,
        compute_infer_ns=200,
        compute_output_ns=30,
        rows=rows,
        now_ms=now_ms,
    )


def test_counts_and_sums_after_a_known_sequence() -> None:
    stats = ModelStats("simple", 3)
    # Two requests (1 row and 3 rows) merged into one execution of 4 rows, then a lone one.
    _success(stats, total_us=500, queue_us=100, rows=1, now_ms=1_000)
    _success(stats, total_us=700, queue_us=50, rows=3, now_ms=1_001)
    stats.execution(batch_rows=4, compute_input_ns=10, compute_infer_ns=200, compute_output_ns=30)
    _success(stats, total_us=300, queue_us=0, rows=1, now_ms=1_005)
    stats.execution(batch_rows=1, compute_input_ns=1, compute_infer_ns=2, compute_output_ns=3)
    stats.request_failure(total_ns=40_000, reason="REJECTED")
    stats.request_failure(total_ns=2_000, reason="CANCELED")
    stats.request_failure(total_ns=1_000, reason="no such reason")
    stats.pending(+2)
    stats.pending(-1)

    s = stats.snapshot()
    assert (s.name, s.version) == ("simple", 3)
    assert s.success == Duration(3, 1_500_000)
    assert s.inference_count == 5  # rows, not requests
    assert s.execution_count == 2
    assert s.queue == Duration(3, 150_000)
    assert s.compute_input == Duration(3, 30)
    assert s.compute_infer == Duration(3, 600)
    assert s.compute_output == Duration(3, 90)
    assert s.last_inference_ms == 1_005
    assert s.fail == Duration(3, 43_000)
    assert s.failures_by_reason == {"REJECTED": 1, "CANCELED": 1, "BACKEND": 0, "OTHER": 1}
    assert set(s.failures_by_reason) == set(FAILURE_REASONS)
    assert s.pending == 1
    assert s.cache_hit == Duration(0, 0) and s.cache_miss == Duration(0, 0)
    assert sorted(s.batch_stats) == [1, 4]
    b4 = s.batch_stats[4]
    assert b4.batch_size == 4
    assert (b4.compute_input, b4.compute_infer, b4.compute_output) == (
        Duration(1, 10),
        Duration(1, 200),
        Duration(1, 30),
    )
    assert s.batch_stats[1].compute_output == Duration(1, 3)
    assert s.memory_usage == ()


def test_latency_histogram_buckets_are_inclusive_upper_bounds() -> None:
    stats = ModelStats("m", 1)
    for total_us in (50, 100, 101, 20_000_000):
        _success(stats, total_us=total_us, queue_us=0, rows=1, now_ms=0)
    h = stats.snapshot().request_duration_us
    assert h.bounds == LATENCY_BUCKETS_US
    assert len(h.counts) == len(h.bounds) + 1
    assert h.counts[0] == 2  # 50 and 100 are <= 100
    assert h.counts[1] == 1  # 101 is <= 250
    assert h.counts[-1] == 1  # 20 s is beyond the last bound: +Inf
    assert h.count == 4
    assert h.sum == 50 + 100 + 101 + 20_000_000
    cumulative = h.cumulative()
    assert cumulative[0] == 2 and cumulative[1] == 3 and cumulative[-1] == 4
    q = stats.snapshot().queue_duration_us
    assert q.counts[0] == 4 and q.sum == 0


def test_batch_size_histogram() -> None:
    stats = ModelStats("m", 1)
    for rows in (1, 3, 4, 5, 100_000):
        stats.execution(
            batch_rows=rows, compute_input_ns=0, compute_infer_ns=0, compute_output_ns=0
        )
    h = stats.snapshot().batch_size
    assert h.bounds[:8] == (1, 2, 4, 8, 16, 32, 64, 128)
    assert h.bounds == BATCH_SIZE_BUCKETS
    assert h.counts[0] == 1  # 1
    assert h.counts[1] == 0  # nothing of 2
    assert h.counts[2] == 2  # 3 and 4
    assert h.counts[3] == 1  # 5
    assert h.counts[-1] == 1  # 100000: +Inf
    assert h.sum == 1 + 3 + 4 + 5 + 100_000 and h.count == 5


def test_snapshot_is_a_copy() -> None:
    stats = ModelStats("m", 1)
    stats.execution(batch_rows=2, compute_input_ns=1, compute_infer_ns=1, compute_output_ns=1)
    before = stats.snapshot()
    stats.execution(batch_rows=2, compute_input_ns=1, compute_infer_ns=1, compute_output_ns=1)
    stats.request_failure(total_ns=1, reason="BACKEND")
    assert before.execution_count == 1
    assert before.batch_stats[2].compute_infer == Duration(1, 1)
    assert before.failures_by_reason["BACKEND"] == 0
    assert stats.snapshot().batch_stats[2].compute_infer == Duration(2, 2)


def test_snapshot_is_consistent_under_concurrent_updates() -> None:
    """Every snapshot must see each request's increments all-or-nothing."""
    stats = ModelStats("m", 1)
    stop = threading.Event()
    bad: list[str] = []

    def writer() -> None:
        while not stop.is_set():
            _success(stats, total_us=7, queue_us=3, rows=2, now_ms=1)

    def reader() -> None:
        for _ in range(2_000):
            s = stats.snapshot()
            n = s.success.count
            if (
                s.inference_count != 2 * n
                or s.queue.count != n
                or s.compute_infer.count != n
                or s.request_duration_us.count != n
                or s.success.ns != 7_000 * n
                or s.queue.ns != 3_000 * n
            ):
                bad.append(f"inconsistent snapshot at {n} requests")

    writers = [threading.Thread(target=writer) for _ in range(3)]
    for t in writers:
        t.start()
    try:
        reader()
    finally:
        stop.set()
        for t in writers:
            t.join()
    assert not bad
    assert stats.snapshot().success.count > 0
