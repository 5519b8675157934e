"""RPC handlers for inference.GRPCInferenceService: thin, and one place maps errors.

Handlers turn protobuf into calls on the repository / models and back. `_rpc` is the only
error mapping: an `InferenceError` becomes `context.abort(code, message)`; anything else is a
bug, logged with its traceback and answered INTERNAL, and the server carries on.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc

from . import __version__
from .codec import decode_request, encode_response
from .control import ModelControl
from .errors import Cancelled, InferenceError, Unavailable, Unimplemented
from .repository import ModelRepository

log = logging.getLogger("tributary.servicer")

EXTENSIONS = (
    "classification",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "schedule_policy",
    "statistics",
)

F = TypeVar("F", bound=Callable[..., Any])


def _rpc(fn: F) -> F:
    @functools.wraps(fn)
    def handler(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except InferenceError as exc:
            context.abort(exc.code, exc.message)
        except Exception as exc:  # a bug: keep serving, say what broke
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error in {fn.__name__}: {exc}")

    return handler  # type: ignore[return-value]


@dataclass
class ServerState:
    """What health/readiness depend on besides the models; flipped by the composition root."""

    server_id: str = "tributary"
    strict_readiness: bool = True
    max_tensor_bytes: int = 2**31 - 1
    model_control_mode: str = "none"
    exiting: bool = False
    # called after a model is loaded or unloaded at run time (health follows readiness)
    listeners: list[Callable[[], None]] = field(default_factory=list)


class _Slot:
    """One streamed request's place in the response order."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self._done = threading.Event()
        self._response: Any = None

    def succeed(self, response: Any) -> None:
        response.parameters["triton_final_response"].bool_param = True
        self._response = pb.ModelStreamInferResponse(infer_response=response)
        self._done.set()

    def fail(self, exc: InferenceError) -> None:
        reply = pb.ModelStreamInferResponse(error_message=exc.message)
        reply.infer_response.id = self.request.id
        reply.infer_response.model_name = self.request.model_name
        reply.infer_response.model_version = self.request.model_version
        reply.infer_response.parameters["triton_final_response"].bool_param = True
        self._response = reply
        self._done.set()

    def wait(self) -> Any:
        self._done.wait()
        return self._response


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

    def _changed(self) -> None:
        for listener in self.state.listeners:
            listener()

    # ---- health and metadata -------------------------------------------------------------
    def is_ready(self) -> bool:
        return server_ready(self.repo, self.state)

    @_rpc
    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=not self.state.exiting)

    @_rpc
    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.is_ready())

    @_rpc
    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        ready = not self.state.exiting and self.repo.is_model_ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @_rpc
    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(
            name=self.state.server_id, version=__version__, extensions=EXTENSIONS
        )

    @_rpc
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

    @_rpc
    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self.repo.resolve(request.name, request.version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(model.config)
        return response

    # ---- inference -----------------------------------------------------------------------
    @_rpc
    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._infer(request, context.is_active)

    def _infer(self, request: Any, is_active: Callable[[], bool] | None) -> Any:
        model, decoded, start = self._begin(request, is_active)
        try:
            results = model.scheduler.infer(decoded.item)
        except BaseException as exc:
            self._failed(model, decoded, start, exc)
            raise
        return self._finish(request, model, decoded, start, results)

    def _begin(self, request: Any, is_active: Callable[[], bool] | None) -> tuple[Any, Any, int]:
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

    def _finish(self, request: Any, model: Any, decoded: Any, start: int, results: Any) -> Any:
        """Encode the response and record the request's statistics."""
        response = pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(model.version), id=request.id
        )
        try:
            encode_response(response, decoded, results, model.name)
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
        return response

    @_rpc
    def ModelStreamInfer(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        """Bidirectional stream: requests run concurrently, responses go out in request order.

        A per-request error does not end the stream: it is answered with `error_message` and
        the request id (PROTOCOL.md §2.7). Every response carries triton_final_response=true.
        """
        slots: queue.Queue[_Slot | None] = queue.Queue()

        def read() -> None:
            try:
                for request in request_iterator:
                    slot = _Slot(request)
                    slots.put(slot)
                    self._stream_one(request, slot, context.is_active)
            except Exception:  # noqa: BLE001 - client went away mid-stream
                log.debug("stream reader ended", exc_info=True)
            finally:
                slots.put(None)

        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        while (slot := slots.get()) is not None:
            yield slot.wait()

    def _stream_one(self, request: Any, slot: _Slot, is_active: Callable[[], bool]) -> None:
        try:
            model, decoded, start = self._begin(request, is_active)
        except InferenceError as exc:
            slot.fail(exc)
            return

        def done(results: Any, error: InferenceError | None) -> None:
            if error is not None:
                self._failed(model, decoded, start, error)
                slot.fail(error)
                return
            try:
                slot.succeed(self._finish(request, model, decoded, start, results))
            except InferenceError as exc:
                slot.fail(exc)

        model.scheduler.submit(decoded.item, done)

    # ---- statistics and repository ---------------------------------------------------------
    @_rpc
    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        from .statistics import statistics_response

        return statistics_response(self.repo, request.name, request.version)

    @_rpc
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

    @_rpc
    def RepositoryModelLoad(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.control.load(request)
        return pb.RepositoryModelLoadResponse()

    @_rpc
    def RepositoryModelUnload(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.control.unload(request)
        return pb.RepositoryModelUnloadResponse()


def _unimplemented(name: str, what: str) -> Callable[..., Any]:
    @_rpc
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
