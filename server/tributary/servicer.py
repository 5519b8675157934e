"""gRPC front end of the data plane: translation only (docs/architecture.md).

Each handler turns its request message into a `DataPlane` call and the answer into the reply
message. `tributary.rpcs` puts these handlers on the server behind one error boundary per RPC:
an `InferenceError` raised below becomes its status code and message, anything else is logged
once with a reference number and answered INTERNAL. ModelInfer and ModelStreamInfer take the
request's bytes: `tributary.wire` parses them, so undecodable requests are INVALID_ARGUMENT and
tensor payloads are never copied by protobuf. Stream admission, ordering, flow control and
shutdown live in `tributary.streams`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from tributary_client._proto import grpc_service_pb2 as pb
from tributary_client._proto import grpc_service_pb2_grpc as pb_grpc

from . import memory
from .dataplane import DataPlane, InferResult, internal_error
from .errors import InferenceError
from .streams import Slot, Streams
from .tracing import MAX_TRACE_HEADER_CHARS
from .wire import infer_response_bytes, split_request

TRACE_HEADERS = ("traceparent", "tracestate")


def trace_carrier(context: grpc.ServicerContext) -> dict[str, str] | None:
    """The W3C trace context headers of a call's metadata (gRPC lower-cases keys), or None.
    Read only while tracing is on: an untraced request never looks at its metadata."""
    carrier = None
    for key, value in context.invocation_metadata() or ():
        if key in TRACE_HEADERS and isinstance(value, str) and len(value) <= MAX_TRACE_HEADER_CHARS:
            carrier = carrier or {}
            carrier[key] = value
    return carrier


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane
        state = dataplane.state
        self.streams = Streams(
            max_streams=state.max_streams,
            max_pending=state.stream_max_pending,
            exiting=lambda: state.exiting,
        )

    # ---- health and metadata -------------------------------------------------------------
    def is_ready(self) -> bool:
        return self.dp.server_ready()

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=self.dp.server_live())

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.dp.server_ready())

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ModelReadyResponse(ready=self.dp.model_ready(request.name, request.version))

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.dp.server_metadata()

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.dp.model_metadata(request.name, request.version)

    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.dp.model_config(request.name, request.version)

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.dp.model_statistics(request.name, request.version)

    # ---- inference -----------------------------------------------------------------------
    def ModelInfer(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        """Registered on raw bytes (see `tributary.rpcs`): parse, infer, assemble the reply."""
        memory.large_request(len(data), context.add_callback)
        try:
            request, raws = split_request(data)
        except InferenceError as exc:
            self.dp.refused("ModelInfer", exc)
            raise
        carrier = trace_carrier(context) if self.dp.tracing else None
        result = self.dp.infer(request, raws, is_active=context.is_active, carrier=carrier)
        return infer_response_bytes(result.response, result.raws)

    def ModelStreamInfer(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Bidirectional stream: requests run concurrently, replies go out in request order
        (`tributary.streams`). A per-request error does not end the stream: it is answered
        with `error_message` and the request id (docs/protocol.md#streams). Every reply carries
        triton_final_response=true."""
        carrier = trace_carrier(context)  # the stream's metadata: for each of its requests
        return self.streams.serve(
            request_iterator, context, functools.partial(self._stream_one, carrier=carrier)
        )

    def _stream_one(
        self,
        data: bytes,
        slot: Slot,
        is_active: Callable[[], bool],
        carrier: dict[str, str] | None = None,
    ) -> None:
        """Start one streamed request; whatever happens, `slot` is answered exactly once."""
        try:
            request, raws = split_request(data)
        except InferenceError as exc:
            self.dp.refused("ModelStreamInfer", exc)
            slot.fail(exc, None)
            return
        except Exception as exc:
            slot.fail(internal_error("ModelStreamInfer", exc, ""), None)
            return

        def done(result: InferResult | None, error: InferenceError | None) -> None:
            # The stream's error boundary: this request is answered exactly once.
            try:
                if result is not None:
                    slot.succeed(result.response, result.raws)
                    return
            except Exception as exc:
                error = internal_error("ModelStreamInfer", exc, request.id)
            slot.fail(error, request)  # type: ignore[arg-type]

        self.dp.submit(request, raws, done, is_active=is_active, carrier=carrier)

    # ---- repository --------------------------------------------------------------------------
    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.dp.repository_index(request)

    def RepositoryModelLoad(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.dp.load(request)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.dp.unload(request)
        return pb.RepositoryModelUnloadResponse()

    # ---- shared memory (tributary.shm) -----------------------------------------------------
    def SystemSharedMemoryStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = pb.SystemSharedMemoryStatusResponse()
        for region in self.dp.shm.status(request.name):
            entry = response.regions[region.name]
            entry.name = region.name
            entry.key = region.key
            entry.offset = region.offset
            entry.byte_size = region.byte_size
        return response

    def SystemSharedMemoryRegister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.dp.shm.register(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryUnregister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.dp.shm.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    def CudaSharedMemoryStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.dp.shm.cuda_status(request.name)
        return pb.CudaSharedMemoryStatusResponse()

    def CudaSharedMemoryRegister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.dp.shm.cuda_register(request.name)
        return pb.CudaSharedMemoryRegisterResponse()

    def CudaSharedMemoryUnregister(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.dp.shm.cuda_unregister(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    # ---- settings ------------------------------------------------------------------------------
    def TraceSetting(self, request: Any, context: grpc.ServicerContext) -> Any:
        update = (
            {k: list(v.value) or None for k, v in request.settings.items()}
            if request.settings
            else None
        )
        response = pb.TraceSettingResponse()
        for key, values in self.dp.trace_settings(request.model_name, update).items():
            response.settings[key].value.extend(values)
        return response

    def LogSettings(self, request: Any, context: grpc.ServicerContext) -> Any:
        update: dict[str, bool | int | str] | None = None
        if request.settings:
            update = {}
            for key, value in request.settings.items():
                kind = value.WhichOneof("parameter_choice")
                update[key] = getattr(value, kind) if kind else ""
        response = pb.LogSettingsResponse()
        for key, setting in self.dp.log_settings(update).items():
            entry = response.settings[key]
            if isinstance(setting, bool):
                entry.bool_param = setting
            elif isinstance(setting, int):
                entry.uint32_param = setting
            else:
                entry.string_param = setting
        return response
