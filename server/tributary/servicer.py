"""RPC handlers for inference.GRPCInferenceService: thin, behind one error boundary.

`tributary.rpcs` puts these handlers on the server behind one error boundary per unary RPC;
each streamed request is answered through its `streams.Slot`, exactly once whatever is
raised. An `InferenceError` becomes its status code and message; anything else is our bug,
logged once with its traceback and a reference number (`internal_error`) and answered
INTERNAL with that reference, never a hang or UNKNOWN. Messages are clipped
(`errors.clip_message`) so an echoed name can never push the status past gRPC's metadata
limit.

ModelInfer and ModelStreamInfer take the request's bytes: `tributary.wire` parses them, so
undecodable requests are INVALID_ARGUMENT and tensor payloads are never copied by protobuf.
Stream admission, ordering, flow control and shutdown live in `tributary.streams`. See
docs/limits.md.
"""

from __future__ import annotations

import itertools
import logging
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
    Unavailable,
    Unimplemented,
)
from .logs import RequestLog
from .repository import ModelRepository
from .scheduler import Closed
from .shm import SharedMemory
from .streams import Slot, Streams
from .wire import infer_response_bytes, split_request

log = logging.getLogger("tributary.servicer")

REROUTES = 2
"""Times a request whose version was retired under it (reload, unload) is routed again."""

EXTENSIONS = (
    "classification",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "statistics",
)
SHM_EXTENSIONS = ("system_shared_memory", "cuda_shared_memory")
"""Listed when --allow-client-shm=true, as tritonserver lists both (CUDA regions are refused
on registration with its CPU-only text, docs/protocol.md#shared-memory)."""

_refs = itertools.count(1)


def internal_error(where: str, exc: BaseException, request_id: str = "") -> Internal:
    """Log a bug once, with a reference the client is given instead of our internals."""
    ref = next(_refs)
    log.error(
        "internal error %d in %s (request id %r)",
        ref,
        where,
        request_id[:128],
        exc_info=exc,
        extra={"request_id": request_id[:128]},
    )
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
    allow_client_shm: bool = False
    client_shm_max_bytes: int = 64 << 30
    client_shm_key_prefix: str | None = None
    exiting: bool = False
    # called after a model is loaded or unloaded at run time (health follows readiness)
    listeners: list[Callable[[], None]] = field(default_factory=list)


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
    def __init__(
        self,
        repository: ModelRepository,
        state: ServerState,
        request_log: RequestLog | None = None,
    ) -> None:
        self.repo = repository
        self.state = state
        self.request_log = request_log
        if request_log is not None:  # --log-verbose >= 1; at 0 the plain methods serve
            self.ModelInfer = self._model_infer_logged  # type: ignore[method-assign]
        self._serve_one = self._stream_one if request_log is None else self._stream_one_logged
        self.control = ModelControl(
            repository, explicit=state.model_control_mode == "explicit", on_change=self._changed
        )
        self.shm = SharedMemory(
            state.allow_client_shm,
            max_bytes=state.client_shm_max_bytes,
            key_prefix=state.client_shm_key_prefix,
        )
        self._extensions = EXTENSIONS + (SHM_EXTENSIONS if state.allow_client_shm else ())
        self.streams = Streams(
            max_streams=state.max_streams,
            max_pending=state.stream_max_pending,
            exiting=lambda: state.exiting,
        )

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
            name=self.state.server_id, version=__version__, extensions=self._extensions
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
        memory.large_request(len(data), context.add_callback)
        request, raws = split_request(data)
        head, outputs = self._infer(request, raws, context.is_active)
        return infer_response_bytes(head, outputs)

    def _model_infer_logged(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        """ModelInfer plus its --log-verbose line (status as the error boundary maps it)."""
        start = time.perf_counter_ns()
        request, status, version = None, "INTERNAL", ""
        try:
            memory.large_request(len(data), context.add_callback)
            request, raws = split_request(data)
            head, outputs = self._infer(request, raws, context.is_active)
            status, version = "OK", head.model_version
            return infer_response_bytes(head, outputs)
        except InferenceError as exc:
            status = exc.code.name
            raise
        finally:
            self.request_log(  # type: ignore[misc]
                "ModelInfer",
                request.model_name if request is not None else "",
                version or (request.model_version if request is not None else ""),
                request.id if request is not None else "",
                status,
                start,
            )

    def _infer(
        self, request: Any, raws: Sequence[bytes | memoryview], is_active: Callable[[], bool] | None
    ) -> tuple[Any, list[bytes | memoryview]]:
        for attempt in range(REROUTES + 1):
            model, decoded, start = self._begin(request, raws, is_active)
            try:
                try:
                    results = model.scheduler.infer(decoded.item)
                except Closed as exc:
                    if attempt < REROUTES and not self.state.exiting:
                        continue  # a reload retired the version it resolved: resolve again
                    self._failed(model, decoded, start, exc)
                    raise
                except BaseException as exc:
                    self._failed(model, decoded, start, exc)
                    raise
                return self._finish(request, model, decoded, start, results)
            finally:
                decoded.release()  # outputs in shared memory are written by now
        raise AssertionError("unreachable: the last attempt returns or raises")

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
                shm=self.shm,
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
    ) -> tuple[Any, list[bytes | memoryview]]:
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
        """Bidirectional stream: requests run concurrently, replies go out in request order
        (`tributary.streams`). A per-request error does not end the stream: it is answered
        with `error_message` and the request id (docs/protocol.md#streams). Every reply carries
        triton_final_response=true."""
        return self.streams.serve(request_iterator, context, self._serve_one)

    def _stream_one(self, data: bytes, slot: Slot, is_active: Callable[[], bool]) -> None:
        """Start one streamed request; whatever happens, `slot` is answered exactly once."""
        request = None
        try:
            request, raws = split_request(data)
        except InferenceError as exc:
            slot.fail(exc, request)
            return
        except Exception as exc:
            slot.fail(internal_error("ModelStreamInfer", exc, ""), request)
            return
        self._stream_start(request, raws, slot, is_active, 0)

    def _stream_start(
        self,
        request: Any,
        raws: Sequence[bytes | memoryview],
        slot: Slot,
        is_active: Callable[[], bool],
        attempt: int,
    ) -> None:
        try:
            model, decoded, start = self._begin(request, raws, is_active)
        except InferenceError as exc:
            slot.fail(exc, request)
            return
        except Exception as exc:
            slot.fail(internal_error("ModelStreamInfer", exc, getattr(request, "id", "")), request)
            return

        def done(results: Any, error: InferenceError | None) -> None:
            try:
                if isinstance(error, Closed) and attempt < REROUTES and not self.state.exiting:
                    # A reload retired the version it resolved: resolve again.
                    self._stream_start(request, raws, slot, is_active, attempt + 1)
                    return
                if error is not None:
                    self._failed(model, decoded, start, error)
                    slot.fail(error, request)
                    return
                slot.succeed(*self._finish(request, model, decoded, start, results))
            except InferenceError as exc:
                slot.fail(exc, request)
            except Exception as exc:
                slot.fail(internal_error("ModelStreamInfer", exc, request.id), request)
            finally:
                decoded.release()

        try:
            model.scheduler.submit(decoded.item, done)
        except Exception as exc:  # submit reports refusals through `done`; this is a bug
            decoded.release()
            slot.fail(internal_error("ModelStreamInfer", exc, request.id), request)

    def _stream_one_logged(self, data: bytes, slot: Slot, is_active: Callable[[], bool]) -> None:
        self._stream_one(data, _LoggedSlot(slot, self.request_log), is_active)  # type: ignore[arg-type]

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

    # ---- shared memory (tributary.shm) -----------------------------------------------------
    def SystemSharedMemoryStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.shm.status(request.name):
            entry = response.regions[region.name]
            entry.name = region.name
            entry.key = region.key
            entry.offset = region.offset
            entry.byte_size = region.byte_size
        return response

    def SystemSharedMemoryRegister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.shm.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryUnregister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.shm.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    def CudaSharedMemoryStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.shm.cuda_status(request.name)
        return pb.CudaSharedMemoryStatusResponse()

    def CudaSharedMemoryRegister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.shm.cuda_register(request.name)
        return pb.CudaSharedMemoryRegisterResponse()

    def CudaSharedMemoryUnregister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.shm.cuda_unregister(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()


class _LoggedSlot:
    """A stream's `Slot` that also writes the request's --log-verbose line when answered."""

    __slots__ = ("_slot", "_log", "_start")

    def __init__(self, slot: Slot, request_log: Any) -> None:
        self._slot, self._log, self._start = slot, request_log, time.perf_counter_ns()

    def succeed(self, head: Any, raws: list[bytes | memoryview]) -> None:
        self._slot.succeed(head, raws)
        self._log.message("ModelStreamInfer", head, "OK", self._start)

    def fail(self, exc: InferenceError, request: Any = None) -> None:
        self._slot.fail(exc, request)
        self._log.message("ModelStreamInfer", request, exc.code.name, self._start)


def _unimplemented(name: str, what: str) -> Callable[..., Any]:
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented(f"{name} is not implemented by this server: {what}")

    handler.__name__ = name
    return handler


for _name, _what in {
    "TraceSetting": "tracing is not supported",
    "LogSettings": "use --log-verbose at start-up",
}.items():
    setattr(InferenceServicer, _name, _unimplemented(_name, _what))
