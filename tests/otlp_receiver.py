"""A real OTLP/gRPC trace receiver for tests: `TraceService/Export` from the published
opentelemetry-proto stubs, on a free loopback port. It keeps what it receives, decoded into
plain `Span` records, and lets a test wait (by polling a condition, never sleeping) for spans.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_SERVER
STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.StatusCode.STATUS_CODE_ERROR


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: dict[str, int]
    status_code: int
    status_message: str
    resource: dict[str, Any] = field(default_factory=dict)
    trace_state: str = ""


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.spans: list[Span] = []
        self.exports = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def Export(  # noqa: N802 - the RPC's name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        got: list[Span] = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            kind=s.kind,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            events={e.name: e.time_unix_nano for e in s.events},
                            status_code=s.status.code,
                            status_message=s.status.message,
                            resource=resource,
                            trace_state=s.trace_state,
                        )
                    )
        with self._cond:
            self.spans += got
            self.exports += 1
            self._cond.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, done: Callable[[list[Span]], bool], timeout: float = 30.0) -> list[Span]:
        """All spans received once `done(spans)` holds; fails the test after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done(self.spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = [(s.name, s.attributes.get("triton.request_id")) for s in self.spans]
                    raise AssertionError(f"spans not received within {timeout}s; got {names}")
                self._cond.wait(left)
            return list(self.spans)

    def roots(self, spans: list[Span] | None = None) -> list[Span]:
        return [s for s in (self.spans if spans is None else spans) if s.name == "InferRequest"]

    def clear(self) -> None:
        with self._cond:
            self.spans.clear()

    def stop(self) -> None:
        self._server.stop(0).wait()


def tree(spans: list[Span], root: Span) -> dict[str, Span]:
    """`root` and its descendants, by name (one request's spans)."""
    out = {root.name: root}
    frontier = [root.span_id]
    while frontier:
        parent = frontier.pop()
        for s in spans:
            if s.parent_id == parent and s.trace_id == root.trace_id:
                out[s.name] = s
                frontier.append(s.span_id)
    return out
