"""How every RPC is put on the gRPC server: raw bytes in, one error boundary, its own threads.

grpcio's threaded server has two habits a hostile client can use (docs/limits.md):
- Its deserializer path keeps ~15-19 KB per request that fails to parse and logs a traceback.
  So *every* method is registered with no deserializer and parses inside `_unary` /
  `_stream_requests`: garbage is INVALID_ARGUMENT `unable to parse the request: ...`, for
  inference, health and reflection alike.
- A call holds a pool thread for its whole life, streams included. So long-lived calls run on
  pools of their own (`experimental_thread_pool` on the handler function, which grpcio honours),
  each with an admission cap that answers RESOURCE_EXHAUSTED: ModelStreamInfer on the stream
  pool (`--grpc-max-streams`), reflection on a small pool, and the probes (ServerLive,
  ServerReady, grpc.health.v1 Check) on a probe pool, so neither open streams nor a saturated
  inference pool can make Kubernetes probes fail. Everything else uses the server's pool
  (`--grpc-worker-threads`).
At shutdown `Front.end_streams` ends every open stream (ours answer what they took first).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc
from tributary_client._proto._pool import POOL

from .constants import SHOWN_NAME_CHARS
from .dataplane import internal_error
from .errors import (
    InferenceError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    clip_message,
)
from .logs import RequestLog
from .restrict import Restriction, for_method
from .servicer import InferenceServicer

log = logging.getLogger("tributary.rpcs")

RAW_METHODS = ("ModelInfer", "ModelStreamInfer")
"""Handlers that take the request's bytes themselves (`tributary.wire`)."""
PROBES = ("ServerLive", "ServerReady")
PROBE_THREADS = 8
REFLECTION_STREAMS = 8
HEALTH_WATCHES = 1024
MAX_SERVICE_NAME = SHOWN_NAME_CHARS


class HealthService(health.HealthServicer):
    """grpcio's HealthServicer without its leak: it keeps a set of watchers per service name
    and never deletes an emptied one, so Watches on ever-new names (1 MB each, say) grew the
    server for good. The entry now goes with its last watcher."""

    def __init__(self) -> None:
        super().__init__(experimental_non_blocking=True)

    def _on_close_callback(self, send_response_callback: Any, service: str) -> Any:
        def callback() -> None:
            with self._lock:
                watchers = self._send_response_callbacks.get(service)
                if watchers is not None:
                    watchers.discard(send_response_callback)
                    if not watchers:
                        del self._send_response_callbacks[service]
            send_response_callback(None)

        return callback

    def watched_services(self) -> int:
        with self._lock:
            return len(self._send_response_callbacks)


class _Capture:
    """Stands in for a grpc.Server to collect a generated servicer's method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.service = service
        self.handlers = dict(handlers)


def _capture(add: Callable[[Any], None]) -> _Capture:
    capture = _Capture()
    add(capture)
    return capture


def _parse(parse: Callable[[bytes], Any] | None, data: bytes) -> Any:
    if parse is None:
        return data
    try:
        return parse(data)
    except (DecodeError, ValueError, TypeError, RuntimeError) as exc:
        raise InvalidArgument(f"unable to parse the request: {str(exc)[:200]}") from None


class LogSource(Protocol):
    """Where the request log is looked up per call: the data plane, whose `request_log` is
    set while --log-verbose (or LogSettings) asks for the per-request line, else None."""

    request_log: RequestLog | None


def _unary(
    name: str,
    fn: Callable[[Any, grpc.ServicerContext], Any],
    parse: Callable[[bytes], Any] | None,
    logs: LogSource | None = None,
) -> Callable[[bytes, grpc.ServicerContext], Any]:
    """The one error mapping of a unary RPC: parse, call, and map whatever is raised.
    With `logs`, each call also gets its line while the request log is on (one attribute
    check per call while it is off)."""
    plain = _plain_unary(name, fn, parse)
    if logs is None:
        return plain
    logged = _logged_unary(name, fn, parse)

    def handler(data: bytes, context: grpc.ServicerContext) -> Any:
        request_log = logs.request_log
        if request_log is None:
            return plain(data, context)
        return logged(data, context, request_log)

    handler.__name__ = name
    return handler


def _plain_unary(
    name: str,
    fn: Callable[[Any, grpc.ServicerContext], Any],
    parse: Callable[[bytes], Any] | None,
) -> Callable[[bytes, grpc.ServicerContext], Any]:
    def handler(data: bytes, context: grpc.ServicerContext) -> Any:
        # Only the code and text leave the except blocks: a kept exception would hold its
        # traceback, and with it this frame and the request's bytes, until a GC cycle.
        try:
            return fn(data if parse is None else _parse(parse, data), context)
        except InferenceError as exc:
            code, message = exc.code, exc.message
        except Exception as exc:  # a bug: keep serving, say where
            internal = internal_error(name, exc)
            code, message = internal.code, internal.message
        context.abort(code, clip_message(message))

    handler.__name__ = name
    return handler


def _restricted(
    name: str,
    handler: Callable[[Any, grpc.ServicerContext], Any],
    restriction: Restriction | None,
    logs: LogSource | None,
) -> Callable[[Any, grpc.ServicerContext], Any]:
    """`handler` behind --grpc-restricted-protocol: the header is checked before the request
    is parsed. Unrestricted methods keep their plain handler, so they pay nothing."""
    if restriction is None:
        return handler
    message = restriction.message

    def guarded(data: Any, context: grpc.ServicerContext, *more: Any) -> Any:
        if not restriction.allows(context):
            request_log = logs.request_log if logs is not None else None
            if request_log is not None:
                request_log.message(name, None, "UNAVAILABLE", time.perf_counter_ns())
            context.abort(grpc.StatusCode.UNAVAILABLE, message)
        return handler(data, context, *more)

    guarded.__name__ = name
    for attr in ("experimental_non_blocking",):
        if hasattr(handler, attr):
            setattr(guarded, attr, getattr(handler, attr))
    return guarded


def _logged_unary(
    name: str,
    fn: Callable[[Any, grpc.ServicerContext], Any],
    parse: Callable[[bytes], Any] | None,
) -> Callable[[bytes, grpc.ServicerContext, RequestLog], Any]:
    """`_unary`'s handler plus the request's line; a separate function so that the handler
    at --log-verbose=0 carries no trace of it."""

    def handler(data: bytes, context: grpc.ServicerContext, request_log: RequestLog) -> Any:
        start = time.perf_counter_ns()
        request = None
        try:
            request = data if parse is None else _parse(parse, data)
            reply = fn(request, context)
        except InferenceError as exc:
            code, message = exc.code, exc.message
        except Exception as exc:  # a bug: keep serving, say where
            internal = internal_error(name, exc)
            code, message = internal.code, internal.message
        else:
            request_log.message(name, request, "OK", start)
            return reply
        request_log.message(name, request, code.name, start)
        context.abort(code, clip_message(message))

    handler.__name__ = name
    return handler


def _on(pool: ThreadPoolExecutor | None, fn: Any) -> Any:
    if pool is not None:
        fn.experimental_thread_pool = pool
    return fn


class _StreamGate:
    """Admission for one kind of long-lived stream: a cap, and the contexts to end at exit."""

    def __init__(self, what: str, cap: int) -> None:
        self.what = what
        self.cap = cap
        self._lock = threading.Lock()
        self._open: set[grpc.ServicerContext] = set()
        self._closing = False

    def enter(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            if self._closing:
                raise Unavailable("Server exiting")
            if len(self._open) >= self.cap:
                raise ResourceExhausted(
                    f"too many open {self.what} streams: the server allows {self.cap}"
                )
            self._open.add(context)

    def leave(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._open.discard(context)

    def cancel_all(self) -> None:
        with self._lock:
            self._closing = True
            contexts = list(self._open)
        for context in contexts:
            context.cancel()


@dataclass
class Front:
    """The pools and gates of one gRPC server, for `app.Server.stop`."""

    servicer: InferenceServicer
    pools: list[ThreadPoolExecutor] = field(default_factory=list)
    gates: list[_StreamGate] = field(default_factory=list)

    def end_streams(self) -> None:
        """Shutdown (after health went NOT_SERVING): inference streams answer what they took,
        then end; reflection streams and health Watches are cancelled."""
        self.servicer.streams.close_all()
        for gate in self.gates:
            gate.cancel_all()

    def shutdown(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=False)


def _inference(
    server: grpc.Server,
    servicer: InferenceServicer,
    streams: ThreadPoolExecutor,
    probes: Any,
    log: LogSource | None,
    restricted: Mapping[str, Restriction],
) -> None:
    cap = _capture(lambda c: pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, c))
    handlers = cap.handlers
    for name, h in list(handlers.items()):
        if h.unary_unary is None:
            continue
        parse = None if name in RAW_METHODS else h.request_deserializer
        serializer = None if name in RAW_METHODS else h.response_serializer
        # ModelInfer writes its own line (the servicer parses it); the others get it here.
        fn = _unary(name, getattr(servicer, name), parse, None if name in RAW_METHODS else log)
        fn = _restricted(name, fn, for_method(restricted, name), log)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            _on(probes if name in PROBES else None, fn), response_serializer=serializer
        )

    def stream(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        try:
            yield from servicer.ModelStreamInfer(request_iterator, context)
            return
        except InferenceError as exc:  # refused at admission
            code, message = exc.code, exc.message
        except Exception as exc:  # a bug (per-request errors never get here): say where
            internal = internal_error("ModelStreamInfer", exc)
            code, message = internal.code, internal.message
        context.abort(code, clip_message(message))

    guarded = _restricted(
        "ModelStreamInfer", stream, for_method(restricted, "ModelStreamInfer"), log
    )
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(_on(streams, guarded))
    _add(server, cap.service, handlers)


def _health(
    server: grpc.Server,
    servicer: health.HealthServicer,
    probes: Any,
    watches: _StreamGate,
    log: LogSource | None,
    restriction: Restriction | None,
) -> None:
    cap = _capture(lambda c: health_pb2_grpc.add_HealthServicer_to_server(servicer, c))
    check = cap.handlers["Check"]
    watch = cap.handlers["Watch"]
    cap.handlers["Check"] = grpc.unary_unary_rpc_method_handler(
        _on(
            probes,
            _restricted(
                "Check",
                _unary("Check", servicer.Check, check.request_deserializer, log),
                restriction,
                log,
            ),
        ),
        response_serializer=check.response_serializer,
    )
    parse_watch = watch.request_deserializer

    def watch_fn(
        data: bytes, context: grpc.ServicerContext, send_response_callback: Any = None
    ) -> Any:
        try:
            request = _parse(parse_watch, data)
            if len(request.service) > MAX_SERVICE_NAME:
                raise InvalidArgument(f"service name longer than {MAX_SERVICE_NAME} characters")
            watches.enter(context)
        except InferenceError as exc:
            context.abort(exc.code, exc.message)
        if not context.add_callback(lambda: watches.leave(context)):
            watches.leave(context)
        return servicer.Watch(request, context, send_response_callback)

    # Watch holds no thread while it waits (grpcio's non-blocking mode, which HealthServicer
    # was built with); it starts on the probe pool, so a busy unary pool cannot delay it.
    watch_fn.experimental_non_blocking = True  # type: ignore[attr-defined]
    cap.handlers["Watch"] = grpc.unary_stream_rpc_method_handler(
        _on(probes, _restricted("Watch", watch_fn, restriction, log)),
        response_serializer=watch.response_serializer,
    )
    _add(server, cap.service, cap.handlers)


def _stream_requests(
    request_iterator: Iterator[bytes], parse: Callable[[bytes], Any]
) -> Iterator[Any]:
    for data in request_iterator:
        yield _parse(parse, data)


def _reflection(
    server: grpc.Server, names: tuple[str, ...], pool: ThreadPoolExecutor, gate: _StreamGate
) -> None:
    cap = _capture(lambda c: reflection.enable_server_reflection(names, c, pool=POOL))
    info = cap.handlers["ServerReflectionInfo"]
    parse = info.request_deserializer
    serve = info.stream_stream  # the ReflectionServicer's own method
    assert parse is not None and serve is not None

    def reflect(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        try:
            gate.enter(context)
        except InferenceError as exc:
            context.abort(exc.code, exc.message)
        try:
            yield from serve(_stream_requests(request_iterator, parse), context)
        except InferenceError as exc:
            code, message = exc.code, exc.message
        else:
            return
        finally:
            gate.leave(context)
        context.abort(code, message)

    cap.handlers["ServerReflectionInfo"] = grpc.stream_stream_rpc_method_handler(
        _on(pool, reflect), response_serializer=info.response_serializer
    )
    _add(server, cap.service, cap.handlers)
    # grpc.reflection.v1: the same messages under another package, so the same bytes.
    _add(server, "grpc.reflection.v1.ServerReflection", dict(cap.handlers))


def _add(
    server: grpc.Server, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    # grpcio >= 1.62 API; the grpc-stubs package (last release 1.53) does not know it yet.
    server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]


def register(
    server: grpc.Server,
    servicer: InferenceServicer,
    health_servicer: health.HealthServicer,
    *,
    reflected: tuple[str, ...],
    max_streams: int,
    request_log: LogSource | None = None,
    restricted: Mapping[str, Restriction] | None = None,
) -> Front:
    """Put inference, health and reflection on `server`; see the module docstring."""
    # A few spare threads per pool answer RESOURCE_EXHAUSTED beyond each cap.
    streams = ThreadPoolExecutor(max_streams + 8, thread_name_prefix="grpc-stream")
    probes = ThreadPoolExecutor(PROBE_THREADS, thread_name_prefix="grpc-probe")
    reflect_pool = ThreadPoolExecutor(REFLECTION_STREAMS + 4, thread_name_prefix="grpc-reflect")
    gate = _StreamGate("reflection", REFLECTION_STREAMS)
    watches = _StreamGate("health Watch", HEALTH_WATCHES)
    restricted = restricted or {}
    _inference(server, servicer, streams, probes, request_log, restricted)
    _health(server, health_servicer, probes, watches, request_log, for_method(restricted, "Check"))
    if reflected:  # --allow-grpc-reflection
        _reflection(server, reflected, reflect_pool, gate)
    return Front(servicer, [streams, probes, reflect_pool], [gate, watches])
