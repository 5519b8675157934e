"""Request tracing: which requests to trace, and their spans (or Triton's JSON trace file).

Cost first. Tracing is off by default, and then the data plane pays one attribute check per
request (`Tracer.enabled`, folded into the data plane's own). When it is on, a request is
sampled at its start (`tributary.tracesettings`); an untraced request pays that decision
only. A traced one is recorded when it is answered, from timestamps taken anyway: the
tracer's start and end, and the scheduler's `WorkItem` (queue and compute starts and
durations, on the monotonic clock, the scheduler's default, converted once to wall-clock
time). `finish` only copies those numbers onto a bounded queue; the tracer's own thread
builds the spans. No span is open while the request crosses threads, and no span is built
on a request's or a model instance's thread.

Spans (mode opentelemetry), with Triton's names where it has them:
- `InferRequest` (kind SERVER): the whole request in the data plane; its parent is the
  client's W3C `traceparent` (and `tracestate`) when one was sent. Attributes
  `triton.model_name`, `triton.model_version`, `triton.request_id`, `tributary.rpc`,
  `tributary.status` (OK or the error's status name), `tributary.rows` (the request's rows);
  error status with its message.
  - `queue`: joining the model's queue to the start of its execution;
  - `compute`: the execution (`tributary.batch_rows`: rows of the whole batch it ran in),
    with events `COMPUTE_INPUT_END` and `COMPUTE_OUTPUT_START` (Triton's timestamp names).
At level TENSORS the request span also carries `tributary.inputs` / `tributary.outputs`: one
"name datatype [shape]" string per tensor, never tensor data.

Spans go to an OTLP/gRPC receiver through the OpenTelemetry SDK's batch span processor;
`shutdown` flushes it, bounded in time even when the receiver is gone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tributary_client._proto import grpc_service_pb2 as pb

from .constants import SHOWN_NAME_CHARS
from .errors import InferenceError
from .scheduler.batchqueue import WorkItem
from .text import clipped
from .traceconfig import OPENTELEMETRY, TENSORS, TRITON, TraceConfig
from .tracefile import TritonFile
from .tracesettings import Setting, TraceSettings

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("tributary.tracing")

MAX_NAME_CHARS = SHOWN_NAME_CHARS
"""Client-sent names (model, request id, tensors) are cut to this in attributes."""
MAX_TENSORS = 64
"""At most this many tensors are listed per request at level TENSORS."""
SHUTDOWN_TIMEOUT_S = 5.0
EXPORT_TIMEOUT_S = 5.0


MAX_TRACE_HEADER_CHARS = 1024
"""W3C: a traceparent is 55 characters, a tracestate at most 32 members; longer is not one."""
QUIET_LOGGERS = ("opentelemetry.trace.propagation.tracecontext", "opentelemetry.trace.span")
"""OpenTelemetry loggers whose warnings are about client input, kept to errors."""


class Trace:
    """One sampled request, between `Tracer.start` and `Tracer.finish`."""

    __slots__ = (
        "setting",
        "model",
        "request_id",
        "rpc",
        "start_ns",
        "parent",
        "inputs",
        "version",
        "item",
    )

    def __init__(
        self, setting: Setting, model: str, request_id: str, rpc: str, parent: Context | None
    ) -> None:
        self.setting = setting
        self.model = model
        self.request_id = request_id
        self.rpc = rpc
        self.parent = parent
        self.inputs: list[str] = []
        self.start_ns = time.monotonic_ns()
        # set by the data plane once the model version resolved and the request decoded
        self.version = ""
        self.item: WorkItem | None = None


class Record(NamedTuple):
    """What a finished trace needs, copied off the request (the WorkItem holds its tensors,
    which must not live on while the record waits for the span thread)."""

    trace: Trace
    end_ns: int
    version: str
    timings: tuple[int, int, int, int, int, int, int] | None  # see `_timings`
    error: BaseException | None
    outputs: list[str]


def _timings(item: WorkItem | None) -> tuple[int, int, int, int, int, int, int] | None:
    """(queue start, compute start, input, infer, output, rows, batch rows), or None when the
    request never reached the scheduler's queue."""
    if item is None or not item.queue_start_ns:
        return None
    return (
        item.queue_start_ns,
        item.compute_start_ns,
        item.compute_input_ns,
        item.compute_infer_ns,
        item.compute_output_ns,
        item.rows,
        item.batch_rows,
    )


def tensor_line(name: str, datatype: str, shape: Sequence[int]) -> str:
    return f"{clipped(name, MAX_NAME_CHARS)} {datatype[:16]} [{','.join(map(str, shape[:32]))}]"


class Tracer:
    """Asked by the data plane at each request's start (`start`, None: not traced) and end
    (`finish`). Settings change at run time through `settings` (the TraceSetting RPC)."""

    def __init__(self, config: TraceConfig, *, exporter: SpanExporter | None = None) -> None:
        self.config = config
        self._settings = TraceSettings(config)
        self._otel: _Otel | None = None
        self._file: TritonFile | None = None
        if config.mode == OPENTELEMETRY:
            self._otel = _Otel(config, exporter)
        elif config.file:
            self._file = TritonFile(Path(config.file))
        self.enabled = False
        self.dropped = 0
        self._records: queue.Queue[Record | None] = queue.Queue(config.bsp_max_queue_size)
        # Only a server that can trace has the thread: mode triton without a file never can.
        self._writer: threading.Thread | None = None
        if self._otel is not None or self._file is not None:
            self._writer = threading.Thread(target=self._write, name="trace-spans", daemon=True)
            self._writer.start()
        self._refresh()

    def _refresh(self) -> None:
        self.enabled = self._writer is not None and self._settings.active

    # -- per request ---------------------------------------------------------------------

    def start(
        self,
        model: str,
        request_id: str,
        carrier: Mapping[str, str] | None,
        rpc: str,
        request: pb.ModelInferRequest | None = None,
    ) -> Trace | None:
        """Sample this request: a `Trace` to `finish` when it is answered, or None."""
        setting = self._settings.get(model)
        if not setting.level:
            return None
        parent = None
        if carrier and self._otel is not None:
            parent = self._otel.extract(carrier)
        if not setting.sample(parent is not None):
            return None
        trace = Trace(
            setting,
            clipped(model, MAX_NAME_CHARS),
            clipped(request_id, MAX_NAME_CHARS),
            rpc,
            parent,
        )
        if TENSORS in setting.level and request is not None:
            trace.inputs = [
                tensor_line(t.name, t.datatype, t.shape) for t in request.inputs[:MAX_TENSORS]
            ]
        return trace

    def finish(
        self,
        trace: Trace,
        *,
        error: BaseException | None = None,
        response: pb.ModelInferResponse | None = None,
    ) -> None:
        """`trace`'s request is answered: copy what its spans need and hand it to the span
        thread (the request's thread only pays the copy). Never raises; when the span thread
        is `bsp_max_queue_size` traces behind, the trace is dropped, as the SDK drops spans."""
        outputs = []
        if response is not None and TENSORS in trace.setting.level:
            outputs = [
                tensor_line(t.name, t.datatype, t.shape) for t in response.outputs[:MAX_TENSORS]
            ]
        record = Record(
            trace, time.monotonic_ns(), trace.version, _timings(trace.item), error, outputs
        )
        trace.item = None
        try:
            self._records.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.dropped % 10_000 == 1:  # the first, then one line per 10,000
                log.warning(
                    "tracing falls behind: %d trace(s) dropped so far (queue of %d full)",
                    self.dropped,
                    self.config.bsp_max_queue_size,
                )

    def _write(self) -> None:
        """The span thread: builds spans (or file entries) from finished traces."""
        while (record := self._records.get()) is not None:
            try:
                if self._otel is not None:
                    self._otel.emit(record)
                elif self._file is not None:
                    self._file.add(record)
            except Exception:
                log.exception("could not record the trace of a %s request", record.trace.rpc)

    # -- settings and lifetime -----------------------------------------------------------

    def settings(
        self, model: str, update: Mapping[str, Sequence[str] | None] | None
    ) -> dict[str, list[str]]:
        """TraceSetting: apply `update` (None or empty: read only) to `model`'s setting ("" =
        global) and answer the settings now in force. The caller checks that `model` is
        ready. Raises InvalidArgument / Unimplemented with Triton's texts."""
        if update:
            self._settings.update(model, update)
            self._refresh()
        return self._settings.response(model)

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Flush what is buffered (spans to the receiver, traces to the file), waiting at most
        `timeout_s`: a receiver that is gone costs that, never a hang."""
        if self._writer is None:
            return
        deadline = time.monotonic() + timeout_s
        try:
            self._records.put(None, timeout=timeout_s)  # after every record already queued
        except queue.Full:
            log.warning("trace queue still full at shutdown; traces may be lost")
            return
        self._writer.join(max(0.0, deadline - time.monotonic()))
        timeout_s = max(0.0, deadline - time.monotonic())
        if self._file is not None:
            self._file.close()
        if self._otel is not None:
            self._otel.shutdown(timeout_s)


# -- OpenTelemetry ------------------------------------------------------------------------------


class _Otel:
    """A private TracerProvider (never the global one) with one batch span processor and the
    OTLP/gRPC exporter. The SDK is imported only in this mode."""

    def __init__(self, config: TraceConfig, exporter: SpanExporter | None) -> None:
        from opentelemetry import trace as api
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        from opentelemetry.trace.status import Status, StatusCode

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            url = config.url
            exporter = OTLPSpanExporter(
                endpoint=url, insecure=not url.startswith("https://"), timeout=EXPORT_TIMEOUT_S
            )
            if url.endswith("/v1/traces"):
                log.warning(
                    "--trace-config opentelemetry,url=%s looks like an OTLP/HTTP address; "
                    "Tributary exports OTLP over gRPC (host:port, usually port 4317)",
                    url,
                )
        attributes: dict[str, str] = {"service.name": "tributary"}
        attributes.update(dict(config.resource))
        self._provider = TracerProvider(
            resource=Resource.create(attributes), sampler=ALWAYS_ON, shutdown_on_exit=False
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=config.bsp_max_queue_size,
                schedule_delay_millis=config.bsp_schedule_delay,
                max_export_batch_size=config.bsp_max_export_batch_size,
            )
        )
        self._tracer = self._provider.get_tracer("tributary")
        self._api = api
        self._propagator = TraceContextTextMapPropagator()
        # These two warn about what a client sent (a traceparent over 512 characters, a bad
        # or duplicate tracestate member), once per request: a client could fill the log.
        # Such headers are treated as absent (docs/limits.md#tracing); errors still show.
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        self._server = api.SpanKind.SERVER
        self._status = Status
        self._error_code = StatusCode.ERROR

    def extract(self, carrier: Mapping[str, str]) -> Context | None:
        """The client's span context, when it sent a valid traceparent. Headers longer than
        MAX_TRACE_HEADER_CHARS (from either front end) are not W3C headers: ignored before
        they are parsed."""
        carrier = {k: v for k, v in carrier.items() if len(v) <= MAX_TRACE_HEADER_CHARS}
        ctx = self._propagator.extract(carrier)
        if not self._api.get_current_span(ctx).get_span_context().is_valid:
            return None
        return ctx

    def emit(self, record: Record) -> None:
        """Three spans at most: the request, and under it queue and compute. (Each span costs
        tens of microseconds of SDK and exporter work, so there is no span per model.)"""
        trace, end_ns, version, timings, error, outputs = record
        offset = time.time_ns() - time.monotonic_ns()
        tracer = self._tracer
        attributes: dict[str, Any] = {
            "triton.model_name": trace.model,
            "triton.model_version": version,
            "tributary.rpc": trace.rpc,
        }
        if trace.request_id:
            attributes["triton.request_id"] = trace.request_id
        if error is None:
            attributes["tributary.status"] = "OK"
        else:
            code = error.code.name if isinstance(error, InferenceError) else "INTERNAL"
            attributes["tributary.status"] = code
        if timings is not None:
            attributes["tributary.rows"] = timings[5]
        if trace.inputs:
            attributes["tributary.inputs"] = trace.inputs
        if outputs:
            attributes["tributary.outputs"] = outputs
        root = tracer.start_span(
            "InferRequest",
            context=trace.parent,
            kind=self._server,
            start_time=trace.start_ns + offset,
            attributes=attributes,
        )
        if error is not None:
            root.set_status(self._status(self._error_code, clipped(str(error), 1024)))
        if timings is not None:
            queued, computed, t_input, t_infer, t_output, _, batch_rows = timings
            inside = self._api.set_span_in_context(root)
            queue = tracer.start_span("queue", context=inside, start_time=queued + offset)
            queue.end(end_time=(computed or end_ns) + offset)
            if computed:
                compute = tracer.start_span(
                    "compute",
                    context=inside,
                    start_time=computed + offset,
                    attributes={"tributary.batch_rows": batch_rows},
                )
                at = computed + offset + t_input
                compute.add_event("COMPUTE_INPUT_END", timestamp=at)
                compute.add_event("COMPUTE_OUTPUT_START", timestamp=at + t_infer)
                compute.end(end_time=computed + t_input + t_infer + t_output + offset)
        root.end(end_time=end_ns + offset)

    def shutdown(self, timeout_s: float) -> None:
        """The SDK's shutdown waits for the last export; run it on a daemon thread so a
        receiver that does not answer costs at most `timeout_s` (the exporter's own timeout
        ends that export soon after)."""
        worker = threading.Thread(target=self._provider.shutdown, name="trace-flush", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            log.warning("trace export did not finish within %.0fs; spans may be lost", timeout_s)


__all__ = ["TRITON", "OPENTELEMETRY", "Trace", "TraceConfig", "Tracer"]
