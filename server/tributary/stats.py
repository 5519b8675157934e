"""Per-model-version counters: the ONE source for the ModelStatistics RPC and for Prometheus.

Both views must agree with each other and with Triton's semantics (docs/protocol.md),
so every number lives here once, as plain integers behind one small lock, and each view is a
rendering of a `StatsSnapshot` taken under that lock. The hot path pays a handful of integer
additions and one uncontended lock per call.

Semantics (Triton's, which perf_analyzer depends on):

- `success` counts *requests* (a batch-N request counts 1) with their end-to-end duration;
  `inference_count` counts *rows* (that request counts N); `execution_count` counts model
  executions, so several requests merged by the dynamic batcher count once.
- `queue` and `compute_*` are per request: every request of a batch is charged the whole batch's
  compute durations, exactly like Triton. `queue.count` grows with every successful request
  (perf_analyzer picks the version whose `queue.count` moved).
- `batch_stats` is per execution, keyed by the executed batch size (rows).
- `fail` counts failed requests; `failures_by_reason` splits them for the
  `nv_inference_request_failure{reason=...}` counter (REJECTED, CANCELED, BACKEND, OTHER).
- `cache_hit`/`cache_miss` (response cache, tributary.cache): a hit counts as a successful
  request (`success`, and `queue` with no queue time) but adds nothing to `compute_*`,
  `inference_count` or `execution_count`; its duration is the lookup. A miss's duration is the
  lookup plus storing the result. Triton's semantics (docs/protocol.md#statistics).

Histograms (not part of the RPC; for Prometheus): bounds are upper bounds ("le", inclusive) and
the last count is the +Inf bucket. Latency histograms observe successful requests only, in
microseconds: `LATENCY_BUCKETS_US` spans 100 us .. 10 s roughly 1-2.5-5 per decade, which covers
a CPU micro-model (sub-millisecond) up to a large GPU batch. The batch-size histogram observes
each execution's rows with power-of-two bounds `BATCH_SIZE_BUCKETS` (1 .. 4096).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass, field

FAILURE_REASONS: tuple[str, ...] = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
"""Values of the `reason` label of `nv_inference_request_failure` (docs/protocol.md#metrics)."""

LATENCY_BUCKETS_US: tuple[int, ...] = (
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
)
BATCH_SIZE_BUCKETS: tuple[int, ...] = tuple(1 << i for i in range(13))  # 1, 2, 4, ... 4096


@dataclass(frozen=True)
class Duration:
    """A (count, total nanoseconds) pair, the shape of Triton's StatisticDuration."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class BatchDurations:
    """Triton's InferBatchStatistics: compute phases of executions of one batch size."""

    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class Histogram:
    """A fixed-bucket histogram. `counts` are per bucket (not cumulative), one longer than
    `bounds`: the last entry is the +Inf bucket. `sum` is the sum of observed values (Prometheus'
    `_sum`), in the histogram's unit (microseconds for latencies, rows for batch sizes)."""

    bounds: tuple[int, ...]
    counts: tuple[int, ...]
    sum: int
    count: int

    def cumulative(self) -> tuple[int, ...]:
        """Counts as Prometheus' `_bucket{le=...}` series want them (the last one is +Inf)."""
        out: list[int] = []
        running = 0
        for c in self.counts:
            running += c
            out.append(running)
        return tuple(out)


@dataclass(frozen=True)
class MemoryUsage:
    """Triton's MemoryUsage (type "CPU"/"CPU_PINNED"/"GPU", device id, bytes). Empty for now;
    the GPU backend can report its arena here later without changing the snapshot's shape."""

    kind: str
    device_id: int
    byte_size: int


@dataclass(frozen=True)
class StatsSnapshot:
    """Everything about one model version at one instant, consistent under one lock."""

    name: str
    version: int
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    cache_hit: Duration
    cache_miss: Duration
    batch_stats: dict[int, BatchDurations]
    failures_by_reason: dict[str, int]
    pending: int
    request_duration_us: Histogram
    queue_duration_us: Histogram
    batch_size: Histogram
    memory_usage: tuple[MemoryUsage, ...] = field(default_factory=tuple)


class _Hist:
    """Mutable histogram state; only touched under ModelStats' lock."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[int, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0
        self.count = 0

    def observe(self, value: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def freeze(self, total: int | None = None) -> Histogram:
        return Histogram(
            self.bounds, tuple(self.counts), self.total if total is None else total, self.count
        )


class ModelStats:
    """Counters for one (model name, version). Thread-safe; callers never need their own lock.

    The scheduler calls `execution` and `pending`; whoever owns a request's lifetime (the
    servicer) calls `request_success`/`request_failure` once per request, because only it knows
    the end-to-end duration including decode and encode.
    """

    def __init__(self, name: str, version: int) -> None:
        self.name = name
        self.version = version
        self._lock = threading.Lock()
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        # [count, ns] pairs, kept as lists so the hot path mutates in place.
        self._success = [0, 0]
        self._fail = [0, 0]
        self._queue = [0, 0]
        self._compute_input = [0, 0]
        self._compute_infer = [0, 0]
        self._compute_output = [0, 0]
        self._cache_hit = [0, 0]
        self._cache_miss = [0, 0]
        # batch size -> [count, input_ns, infer_ns, output_ns]
        self._batches: dict[int, list[int]] = {}
        self._failures = dict.fromkeys(FAILURE_REASONS, 0)
        self._pending = 0
        # Latency sums are kept in ns and turned into us at snapshot time, so the rounding
        # error does not grow with the number of observations.
        self._request_hist = _Hist(LATENCY_BUCKETS_US)
        self._request_sum_ns = 0
        self._queue_hist = _Hist(LATENCY_BUCKETS_US)
        self._queue_sum_ns = 0
        self._batch_hist = _Hist(BATCH_SIZE_BUCKETS)

    def request_success(
        self,
        *,
        total_ns: int,
        queue_ns: int,
        compute_input_ns: int,
        compute_infer_ns: int,
        compute_output_ns: int,
        rows: int,
        now_ms: int,
    ) -> None:
        """One successful request of `rows` rows (1 for models without a batch dimension)."""
        with self._lock:
            s = self._success
            s[0] += 1
            s[1] += total_ns
            q = self._queue
            q[0] += 1
            q[1] += queue_ns
            ci = self._compute_input
            ci[0] += 1
            ci[1] += compute_input_ns
            cf = self._compute_infer
            cf[0] += 1
            cf[1] += compute_infer_ns
            co = self._compute_output
            co[0] += 1
            co[1] += compute_output_ns
            self._inference_count += rows
            self._last_inference_ms = now_ms
            self._request_hist.observe(total_ns // 1000)
            self._request_sum_ns += total_ns
            self._queue_hist.observe(queue_ns // 1000)
            self._queue_sum_ns += queue_ns

    def request_cache_hit(self, *, total_ns: int, hit_ns: int, now_ms: int) -> None:
        """One request answered from the response cache (the model did not run)."""
        with self._lock:
            s = self._success
            s[0] += 1
            s[1] += total_ns
            self._queue[0] += 1
            h = self._cache_hit
            h[0] += 1
            h[1] += hit_ns
            self._last_inference_ms = now_ms
            self._request_hist.observe(total_ns // 1000)
            self._request_sum_ns += total_ns
            self._queue_hist.observe(0)

    def cache_miss(self, *, miss_ns: int) -> None:
        """A lookup that missed, plus storing what the model then produced."""
        with self._lock:
            m = self._cache_miss
            m[0] += 1
            m[1] += miss_ns

    def request_failure(self, *, total_ns: int, reason: str) -> None:
        """One failed request. Unknown reasons count as OTHER rather than raising: a stats call
        must never turn a request failure into a second failure."""
        if reason not in self._failures:
            reason = "OTHER"
        with self._lock:
            f = self._fail
            f[0] += 1
            f[1] += total_ns
            self._failures[reason] += 1

    def execution(
        self,
        *,
        batch_rows: int,
        compute_input_ns: int,
        compute_infer_ns: int,
        compute_output_ns: int,
    ) -> None:
        """One model execution of `batch_rows` rows (several requests when batched)."""
        with self._lock:
            self._execution_count += 1
            b = self._batches.get(batch_rows)
            if b is None:
                b = self._batches[batch_rows] = [0, 0, 0, 0]
            b[0] += 1
            b[1] += compute_input_ns
            b[2] += compute_infer_ns
            b[3] += compute_output_ns
            self._batch_hist.observe(batch_rows)

    def pending(self, delta: int) -> None:
        """Move the gauge of requests queued but not yet taken into an execution."""
        with self._lock:
            self._pending += delta

    def snapshot(self) -> StatsSnapshot:
        """A consistent copy: all numbers are read under the same lock acquisition."""
        with self._lock:
            batch_stats = {
                size: BatchDurations(
                    size, Duration(b[0], b[1]), Duration(b[0], b[2]), Duration(b[0], b[3])
                )
                for size, b in sorted(self._batches.items())
            }
            return StatsSnapshot(
                name=self.name,
                version=self.version,
                last_inference_ms=self._last_inference_ms,
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                success=Duration(*self._success),
                fail=Duration(*self._fail),
                queue=Duration(*self._queue),
                compute_input=Duration(*self._compute_input),
                compute_infer=Duration(*self._compute_infer),
                compute_output=Duration(*self._compute_output),
                cache_hit=Duration(*self._cache_hit),
                cache_miss=Duration(*self._cache_miss),
                batch_stats=batch_stats,
                failures_by_reason=dict(self._failures),
                pending=self._pending,
                request_duration_us=self._request_hist.freeze(self._request_sum_ns // 1000),
                queue_duration_us=self._queue_hist.freeze(self._queue_sum_ns // 1000),
                batch_size=self._batch_hist.freeze(),
                memory_usage=(),
            )
