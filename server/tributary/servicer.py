"""RPC handlers for inference.GRPCInferenceService: thin, behind one error boundary.

`tributary.rpcs` puts these handlers on the server behind one error boundary per unary RPC;
streamed requests are answered through `_Stream`, each exactly once whatever is raised. An
`InferenceError` becomes its status code and message; anything else is our bug, logged once
with its traceback and a reference number (`internal_error`) and answered INTERNAL with that
reference, never a hang or UNKNOWN. Messages are clipped (`errors.clip_message`) so an echoed
name can never push the status past gRPC's metadata limit.

ModelInfer and ModelStreamInfer take the request's bytes: `tributary.wire` parses them, so
undecodable requests are INVALID_ARGUMENT and tensor payloads are never copied by protobuf.
Streams are admitted up to `--grpc-max-streams`; each has at most `--grpc-stream-max-pending`
replies outstanding before the server stops reading its requests (HTTP/2 flow control then
holds the client). A stream leaves the count the moment its RPC ends (a cancelled stream does
not wait for its in-flight work), and at shutdown every open stream answers what it took,
then ends. See docs/limits.md.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc

from . import __version__, memory
from .codec import decode_request, encode_response
from .control import ModelControl
from .errors import (
    Cancelled,
    InferenceError,
    Internal,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    clip_message,
)
from .repository import ModelRepository
from .wire import infer_response_bytes, split_request, stream_response_bytes

log = logging.getLogger("tributary.servicer")

EXTENSIONS = (
    "classification",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "statistics",
)

_refs = itertools.count(1)


def internal_error(where: str, exc: BaseException, request_id: str = "") -> Internal:
    """Log a bug once, with a reference the client is given instead of our internals."""
    ref = next(_refs)
    log.error("internal error %d in %s (request id %r)", ref, where, request_id[:128], exc_info=exc)
    return Internal(f"internal error in {where}: {type(exc).__name__} (server log reference {ref})")


@dataclass
class ServerState:
    """What health/readiness depend on besides the models; flipped by the composition root."""

    server_id: str = "tributary"
    strict_readiness: bool = True
    max_tensor_bytes: int = 2**31 - 1
    model_control_mode: str = "none"
    max_streams: int = 512
    stream_max_pending: int = 256
    exiting: bool = False
    # called after a model is loaded or unloaded at run time (health follows readiness)
    listeners: list[Callable[[], None]] = field(default_factory=list)


class _Slot:
    """One streamed request's place in the response order: the serialized reply, once known."""

    __slots__ = ("_done", "_response")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._response = b""

    def succeed(self, head: Any, raws: list[object]) -> None:
        head.parameters["triton_final_response"].bool_param = True
        self._response = stream_response_bytes(head, raws)
        self._done.set()

    def fail(self, exc: InferenceError, request: Any = None) -> None:
        reply = pb.ModelStreamInferResponse(error_message=clip_message(exc.message))
        if request is not None:
            reply.infer_response.id = request.id
            reply.infer_response.model_name = request.model_name
            reply.infer_response.model_version = request.model_version
        reply.infer_response.parameters["triton_final_response"].bool_param = True
        self._response = reply.SerializeToString()
        self._done.set()

    def wait(self, timeout: float) -> bytes | None:
        """The reply, or None if it is not ready within `timeout` seconds."""
        return self._response if self._done.wait(timeout) else None


def _no_callback(_fn: Callable[[], None]) -> None:
    """Streams trim when a large request arrives only (their replies have no end callback)."""


_CLOSE = object()
"""Put in a stream's queue at shutdown: answer what came before it, then end the stream."""


class _Stream:
    """One open ModelStreamInfer: replies in request order and a window of pending ones."""

    def __init__(self, max_pending: int) -> None:
        self.replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.room = threading.Semaphore(max_pending)
        self.closed = threading.Event()  # stop reading requests (shutdown, or the RPC ended)
        self.ended = threading.Event()  # the RPC is over: nobody will read another reply

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.replies.put(_CLOSE)

    def wait_for_room(self) -> bool:
        """Block while the client has `max_pending` replies outstanding; False once closed."""
        while not self.room.acquire(timeout=0.25):
            if self.closed.is_set():
                return False
        return not self.closed.is_set()


def server_ready(repo: ModelRepository, state: ServerState) -> bool:
    """ServerReady, health Check and Watch all answer this one question."""
    if state.exiting:
        return False
    return repo.is_ready() if state.strict_readiness else True


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, Cancelled):
        return "CANCELED"
    if isinstance(exc, Unavailable):
        return "REJECTED"
    if isinstance(exc, InferenceError) and exc.code == grpc.StatusCode.INTERNAL:
        return "BACKEND"
    return "OTHER"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, state: ServerState) -> None:
        self.repo = repository
        self.state = state
        self.control = ModelControl(
            repository, explicit=state.model_control_mode == "explicit", on_change=self._changed
        )
        self._streams: set[_Stream] = set()
        self._streams_lock = threading.Lock()

    def _changed(self) -> None:
        for listener in self.state.listeners:
            listener()

    # ---- health and metadata -------------------------------------------------------------
    def is_ready(self) -> bool:
        return server_ready(self.repo, self.state)

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=not self.state.exiting)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.is_ready())

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        ready = not self.state.exiting and self.repo.is_model_ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(
            name=self.state.server_id, version=__version__, extensions=EXTENSIONS
        )

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.version:
            models = [self.repo.resolve(request.name, request.version)]
        else:
            models = self.repo.ready_versions(request.name) or [
                self.repo.resolve(request.name, "")  # raises "has no available versions"
            ]
        sig = models[-1].signature
        batch = [-1] if sig.max_batch_size > 0 else []
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=[str(m.version) for m in models],
            platform=sig.platform,
            inputs=[
                meta(name=t.name, datatype=t.dtype.name, shape=batch + list(t.dims))
                for t in sig.inputs
            ],
            outputs=[
                meta(name=t.name, datatype=t.dtype.name, shape=batch + list(t.dims))
                for t in sig.outputs
            ],
        )

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self.repo.resolve(request.name, request.version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(model.config)
        return response

    # ---- inference -----------------------------------------------------------------------
    def ModelInfer(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        """Registered on raw bytes (see `register`): parse, infer, assemble the reply."""
        if len(data) >= memory.LARGE_REQUEST_BYTES:
            memory.large_request(len(data), context.add_callback)
        request, raws = split_request(data)
        head, outputs = self._infer(request, raws, context.is_active)
        return infer_response_bytes(head, outputs)

    def _infer(
        self, request: Any, raws: Sequence[bytes | memoryview], is_active: Callable[[], bool] | None
    ) -> tuple[Any, list[object]]:
        model, decoded, start = self._begin(request, raws, is_active)
        try:
            results = model.scheduler.infer(decoded.item)
        except BaseException as exc:
            self._failed(model, decoded, start, exc)
            raise
        return self._finish(request, model, decoded, start, results)

    def _begin(
        self, request: Any, raws: Sequence[bytes | memoryview], is_active: Callable[[], bool] | None
    ) -> tuple[Any, Any, int]:
        """Resolve the model and validate the request (a failure here counts as OTHER)."""
        start = time.perf_counter_ns()
        if self.state.exiting:
            raise Unavailable("Server exiting")
        model = self.repo.resolve(request.model_name, request.model_version)
        try:
            decoded = decode_request(
                request,
                model.signature,
                max_tensor_bytes=self.state.max_tensor_bytes,
                is_active=is_active,
                raw=raws,
            )
        except BaseException as exc:
            self._failed(model, None, start, exc)
            raise
        return model, decoded, start

    def _failed(self, model: Any, decoded: Any, start: int, exc: BaseException) -> None:
        reason = decoded.item.failure_reason if decoded is not None else ""
        model.stats.request_failure(
            total_ns=time.perf_counter_ns() - start, reason=reason or _failure_reason(exc)
        )

    def _finish(
        self, request: Any, model: Any, decoded: Any, start: int, results: Any
    ) -> tuple[Any, list[object]]:
        """Encode the response and record the request's statistics."""
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(model.version), id=request.id
        )
        try:
            raws = encode_response(response, decoded, results, model.name)
        except BaseException as exc:
            self._failed(model, decoded, start, exc)
            raise
        item = decoded.item
        model.stats.request_success(
            total_ns=time.perf_counter_ns() - start,
            queue_ns=item.queue_ns,
            compute_input_ns=item.compute_input_ns,
            compute_infer_ns=item.compute_infer_ns,
            compute_output_ns=item.compute_output_ns,
            rows=item.rows,
            now_ms=time.time_ns() // 1_000_000,
        )
        return response, raws

    def ModelStreamInfer(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Bidirectional stream: requests run concurrently, replies go out in request order.

        A per-request error does not end the stream: it is answered with `error_message` and
        the request id (PROTOCOL.md §2.7). Every reply carries triton_final_response=true.
        Runs on the stream pool (see `register`); a reader thread takes requests while this
        generator writes replies.
        """
        stream = self._admit(context)
        ended_by_server = False
        try:
            reader = threading.Thread(
                target=self._read_stream,
                args=(stream, request_iterator, context.is_active),
                name="stream-reader",
                daemon=True,
            )
            try:
                reader.start()
            except RuntimeError as exc:  # the process is out of threads
                raise ResourceExhausted(f"cannot serve another stream now: {exc}") from None
            while (slot := stream.replies.get()) is not None:
                if slot is _CLOSE:
                    ended_by_server = True
                    break
                while (data := slot.wait(0.25)) is None:
                    if stream.ended.is_set():  # the client left: its work finishes unread
                        return
                yield data
                stream.room.release()
        finally:
            self._forget(stream)
        if ended_by_server:
            raise Unavailable("Server exiting")  # tributary.rpcs answers it

    def _forget(self, stream: _Stream) -> None:
        with self._streams_lock:
            self._streams.discard(stream)
        stream.closed.set()
        stream.ended.set()

    def _admit(self, context: grpc.ServicerContext) -> _Stream:
        """Count a new stream, or refuse it. A handler that grpcio ran after its call ended
        (it waited for a pool thread) is not counted at all."""
        stream = self._register()
        if not context.is_active() or not context.add_callback(lambda: self._forget(stream)):
            self._forget(stream)
            raise Cancelled("the stream ended before it was served")
        return stream

    def _register(self) -> _Stream:
        with self._streams_lock:
            if self.state.exiting:
                raise Unavailable("Server exiting")
            if len(self._streams) >= self.state.max_streams:
                raise ResourceExhausted(
                    f"too many open ModelStreamInfer streams: the server allows "
                    f"{self.state.max_streams} (--grpc-max-streams)"
                )
            stream = _Stream(self.state.stream_max_pending)
            self._streams.add(stream)
            return stream

    def _read_stream(
        self, stream: _Stream, request_iterator: Iterator[bytes], is_active: Callable[[], bool]
    ) -> None:
        try:
            for data in request_iterator:
                if not stream.wait_for_room():
                    break
                memory.large_request(len(data), _no_callback)
                slot = _Slot()
                stream.replies.put(slot)
                self._stream_one(data, slot, is_active)
        except Exception:  # noqa: BLE001 - client went away mid-stream
            log.debug("stream reader ended", exc_info=True)
        finally:
            stream.replies.put(None)

    def _stream_one(self, data: bytes, slot: _Slot, is_active: Callable[[], bool]) -> None:
        """Start one streamed request; whatever happens, `slot` is answered exactly once."""
        request = None
        try:
            request, raws = split_request(data)
            model, decoded, start = self._begin(request, raws, is_active)
        except InferenceError as exc:
            slot.fail(exc, request)
            return
        except Exception as exc:
            slot.fail(internal_error("ModelStreamInfer", exc, getattr(request, "id", "")), request)
            return

        def done(results: Any, error: InferenceError | None) -> None:
            try:
                if error is not None:
                    self._failed(model, decoded, start, error)
                    slot.fail(error, request)
                    return
                slot.succeed(*self._finish(request, model, decoded, start, results))
            except InferenceError as exc:
                slot.fail(exc, request)
            except Exception as exc:
                slot.fail(internal_error("ModelStreamInfer", exc, request.id), request)

        try:
            model.scheduler.submit(decoded.item, done)
        except Exception as exc:  # submit reports refusals through `done`; this is a bug
            slot.fail(internal_error("ModelStreamInfer", exc, request.id), request)

    def close_streams(self) -> None:
        """Shutdown: every open stream answers what it already took, then ends (UNAVAILABLE)."""
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.close()

    def open_streams(self) -> int:
        with self._streams_lock:
            return len(self._streams)

    # ---- statistics and repository ---------------------------------------------------------
    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        from .statistics import statistics_response

        return statistics_response(self.repo, request.name, request.version)

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.repository_name:
            raise Unimplemented("'repository_name' specification is not supported")
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                entry(name=e.name, version=e.version, state=e.state, reason=e.reason)
                for e in self.repo.index(ready_only=request.ready)
            ]
        )

    def RepositoryModelLoad(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.control.load(request)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.control.unload(request)
        return pb.RepositoryModelUnloadResponse()


def _unimplemented(name: str, what: str) -> Callable[..., Any]:
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented(f"{name} is not implemented by this server: {what}")

    handler.__name__ = name
    return handler


for _name, _what in {
    "SystemSharedMemoryStatus": "client shared memory is not supported",
    "SystemSharedMemoryRegister": "client shared memory is not supported",
    "SystemSharedMemoryUnregister": "client shared memory is not supported",
    "CudaSharedMemoryStatus": "CUDA shared memory is not supported",
    "CudaSharedMemoryRegister": "CUDA shared memory is not supported",
    "CudaSharedMemoryUnregister": "CUDA shared memory is not supported",
    "TraceSetting": "tracing is not supported",
    "LogSettings": "use --log-verbose at start-up",
}.items():
    setattr(InferenceServicer, _name, _unimplemented(_name, _what))
