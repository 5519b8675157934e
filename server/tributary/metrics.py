"""Prometheus endpoint with Triton's metric names (docs/protocol.md#metrics).

Dashboards and KServe annotations written for Triton look for `nv_inference_count` etc. typed
`counter` *without* a `_total` suffix, which is what prometheus-cpp emits. prometheus_client
would rename them, so the text exposition (format 0.0.4) is written here directly. Every
per-model number comes from one `ModelStats.snapshot()` per model per scrape, so the families of
one scrape agree with each other and with the ModelStatistics RPC.

Histograms are our own addition under `tributary_*` names: Triton's latency histogram is opt-in
and bucketed differently, and reusing its name with other buckets would mislead dashboards.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from .options import ServerOptions
from .stats import FAILURE_REASONS, Histogram, StatsSnapshot
from .sysmetrics import CpuSampler, GpuSampler, Sampler, SamplerThread

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"

Labels = Sequence[tuple[str, str]]


class _Repository(Protocol):
    """All the renderer needs: READY model versions carrying name, version, stats, config."""

    def servables(self) -> Sequence[Any]: ...


# ------------------------------------------------------------------------------ text helpers


def escape_label_value(value: str) -> str:
    """Exposition format 0.0.4: backslash, double quote and newline are escaped in values."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """Integers stay integers (counters read exactly); floats use repr, which round-trips."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels) + "}"


_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def tag_label_name(tag: str) -> str:
    """Triton prefixes metric_tags keys with `_`; anything not allowed in a label name becomes
    `_` so one odd tag cannot make the whole scrape unparseable."""
    return "_" + _INVALID_LABEL_CHARS.sub("_", tag)


class _Text:
    """Accumulates exposition lines; one family at a time, header first."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: Labels, value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {format_value(value)}")

    def histogram(self, name: str, labels: Labels, hist: Histogram) -> None:
        """Cumulative `_bucket` series ending at +Inf (== `_count`), then `_sum` and `_count`."""
        cumulative = hist.cumulative()
        for bound, count in zip(hist.bounds, cumulative, strict=False):
            self.sample(f"{name}_bucket", [*labels, ("le", format_value(bound))], count)
        self.sample(f"{name}_bucket", [*labels, ("le", "+Inf")], cumulative[-1])
        self.sample(f"{name}_sum", labels, hist.sum)
        self.sample(f"{name}_count", labels, hist.count)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n" if self.lines else ""


# ---------------------------------------------------------------------------- model families


@dataclass(frozen=True)
class _ModelRow:
    labels: tuple[tuple[str, str], ...]
    snap: StatsSnapshot
    load_seconds: float | None
    cached: bool = False  # the version uses the response cache: nv_cache_* series


def _us(ns: int) -> int:
    return ns // 1000


_COUNTERS: tuple[tuple[str, str, Callable[[StatsSnapshot], int]], ...] = (
    (
        "nv_inference_request_success",
        "Number of successful inference requests, all batch sizes",
        lambda s: s.success.count,
    ),
    (
        "nv_inference_count",
        "Number of inferences performed (a batch of N counts N)",
        lambda s: s.inference_count,
    ),
    (
        "nv_inference_exec_count",
        "Number of model executions performed (several batched requests count once)",
        lambda s: s.execution_count,
    ),
    (
        "nv_inference_request_duration_us",
        "Cumulative end-to-end inference request handling time in microseconds",
        lambda s: _us(s.success.ns),
    ),
    (
        "nv_inference_queue_duration_us",
        "Cumulative time requests spent waiting in the scheduling queue in microseconds",
        lambda s: _us(s.queue.ns),
    ),
    (
        "nv_inference_compute_input_duration_us",
        "Cumulative compute input time in microseconds",
        lambda s: _us(s.compute_input.ns),
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "Cumulative compute inference time in microseconds",
        lambda s: _us(s.compute_infer.ns),
    ),
    (
        "nv_inference_compute_output_duration_us",
        "Cumulative compute output time in microseconds",
        lambda s: _us(s.compute_output.ns),
    ),
)

_CACHE_COUNTERS: tuple[tuple[str, str, Callable[[StatsSnapshot], int]], ...] = (
    (
        "nv_cache_num_hits_per_model",
        "Number of response cache hits per model",
        lambda s: s.cache_hit.count,
    ),
    (
        "nv_cache_num_misses_per_model",
        "Number of response cache misses per model",
        lambda s: s.cache_miss.count,
    ),
    (
        "nv_cache_hit_duration_per_model",
        "Total cache hit duration per model, in microseconds",
        lambda s: _us(s.cache_hit.ns),
    ),
    (
        "nv_cache_miss_duration_per_model",
        "Total cache miss (lookup and insertion) duration per model, in microseconds",
        lambda s: _us(s.cache_miss.ns),
    ),
)

_HISTOGRAMS: tuple[tuple[str, str, Callable[[StatsSnapshot], Histogram]], ...] = (
    (
        "tributary_inference_request_duration_us",
        "End-to-end duration of successful requests in microseconds",
        lambda s: s.request_duration_us,
    ),
    (
        "tributary_inference_queue_duration_us",
        "Queue duration of successful requests in microseconds",
        lambda s: s.queue_duration_us,
    ),
    (
        "tributary_inference_batch_size",
        "Rows per model execution",
        lambda s: s.batch_size,
    ),
)


def _model_rows(repository: _Repository) -> list[_ModelRow]:
    """One snapshot per model version, sorted by (name, version) so scrapes diff cleanly.
    Servables without stats are skipped, not guessed."""
    rows: list[_ModelRow] = []
    servables = sorted(repository.servables(), key=lambda m: (m.name, int(m.version)))
    for model in servables:
        stats = getattr(model, "stats", None)
        if stats is None:
            continue
        labels = [("model", str(model.name)), ("version", str(model.version))]
        tags = getattr(getattr(model, "config", None), "metric_tags", None) or {}
        labels += [(tag_label_name(k), str(tags[k])) for k in sorted(tags)]
        load = getattr(model, "load_seconds", None)
        cached = getattr(model, "cache", None) is not None
        rows.append(_ModelRow(tuple(labels), stats.snapshot(), load, cached))
    return rows


def _render_models(out: _Text, rows: Sequence[_ModelRow]) -> None:
    # The success counter leads, then failure, as Triton lists them.
    name, help_text, get = _COUNTERS[0]
    out.family(name, "counter", help_text)
    for row in rows:
        out.sample(name, row.labels, get(row.snap))
    out.family(
        "nv_inference_request_failure",
        "counter",
        "Number of failed inference requests, by reason (REJECTED, CANCELED, BACKEND, OTHER)",
    )
    for row in rows:
        for reason in FAILURE_REASONS:
            count = row.snap.failures_by_reason.get(reason, 0)
            out.sample("nv_inference_request_failure", [*row.labels, ("reason", reason)], count)
    for name, help_text, get in _COUNTERS[1:]:
        out.family(name, "counter", help_text)
        for row in rows:
            out.sample(name, row.labels, get(row.snap))
    out.family(
        "nv_inference_pending_request_count",
        "gauge",
        "Instantaneous number of requests queued but not yet taken by an execution",
    )
    for row in rows:
        out.sample("nv_inference_pending_request_count", row.labels, row.snap.pending)
    out.family("nv_model_load_duration_secs", "gauge", "Model load time in seconds")
    for row in rows:
        if row.load_seconds is not None:
            out.sample("nv_model_load_duration_secs", row.labels, float(row.load_seconds))
    cached = [row for row in rows if row.cached]
    if cached:  # Triton lists these only for models whose response cache is on
        for name, help_text, get in _CACHE_COUNTERS:
            out.family(name, "counter", help_text)
            for row in cached:
                out.sample(name, row.labels, get(row.snap))
    for name, help_text, hist_of in _HISTOGRAMS:
        out.family(name, "histogram", help_text)
        for row in rows:
            out.histogram(name, row.labels, hist_of(row.snap))


# ---------------------------------------------------------------------------- system families


_CPU_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("nv_cpu_utilization", "utilization", "CPU utilization rate [0.0 - 1.0]"),
    ("nv_cpu_memory_total_bytes", "memory_total_bytes", "CPU total memory (RAM), in bytes"),
    ("nv_cpu_memory_used_bytes", "memory_used_bytes", "CPU used memory (RAM), in bytes"),
)
# (name, type, GpuReading attribute, help)
_GPU_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    ("nv_gpu_utilization", "gauge", "utilization", "GPU utilization rate [0.0 - 1.0]"),
    ("nv_gpu_memory_total_bytes", "gauge", "memory_total_bytes", "GPU total memory, in bytes"),
    ("nv_gpu_memory_used_bytes", "gauge", "memory_used_bytes", "GPU used memory, in bytes"),
    ("nv_gpu_power_usage", "gauge", "power_usage_w", "GPU power usage in watts"),
    ("nv_gpu_power_limit", "gauge", "power_limit_w", "GPU power management limit in watts"),
    ("nv_energy_consumption", "counter", "energy_j", "GPU energy consumption in joules since "
     "the server started"),
)  # fmt: skip


def _render_cpu(out: _Text, cpu: CpuSampler) -> None:
    reading = cpu.reading()
    if reading is None:
        return
    for name, attr, help_text in _CPU_FAMILIES:
        out.family(name, "gauge", help_text)
        out.sample(name, (), getattr(reading, attr))


def _render_gpu(out: _Text, gpu: GpuSampler) -> None:
    """Per-GPU series labelled gpu_uuid; a family NVML cannot fill on any GPU is left out."""
    readings = gpu.readings()
    for name, kind, attr, help_text in _GPU_FAMILIES:
        values = [(r.uuid, getattr(r, attr)) for r in readings]
        if all(v is None for _, v in values):
            continue
        out.family(name, kind, help_text)
        for uuid, value in values:
            if value is not None:
                out.sample(name, [("gpu_uuid", uuid)], value)


def render(repository: _Repository, *, cpu: CpuSampler | None, gpu: GpuSampler | None) -> str:
    """The whole /metrics body. Reads snapshots and cached sampler readings only, so a scrape
    never blocks on /proc or NVML and never holds a stats lock for longer than one copy."""
    out = _Text()
    _render_models(out, _model_rows(repository))
    if gpu is not None:
        _render_gpu(out, gpu)
    if cpu is not None:
        _render_cpu(out, cpu)
    return out.text()


# ------------------------------------------------------------------------------------ server


METRICS_MAX_CONNECTIONS = 128
"""Connections served at once; more are closed on accept (a scraper needs one or two)."""
METRICS_SOCKET_TIMEOUT_S = 5.0
"""A connection that sends nothing (or half a request) for this long is dropped, so slow or
idle clients cannot hold threads."""


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck scraper must not block shutdown
    request_queue_size = METRICS_MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int], body: Callable[[], str]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.body = body
        self._slots = threading.BoundedSemaphore(METRICS_MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("metrics: connection from %s refused (busy)", client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    server_version = "tributary-metrics"
    timeout = METRICS_SOCKET_TIMEOUT_S

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        if self.path.split("?", 1)[0] != METRICS_PATH:
            self._reply(404, "text/plain; charset=utf-8", b"not found\n")
            return
        try:
            payload = self.server.body().encode("utf-8")
        except Exception:
            log.exception("rendering /metrics failed")
            self._reply(500, "text/plain; charset=utf-8", b"internal error\n")
            return
        self._reply(200, CONTENT_TYPE, payload)

    def _reply(self, code: int, content_type: str, payload: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        # Scrapes every few seconds would flood stderr; keep them at debug level.
        log.debug("metrics %s - %s", self.address_string(), format % args)


class MetricsServer:
    """GET /metrics on (metrics_address, metrics_port), plus the sampler thread. All state is
    private to the instance: two servers in one process (tests) never share a registry."""

    def __init__(
        self,
        repository: _Repository,
        options: ServerOptions,
        gpus: int,
        *,
        cpu: CpuSampler | None = None,
        gpu: GpuSampler | None = None,
        nvml: Any | None = None,
    ) -> None:
        """`cpu`/`gpu`/`nvml` let tests inject samplers or a fake NVML module; by default the
        samplers are built from the options (GPU only when gpus > 0 and pynvml is present)."""
        self._repository = repository
        self._options = options
        if cpu is None and options.allow_cpu_metrics:
            cpu = CpuSampler()
        if gpu is None and options.allow_gpu_metrics and gpus > 0:
            gpu = GpuSampler.create(gpus, nvml)
        self._cpu = cpu if options.allow_cpu_metrics else None
        self._gpu = gpu if options.allow_gpu_metrics else None
        samplers: list[Sampler] = [s for s in (self._cpu, self._gpu) if s is not None]
        self._sampler = SamplerThread(samplers, options.metrics_interval_ms) if samplers else None
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def render(self) -> str:
        return render(self._repository, cpu=self._cpu, gpu=self._gpu)

    @property
    def port(self) -> int:
        """The bound port (metrics_port 0 picks a free one); valid after `start`."""
        if self._http is None:
            raise RuntimeError("MetricsServer not started")
        return int(self._http.server_address[1])

    def start(self) -> None:
        """Bind first (so a port clash fails start-up loudly), then sample, then serve."""
        with self._lock:
            if self._http is not None:
                return
            address = (self._options.metrics_address, self._options.metrics_port)
            self._http = _HttpServer(address, self.render)
            if self._sampler is not None:
                self._sampler.start()
            self._thread = threading.Thread(
                target=self._http.serve_forever,
                kwargs={"poll_interval": 0.5},
                name="metrics-http",
                daemon=True,
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop serving, release the port, stop sampling. Safe to call twice."""
        with self._lock:
            http, thread = self._http, self._thread
            self._thread = None
            if http is not None and thread is not None:
                http.shutdown()
                http.server_close()
                thread.join()
            if self._sampler is not None:
                self._sampler.stop()
                self._sampler = None
